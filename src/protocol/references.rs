//! What a Messages request reaches beyond its own bytes, found in one pass over the body.
//!
//! A prompt's size bounds its cost only when all of it is in the body. Content fetched by
//! reference (a `url` or `file` source, a `file_id`), server tools (web search and fetch, code
//! execution) and MCP servers add input tokens the body does not show, and some server tools
//! add a fee per use. Admission needs to know, before the request is sent, so it can reserve
//! the model's context window (or refuse, by the operator's policy). Pricing needs one more
//! fact from the request: whether it asked for 1-hour cache writes, for a provider that reports
//! cache writes without their TTL split. And one more way a prompt outgrows its bytes: a PDF,
//! billed per page as text plus an image.
//!
//! The facts come from the string tokens of the body, checked as the top-level peek's walk
//! passes each one ([`json_peek::Watch`]): a needle counts only as a whole JSON string, so text
//! that mentions one (its quotes escaped inside another string) never matches, and each hit is
//! confirmed from the bytes around it (`"type": "url"` is a source type, `"url": ...` in a
//! tool's input is not). A hit that survives is at worst a false positive, which only makes a
//! reservation larger. A body that escapes printable ASCII could spell a needle the bytes do not
//! show, so it is read the slow, exact way instead.

use std::ops::Range;

use serde_json::Value;

use super::json_peek::{self, JsonError, RequestPeek, Watch};

/// The most tokens one image can cost: the provider scales images down to a bounded size
/// (about 1.15 megapixels, or 3.75 on the newest models, at 750 pixels a token), so a few
/// hundred bytes of a well-compressed image may cost this much.
pub const IMAGE_MAX_TOKENS: u64 = 5_000;

/// What the scan found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reach {
    /// The first field found that brings content from outside the body, as the client would
    /// name it in a refusal: `source.type = "url"`, `source.type = "file"`,
    /// `type = "container_upload"`, `tools[].type (a server tool)`, `mcp_servers`.
    pub by_reference: Option<&'static str>,
    /// Web searches and fetches the request's server tools allow: the sum of their `max_uses`,
    /// or `default_uses` for a tool without one.
    pub web_searches: u64,
    pub web_fetches: u64,
    /// Some `cache_control` asks for a 1-hour TTL.
    pub cache_1h: bool,
    /// The body holds a PDF: each page costs its text and an image of the page, which can be
    /// more tokens than the page's bytes, so the body's size does not bound the prompt.
    pub pdf: bool,
    /// Image blocks in the body: each may cost up to [`IMAGE_MAX_TOKENS`] whatever its size.
    pub images: u64,
    /// The body had to be read exactly and could not be (a number beyond a 64-bit float, a
    /// lone surrogate): nothing above can be trusted, so a budget must not admit it.
    pub unreadable: bool,
}

const URL_SOURCE: &str = "source.type = \"url\"";
const FILE_SOURCE: &str = "source.type = \"file\"";
const CONTAINER_UPLOAD: &str = "type = \"container_upload\"";
const SERVER_TOOL: &str = "tools[].type (a server tool)";

/// Peeks at a Messages body ([`json_peek::peek_request`]) and finds what it reaches beyond its
/// bytes in the same walk. `default_uses` is what a server tool without `max_uses` is assumed to
/// use.
pub fn peek_and_scan(body: &[u8], default_uses: u64) -> Result<(RequestPeek, Reach), JsonError> {
    let mut seen = Seen::default();
    let peek = json_peek::peek_request_watching(body, &mut seen)?;
    let reach = seen.finish(body, peek.mcp_servers, default_uses);
    Ok((peek, reach))
}

/// What the walk saw, string by string.
#[derive(Default)]
struct Seen {
    reach: Reach,
    server_tools: bool,
    /// An escape of printable ASCII (`\u0075`) or of `/`: the body must be read exactly.
    escaped: bool,
}

