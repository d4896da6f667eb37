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
    /// The body had to be read exactly and serde_json could not read it (a number beyond a
    /// 64-bit float, a lone surrogate, a grammar mistake the peek does not check): why. What
    /// the bytes showed is above, but not all of it, so a budget must not admit the request.
    pub unreadable: Option<String>,
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
        let mut reach = if self.escaped {
            match read(body, Read::Exact, default_uses) {
                Ok(exact) => exact,
                // What the bytes showed still holds; a budget refuses the rest.
                Err(e) => Reach { unreadable: Some(e.to_string()), ..self.reach },
            }
        } else if self.server_tools {
            // The tools as the provider reads them (a duplicated key keeps its last value).
            match read(body, Read::Tools, default_uses) {
                Ok(tools) => Reach {
                    web_searches: tools.web_searches,
                    web_fetches: tools.web_fetches,
                    by_reference: self.reach.by_reference.or(tools.by_reference),
                    ..self.reach
                },
                Err(e) => Reach { unreadable: Some(e.to_string()), ..self.reach },
            }
        } else {
            self.reach
        };
        if mcp_servers {
            reach.by_reference = Some("mcp_servers");
        }
        reach
    }
}

/// `after` follows `\u`: `00XX` spelling a printable ASCII character. No common encoder writes
/// those (they write the character itself), but a client could, to hide a needle from the scan.
fn escapes_ascii(after: &[u8]) -> bool {
    matches!(after, [b'0', b'0', b'2'..=b'7', _, ..])
}

/// What a serde reading of the body looks at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Everything: sources, images, PDFs, TTLs and the tools, escapes decoded.
    Exact,
    /// Only the top-level `tools`; the rest is skipped unread.
    Tools,
}

/// Reads the body with serde_json's parser (escapes decoded, nesting limited as the peek
/// limits it) without building the document: each object keeps only the few member values the
/// reach depends on while its members go by, so memory stays bounded by the nesting, whatever
/// the body's size. A member given twice counts each time (at worst a larger reservation),
/// except the top-level `tools`, whose last value is the one the provider reads.
fn read(body: &[u8], what: Read, default_uses: u64) -> Result<Reach, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut reach = Reach::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let walk = Walk { reach: &mut reach, what, default_uses, keep: false, place: Place::Top };
    walk.deserialize(&mut de)?;
    de.end()?;
    Ok(reach)
}

/// One value of the body, read by [`read`].
struct Walk<'r> {
    reach: &'r mut Reach,
    what: Read,
    default_uses: u64,
    /// The value's string matters to the object it is in (a `type`, say).
    keep: bool,
    place: Place,
}

/// Where a value is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The body's top-level object.
    Top,
    /// The top-level `tools` array.
    Tools,
    /// One of its tools.
    Tool,
    /// Anywhere else.
    Inside,
}

/// What a value comes to for the object or array around it.
enum Got {
    Nothing,
    Text(String),
    Number(u64),
    /// An object: its `type` and `max_uses`.
    Object(Option<String>, Option<u64>),
}

impl Got {
    /// A `max_uses` as a lenient validator could read it: `5`, `5.0`, `"5"`, `"5.0"` (rounded up).
    fn uses(self) -> Option<u64> {
        match self {
            Got::Number(n) => Some(n),
            Got::Text(s) => s.trim().parse().ok().or_else(|| s.trim().parse().ok().and_then(rounded_up)),
            _ => None,
        }
    }
}

/// A non-negative number as a whole count, rounded up; nothing for a negative or infinite one.
fn rounded_up(f: f64) -> Option<u64> {
    (f.is_finite() && f >= 0.0).then(|| f.ceil() as u64)
}

/// The member names the reach depends on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Type,
    MediaType,
    Ttl,
    MaxUses,
    Tools,
    Other,
}

/// No type name or count is longer; a longer string is not kept.
const MAX_KEPT: usize = 256;

impl<'de> serde::de::DeserializeSeed<'de> for Walk<'_> {
    type Value = Got;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Got, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = Key;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key {
    type Value = Key;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E>(self, key: &str) -> Result<Key, E> {
        Ok(match key {
            "type" => Key::Type,
            "media_type" => Key::MediaType,
            "ttl" => Key::Ttl,
            "max_uses" => Key::MaxUses,
            "tools" => Key::Tools,
            _ => Key::Other,
        })
    }
}