impl Watch for Seen {
    #[inline]
    fn string(&mut self, body: &[u8], span: Range<usize>) {
        let s = &body[span.clone()];
        // The byte after the opening quote tells the few strings worth a look from the rest.
        let Some(&first) = s.get(1) else { return };
        let typed = || is_type_value(body, span.start);
        let reach = &mut self.reach;
        match first {
            b't' if s == b"\"ttl\"" => reach.cache_1h |= value_is(body, span.end, b"\"1h\""),
            b'u' if s == b"\"url\"" && typed() => {
                reach.by_reference.get_or_insert(URL_SOURCE);
            }
            b'f' if s == b"\"file\"" && typed() => {
                reach.by_reference.get_or_insert(FILE_SOURCE);
            }
            b'c' if s == b"\"container_upload\"" && typed() => {
                reach.by_reference.get_or_insert(CONTAINER_UPLOAD);
            }
            b'c' | b'w' if (s.starts_with(b"\"code_execution_") || s.starts_with(b"\"web_")) && typed() => {
                self.server_tools = true
            }
            b'a' if s == b"\"application/pdf\"" && is_value_of(body, span.start, b"\"media_type\"") => reach.pdf = true,
            b'i' if s == b"\"image\"" && typed() => reach.images += 1,
            _ => {}
        }
    }

    #[inline]
    fn escape(&mut self, body: &[u8], at: usize) {
        match body.get(at + 1) {
            Some(b'/') => self.escaped = true,
            Some(b'u') => self.escaped |= escapes_ascii(&body[at + 2..]),
            _ => {}
        }
    }
}

impl Seen {
    fn finish(self, body: &[u8], mcp_servers: bool, default_uses: u64) -> Reach {
        if self.escaped {
            return exactly(body, mcp_servers, default_uses);
        }
        let mut reach = self.reach;
        if mcp_servers {
            reach.by_reference = Some("mcp_servers");
        }
        if self.server_tools {
            #[derive(serde::Deserialize)]
            struct Body {
                #[serde(default)]
                tools: Option<Vec<Value>>,
            }
            match serde_json::from_slice::<Body>(body) {
                Ok(b) => add_server_tools(&mut reach, b.tools.as_deref().unwrap_or_default(), default_uses),
                // A duplicated key (the provider keeps the last): read it as the provider would.
                Err(_) => return exactly(body, mcp_servers, default_uses),
            }
        }
        reach
    }
}

/// `after` follows `\u`: `00XX` spelling a printable ASCII character. No common encoder writes
/// those (they write the character itself), but a client could, to hide a needle from the scan.
fn escapes_ascii(after: &[u8]) -> bool {
    matches!(after, [b'0', b'0', b'2'..=b'7', _, ..])
}

/// [`walk`], or an unreadable reach when serde_json cannot read the body.
fn exactly(body: &[u8], mcp_servers: bool, default_uses: u64) -> Reach {
    walk(body, mcp_servers, default_uses).unwrap_or(Reach { unreadable: true, ..Reach::default() })
}

/// The slow, exact path for bodies that escape ASCII: the whole document, walked. Duplicate
/// keys keep their last value, as the provider's parser does. `None` when serde_json cannot
/// read the body (the peek has passed it, so its structure is sound; its numbers or escapes
/// are not).
fn walk(body: &[u8], mcp_servers: bool, default_uses: u64) -> Option<Reach> {
    let mut reach = Reach::default();
    if mcp_servers {
        reach.by_reference = Some("mcp_servers");
    }
    let doc = serde_json::from_slice::<Value>(body).ok()?;
    fn visit(v: &Value, reach: &mut Reach) {
        match v {
            Value::Object(o) => {
                let source = match o.get("type").and_then(Value::as_str) {
                    Some("url") => Some(URL_SOURCE),
                    Some("file") => Some(FILE_SOURCE),
                    Some("container_upload") => Some(CONTAINER_UPLOAD),
                    Some("image") => {
                        reach.images += 1;
                        None
                    }
                    _ => None,
                };
                if let Some(field) = source {
                    reach.by_reference.get_or_insert(field);
                }
                if o.get("media_type").and_then(Value::as_str) == Some("application/pdf") {
                    reach.pdf = true;
                }
                if o.get("ttl").and_then(Value::as_str) == Some("1h") {
                    reach.cache_1h = true;
                }
                o.values().for_each(|v| visit(v, reach));
            }
            Value::Array(a) => a.iter().for_each(|v| visit(v, reach)),
            _ => {}
        }
    }
    visit(&doc, &mut reach);
    if let Some(tools) = doc.get("tools").and_then(Value::as_array) {
        add_server_tools(&mut reach, tools, default_uses);
    }
    Some(reach)
}

/// The bytes before `at`, skipping white space, are `"type":` (so the string at `at` is the
/// value of a `type` member).
fn is_type_value(body: &[u8], at: usize) -> bool {
    is_value_of(body, at, b"\"type\"")
}

/// The bytes before `at`, skipping white space, are `key` (quoted) and a colon.
fn is_value_of(body: &[u8], at: usize, key: &[u8]) -> bool {
    let before = trim_end(&body[..at]);
    match before.strip_suffix(b":") {
        Some(k) => trim_end(k).ends_with(key),
        None => false,
    }
}

/// The member whose key ends at `at` has the value `want`.
fn value_is(body: &[u8], at: usize, want: &[u8]) -> bool {
    match trim_start(&body[at..]).strip_prefix(b":") {
        Some(rest) => trim_start(rest).starts_with(want),
        None => false,
    }
}

fn trim_end(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(0, |e| e + 1);
    &b[..end]
}

fn trim_start(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    &b[start..]
}

/// A `max_uses` as a lenient validator could read it: `5`, `5.0`, `"5"` (rounded up).
fn uses(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.ceil() as u64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Sums the uses the `tools` allow to web search and web fetch, and notes any server tool (one
/// that runs at the provider and brings content back).
fn add_server_tools(reach: &mut Reach, tools: &[Value], default_uses: u64) {
    for t in tools {
        let Some(kind) = t.get("type").and_then(Value::as_str) else { continue };
        let uses = t.get("max_uses").and_then(uses).unwrap_or(default_uses);
        if kind.starts_with("web_search_") {
            reach.web_searches = reach.web_searches.saturating_add(uses);
        } else if kind.starts_with("web_fetch_") {
            reach.web_fetches = reach.web_fetches.saturating_add(uses);
        } else if !kind.starts_with("code_execution_") {
            continue;
        }
        reach.by_reference.get_or_insert(SERVER_TOOL);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn scan(body: &[u8], default_uses: u64) -> Reach {
        peek_and_scan(body, default_uses).expect("a JSON object").1
    }

    /// What the exact walk reads, with the peek's `mcp_servers`.
    fn exact(body: &[u8], default_uses: u64) -> Reach {
        let peek = json_peek::peek_request(body).expect("a JSON object");
        walk(body, peek.mcp_servers, default_uses).expect("readable")
    }

    /// JSON values made of the keys and strings the scan looks for, mixed with others; some
    /// strings hold escaped quotes, backslashes, slashes, digits and the needles as text.
    fn value() -> impl Strategy<Value = Value> {
        const KEYS: [&str; 12] =
            ["type", "ttl", "url", "file", "media_type", "source", "tools", "max_uses", "name", "content", "t", "x"];
        const WORDS: [&str; 17] = [
            "url",
            "file",
            "image",
            "container_upload",
            "application/pdf",
            "1h",
            "5m",
            "type",
            "web_search_20250305",
            "web_fetch_20250910",
            "code_execution_20250825",
            "web",
            "ttl",
            "say \"url\" and \"image\"",
            "a\\\"type\": \"url",
            "C:\\u0075rl/x",
            "https://x/1.png",
        ];
        let leaf = prop_oneof![
            proptest::sample::select(&WORDS[..]).prop_map(|w| Value::String(w.to_owned())),
            (0u64..600).prop_map(Value::from),
            Just(Value::Null),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((proptest::sample::select(&KEYS[..]), inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    /// A body: a top-level object of such values (`mcp_servers` among its keys).
    fn body() -> impl Strategy<Value = Value> {
        const TOP: [&str; 5] = ["messages", "tools", "system", "mcp_servers", "x"];
        proptest::collection::vec((proptest::sample::select(&TOP[..]), value()), 0..4)
            .prop_map(|members| Value::Object(members.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    /// `json` with `space` after every `:` and `,` outside strings.
    fn spaced(json: &str, space: &str) -> String {
        let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
        for c in json.chars() {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' if in_string => escaped = true,
                '"' => in_string = !in_string,
                ':' | ',' if !in_string => out.push_str(space),
                _ => {}
            }
        }
        out
    }

    /// The byte offsets of the characters a client could escape as `\u00XX` (or `\/`): printable
    /// ASCII inside a string, keys included, that is not itself part of an escape.
    fn escapable(json: &str) -> Vec<usize> {
        let (mut out, mut in_string, mut escaped) = (Vec::new(), false, false);
        for (i, c) in json.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_string => escaped = true,
                '"' => in_string = !in_string,
                ' '..='~' if in_string => out.push(i),
                _ => {}
            }
        }
        out
    }

    proptest! {
        /// On any document a JSON encoder writes, with any spacing, the scan finds what the
        /// exact walk finds.
        #[test]
        fn finds_what_the_exact_walk_finds(doc in body(), space in proptest::sample::select(&["", " ", "\t", "\n  "][..]), pretty: bool) {
            let json = if pretty { serde_json::to_string_pretty(&doc) } else { serde_json::to_string(&doc) }.unwrap();
            let body = spaced(&json, space);
            prop_assert_eq!(scan(body.as_bytes(), 7), exact(body.as_bytes(), 7), "{}", body);
        }

        /// Escaping any printable character of a string (`\u00XX`, or `\/` for a slash), as a
        /// client hiding a needle could, changes nothing.
        #[test]
        fn escapes_change_nothing(doc in body(), at in any::<proptest::sample::Index>(), solidus: bool) {
            let plain = serde_json::to_string(&doc).unwrap();
            let places = escapable(&plain);
            prop_assume!(!places.is_empty());
            let i = places[at.index(places.len())];
            let c = plain.as_bytes()[i];
            let escape = if c == b'/' && solidus { "\\/".to_owned() } else { format!("\\u{c:04x}") };
            let escaped = format!("{}{escape}{}", &plain[..i], &plain[i + 1..]);
            prop_assert_eq!(serde_json::from_str::<Value>(&escaped).unwrap(), doc);
            prop_assert_eq!(scan(escaped.as_bytes(), 7), exact(plain.as_bytes(), 7), "{}", escaped);
        }
    }

    #[test]
    fn the_peek_and_the_scan_agree_with_their_separate_calls() {
        let body = br#"{"model":"m","max_tokens":9,"mcp_servers":[{"url":"u"}],"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://x"}}]}]}"#;
        let (peek, reach) = peek_and_scan(body, 3).unwrap();
        assert_eq!(peek, json_peek::peek_request(body).unwrap());
        assert_eq!(reach, exact(body, 3));
        assert_eq!((reach.by_reference, reach.images), (Some("mcp_servers"), 1));
        assert!(peek_and_scan(b"{\"a\":[}", 3).is_err());
    }

    #[test]
    fn a_body_the_exact_walk_cannot_read_is_unreadable() {
        // An escape sends the body to the exact walk; serde_json cannot hold 1e400.
        let body =
            br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https:\/\/x"}}]},
            {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n","input":{"a":1e400}}]}]}"#;
        let reach = scan(body, 3);
        assert!(reach.unreadable);
        // A server tool sends the body to serde too.
        let tools = br#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5,"x":1e400}]}"#;
        assert!(scan(tools, 3).unreadable);
        // Without either, the fast path needs no exact read.
        let plain = br#"{"messages":[{"role":"user","content":"x"}],"x":1e400}"#;
        assert!(!scan(plain, 3).unreadable);
    }

    #[test]
    fn max_uses_is_read_leniently() {
        for (max_uses, want) in [("5", 5), ("5.0", 5), ("4.2", 5), ("\"6\"", 6), ("-1", 7), ("null", 7)] {
            let body =
                format!(r#"{{"tools":[{{"type":"web_search_20250305","name":"web_search","max_uses":{max_uses}}}]}}"#);
            assert_eq!(scan(body.as_bytes(), 7).web_searches, want, "{max_uses}");
        }
    }

    #[test]
    fn a_plain_prompt_reaches_nothing() {
        // `"url"` and `"file_id"` here are schema keys and tool input, not sources; text that
        // mentions them has its quotes escaped.
        let body = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"fetch \"url\" and file_id"},
            {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"Read","input":{"file_id":"f1","url":"u"}}]}],
            "tools":[{"name":"WebFetch","input_schema":{"properties":{"url":{"type":"string"},"file_id":{"type":"string"}}}}]}"#;
        assert_eq!(scan(body, 10), Reach::default());
    }

    #[test]
    fn escaped_ascii_is_read_as_the_provider_reads_it() {
        let url = br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"t\u0079pe":"\u0075rl","url":"https:\/\/x"}}]}],
            "system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl":"1\u0068"}}]}"#;
        let r = scan(url, 10);
        assert_eq!((r.by_reference, r.images, r.cache_1h), (Some(URL_SOURCE), 1, true));
        let tool = br#"{"tools":[{"type":"web\u005fsearch_20250305","name":"web_search","max_uses":4}]}"#;
        assert_eq!(scan(tool, 10).web_searches, 4);
        // Non-ASCII escapes (what JSON.stringify writes for control characters) keep the fast path.
        let ansi = br#"{"messages":[{"role":"user","content":"\u001b[31mred"}]}"#;
        assert_eq!(scan(ansi, 10), Reach::default());
    }

    #[test]
    fn a_duplicated_max_uses_counts_as_the_provider_reads_it() {
        let body = br#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":2,"max_uses":500}]}"#;
        assert_eq!(scan(body, 10).web_searches, 500);
    }

    #[test]
    fn images_and_pdfs_are_counted() {
        let body = br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBO"}},
            {"type": "image","source":{"type":"base64","media_type":"image/png","data":"iVBO"}},
            {"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"JVBE"}}]}]}"#;
        let r = scan(body, 10);
        assert_eq!((r.images, r.pdf, r.by_reference), (2, true, None));
    }

    #[test]
    fn sources_by_reference() {
        let url = br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type" : "url","url":"https://x"}}]}]}"#;
        assert_eq!(scan(url, 10).by_reference, Some("source.type = \"url\""));
        let file =
            br#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"f"}}]}]}"#;
        assert_eq!(scan(file, 10).by_reference, Some("source.type = \"file\""));
        assert_eq!(
            scan(br#"{"mcp_servers":[{"type":"url","url":"https://m","name":"m"}]}"#, 10).by_reference,
            Some("mcp_servers")
        );
        assert_eq!(scan(br#"{"mcp_servers":[]}"#, 10).by_reference, None);
    }

    #[test]
    fn server_tools_and_their_uses() {
        let body = br#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5},
            {"type":"web_fetch_20250910","name":"web_fetch"},{"name":"web_search","input_schema":{}}]}"#;
        let r = scan(body, 7);
        assert_eq!((r.web_searches, r.web_fetches), (5, 7));
        assert!(r.by_reference.is_some());
        // A custom tool merely named like one is not a server tool.
        let custom = br#"{"tools":[{"name":"web_search_v2","type":"custom","input_schema":{}}]}"#;
        assert_eq!(scan(custom, 7), Reach::default());
    }

    #[test]
    fn one_hour_cache_writes() {
        let body = br#"{"system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl": "1h"}}]}"#;
        assert!(scan(body, 0).cache_1h);
        assert!(!scan(br#"{"cache_control":{"type":"ephemeral","ttl":"5m"}}"#, 0).cache_1h);
        // Escaped, as a client could write it.
        assert!(scan(br#"{"cache_control":{"type":"ephemeral","ttl":"1h"}}"#, 0).cache_1h);
        let five =
            br#"{"system":[{"type":"text","text":"\"ttl\": \"1h\"","cache_control":{"type":"ephemeral","ttl":"5m"}}]}"#;
        assert!(!scan(five, 0).cache_1h);
    }
}