impl<'de> serde::de::Visitor<'de> for Walk<'_> {
    type Value = Got;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Got, E> {
        Ok(Got::Nothing)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Got, E> {
        Ok(Got::Nothing)
    }
    fn visit_u64<E>(self, n: u64) -> Result<Got, E> {
        Ok(Got::Number(n))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Got, E> {
        Ok(rounded_up(f).map_or(Got::Nothing, Got::Number))
    }
    fn visit_unit<E>(self) -> Result<Got, E> {
        Ok(Got::Nothing)
    }
    fn visit_str<E>(self, s: &str) -> Result<Got, E> {
        Ok(if self.keep && s.len() <= MAX_KEPT { Got::Text(s.to_owned()) } else { Got::Nothing })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Got, A::Error> {
        let Walk { reach, what, default_uses, place, .. } = self;
        let tools = place == Place::Tools;
        let inner = if tools { Place::Tool } else { Place::Inside };
        loop {
            let element = Walk { reach: &mut *reach, what, default_uses, keep: false, place: inner };
            let got = match seq.next_element_seed(element)? {
                Some(got) => got,
                None => return Ok(Got::Nothing),
            };
            // A server tool: it runs at the provider and brings content back, some for a fee.
            if let (true, Got::Object(Some(kind), uses)) = (tools, got) {
                let uses = uses.unwrap_or(default_uses);
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
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Got, A::Error> {
        let Walk { reach, what, default_uses, place, .. } = self;
        let exact = what == Read::Exact;
        let (mut kind, mut uses) = (None, None);
        while let Some(key) = map.next_key_seed(Key::Other)? {
            let tools = place == Place::Top && key == Key::Tools;
            let of_tool = place == Place::Tool && matches!(key, Key::Type | Key::MaxUses);
            if !exact && !tools && !of_tool {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            if tools {
                // The provider reads the last `tools`: an earlier one's counts do not stand.
                (reach.web_searches, reach.web_fetches) = (0, 0);
            }
            let inner = if tools { Place::Tools } else { Place::Inside };
            let value = Walk { reach: &mut *reach, what, default_uses, keep: key != Key::Other, place: inner };
            match (key, map.next_value_seed(value)?) {
                (Key::Type, Got::Text(t)) => {
                    if exact {
                        let source = match t.as_str() {
                            "url" => Some(URL_SOURCE),
                            "file" => Some(FILE_SOURCE),
                            "container_upload" => Some(CONTAINER_UPLOAD),
                            "image" => {
                                reach.images += 1;
                                None
                            }
                            _ => None,
                        };
                        if let Some(field) = source {
                            reach.by_reference.get_or_insert(field);
                        }
                    }
                    kind = Some(t);
                }
                (Key::Type, _) => kind = None,
                (Key::MediaType, Got::Text(t)) if exact && t == "application/pdf" => reach.pdf = true,
                (Key::Ttl, Got::Text(t)) if exact && t == "1h" => reach.cache_1h = true,
                (Key::MaxUses, got) => uses = got.uses(),
                _ => {}
            }
        }
        Ok(Got::Object(kind, uses))
    }
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    fn scan(body: &[u8], default_uses: u64) -> Reach {
        peek_and_scan(body, default_uses).expect("a JSON object").1
    }

    /// What the exact walk reads, with the peek's `mcp_servers`.
    fn exact(body: &[u8], default_uses: u64) -> Reach {
        let peek = json_peek::peek_request(body).expect("a JSON object");
        let mut reach = read(body, Read::Exact, default_uses).expect("readable");
        if peek.mcp_servers {
            reach.by_reference = Some("mcp_servers");
        }
        reach
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
        assert_eq!(reach.unreadable.as_deref(), Some("number out of range at line 2 column 100"));
        // What the bytes showed still stands.
        assert_eq!((reach.by_reference, reach.images), (Some(URL_SOURCE), 1));
        // A server tool sends the body to serde too, but only the tools' types and uses are read.
        let tools = br#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5,"x":1e400}]}"#;
        assert_eq!((scan(tools, 3).unreadable, scan(tools, 3).web_searches), (None, 5));
        let tools = br#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":1e400}]}"#;
        assert!(scan(tools, 3).unreadable.is_some());
        // Without either, the fast path needs no exact read.
        let plain = br#"{"messages":[{"role":"user","content":"x"}],"x":1e400}"#;
        assert_eq!(scan(plain, 3).unreadable, None);
    }

    #[test]
    fn every_escape_of_every_needle_is_seen() {
        let bodies = [
            r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://x/a.png"}}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"f"}}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"container_upload","file_id":"f"}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"JVBE"}}]}]}"#,
            r#"{"system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl":"1h"}}]}"#,
            r#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":4},{"type":"web_fetch_20250910","name":"web_fetch","max_uses":"3"},{"type":"code_execution_20250825","name":"code_execution"}]}"#,
        ];
        for plain in bodies {
            let want = exact(plain.as_bytes(), 7);
            assert_ne!(want, Reach::default(), "{plain}");
            for i in escapable(plain) {
                let c = plain.as_bytes()[i];
                let mut escapes = vec![format!("\\u{c:04x}"), format!("\\u{c:04X}")];
                if c == b'/' {
                    escapes.push("\\/".to_owned());
                }
                for escape in escapes {
                    let escaped = format!("{}{escape}{}", &plain[..i], &plain[i + 1..]);
                    assert_eq!(scan(escaped.as_bytes(), 7), want, "{escaped}");
                }
            }
        }
    }

    #[test]
    fn max_uses_is_read_leniently() {
        for (max_uses, want) in
            [("5", 5), ("5.0", 5), ("4.2", 5), ("\"6\"", 6), ("\"50.0\"", 50), ("-1", 7), ("null", 7)]
        {
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
        assert!(scan(br#"{"cache_control":{"type":"ephemeral","t\u0074l":"\u0031\u0068"}}"#, 0).cache_1h);
        let five =
            br#"{"system":[{"type":"text","text":"\"ttl\": \"1h\"","cache_control":{"type":"ephemeral","ttl":"5m"}}]}"#;
        assert!(!scan(five, 0).cache_1h);
    }
}
