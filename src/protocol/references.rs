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
//! One pass finds every candidate; each hit is confirmed from the bytes around it (`"type":
//! "url"` is a source type, `"url": ...` in a tool's input is not). The needles include their
//! quotes, so text inside a JSON string (where quotes are escaped) never matches. A hit that
//! survives is at worst a false positive, which only makes a reservation larger.

use std::sync::OnceLock;

use serde_json::Value;

const NEEDLES: [&str; 10] = [
    "\"ttl\"",
    "\"url\"",
    "\"file\"",
    "\"container_upload\"",
    "\"web_",
    "\"code_execution_",
    "\"application/pdf\"",
    "\"image\"",
    // Escapes the needles above could hide behind (see `escapes_ascii`).
    "\\u00",
    "\\/",
];

/// The needles that can start with `first` then `second`. Every needle starts with `"` or `\`
/// and no two share their first two bytes but `"container_upload"` and `"code_execution_`.
fn candidates(first: u8, second: u8) -> &'static [usize] {
    match (first, second) {
        (b'"', b't') => &[0],
        (b'"', b'u') => &[1],
        (b'"', b'f') => &[2],
        (b'"', b'c') => &[3, 5],
        (b'"', b'w') => &[4],
        (b'"', b'a') => &[6],
        (b'"', b'i') => &[7],
        (b'\\', b'u') => &[8],
        (b'\\', b'/') => &[9],
        _ => &[],
    }
}

/// Every needle in `body`, left to right and without overlap, as (needle, start, end): what a
/// multi-pattern automaton reports, since at most one needle starts at any byte. One `memchr2`
/// iterator over the two bytes needles start with, then a comparison at each hit.
fn needles(body: &[u8]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    // Hits inside a match just found (only its closing quote can be one) are passed over.
    let mut end = 0;
    memchr::memchr2_iter(b'"', b'\\', body).filter_map(move |start| {
        if start < end {
            return None;
        }
        let rest = &body[start..];
        let second = rest.get(1).copied().unwrap_or(0);
        let &i = candidates(rest[0], second).iter().find(|&&i| rest.starts_with(NEEDLES[i].as_bytes()))?;
        end = start + NEEDLES[i].len();
        Some((i, start, end))
    })
}

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
}

const URL_SOURCE: &str = "source.type = \"url\"";
const FILE_SOURCE: &str = "source.type = \"file\"";
const CONTAINER_UPLOAD: &str = "type = \"container_upload\"";
const SERVER_TOOL: &str = "tools[].type (a server tool)";

/// Scans a Messages body. `mcp_servers` comes from the top-level peek; `default_uses` is what
/// a server tool without `max_uses` is assumed to use.
pub fn scan(body: &[u8], mcp_servers: bool, default_uses: u64) -> Reach {
    let mut reach = Reach::default();
    if mcp_servers {
        reach.by_reference = Some("mcp_servers");
    }
    let mut server_tools = false;
    for (needle, start, end) in needles(body) {
        let typed = || is_type_value(body, start);
        match needle {
            0 => reach.cache_1h |= value_is(body, end, b"\"1h\""),
            1 if typed() => {
                reach.by_reference.get_or_insert(URL_SOURCE);
            }
            2 if typed() => {
                reach.by_reference.get_or_insert(FILE_SOURCE);
            }
            3 if typed() => {
                reach.by_reference.get_or_insert(CONTAINER_UPLOAD);
            }
            4 | 5 if typed() => server_tools = true,
            6 => reach.pdf = true,
            7 if typed() => reach.images += 1,
            8 if escapes_ascii(&body[end..]) => return walk(body, mcp_servers, default_uses),
            9 => return walk(body, mcp_servers, default_uses),
            _ => {}
        }
    }
    if server_tools {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default)]
            tools: Option<Vec<Value>>,
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(b) => add_server_tools(&mut reach, b.tools.as_deref().unwrap_or_default(), default_uses),
            // A duplicated key (the provider keeps the last): read it as the provider would.
            Err(_) => return walk(body, mcp_servers, default_uses),
        }
    }
    reach
}

/// Only whether some `cache_control` asks for a 1-hour TTL: the one fact pricing needs from a
/// request no budget applies to. One `memmem` pass, several times faster than [`scan`].
pub fn asks_one_hour_cache(body: &[u8]) -> bool {
    static TTL: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    let finder = TTL.get_or_init(|| memchr::memmem::Finder::new(b"\"ttl\""));
    finder.find_iter(body).any(|at| value_is(body, at + 5, b"\"1h\""))
}

/// `\u00XX` spelling a printable ASCII character. No common encoder writes those (they write
/// the character itself), but a client could, to hide a needle from the byte scan.
fn escapes_ascii(after: &[u8]) -> bool {
    matches!(after, [b'2'..=b'7', _, ..])
}

/// The slow, exact path for bodies that escape ASCII: the whole document, walked. Duplicate
/// keys keep their last value, as the provider's parser does.
fn walk(body: &[u8], mcp_servers: bool, default_uses: u64) -> Reach {
    let mut reach = Reach::default();
    if mcp_servers {
        reach.by_reference = Some("mcp_servers");
    }
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return reach;
    };
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
    reach
}

/// The bytes before `at`, skipping white space, are `"type":` (so the string at `at` is the
/// value of a `type` member).
fn is_type_value(body: &[u8], at: usize) -> bool {
    let before = trim_end(&body[..at]);
    match before.strip_suffix(b":") {
        Some(key) => trim_end(key).ends_with(b"\"type\""),
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

/// Sums the uses the `tools` allow to web search and web fetch, and notes any server tool (one
/// that runs at the provider and brings content back).
fn add_server_tools(reach: &mut Reach, tools: &[Value], default_uses: u64) {
    for t in tools {
        let Some(kind) = t.get("type").and_then(Value::as_str) else { continue };
        let uses = t.get("max_uses").and_then(Value::as_u64).unwrap_or(default_uses);
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

    #[test]
    fn each_needle_is_a_candidate_for_its_first_two_bytes() {
        for (i, n) in NEEDLES.iter().enumerate() {
            let b = n.as_bytes();
            assert!(candidates(b[0], b[1]).contains(&i), "{n}");
        }
        // And no two needles could match at one byte unless listed together.
        for (i, a) in NEEDLES.iter().enumerate() {
            for b in &NEEDLES[i + 1..] {
                assert!(!a.starts_with(b) && !b.starts_with(a), "{a} {b}");
            }
        }
    }

    proptest! {
        /// The scan finds what Aho-Corasick's standard non-overlapping search finds, on text
        /// made of needles, their pieces, quotes and backslashes.
        #[test]
        fn finds_what_an_automaton_finds(parts in proptest::collection::vec(0usize..24, 0..40)) {
            const PIECES: [&str; 14] = ["\"", "\\", "u", "00", "/", "t", "ttl", "web", "_", "co", "de", "x", " ", ":"];
            let body: String = parts
                .iter()
                .map(|&p| if p < NEEDLES.len() { NEEDLES[p] } else { PIECES[p - NEEDLES.len()] })
                .collect();
            let ac = aho_corasick::AhoCorasick::new(NEEDLES).unwrap();
            let want: Vec<_> = ac.find_iter(&body).map(|m| (m.pattern().as_usize(), m.start(), m.end())).collect();
            let got: Vec<_> = needles(body.as_bytes()).collect();
            prop_assert_eq!(got, want, "{:?}", body);
        }
    }

    #[test]
    fn a_plain_prompt_reaches_nothing() {
        // `"url"` and `"file_id"` here are schema keys and tool input, not sources; text that
        // mentions them has its quotes escaped.
        let body = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"fetch \"url\" and file_id"},
            {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"Read","input":{"file_id":"f1","url":"u"}}]}],
            "tools":[{"name":"WebFetch","input_schema":{"properties":{"url":{"type":"string"},"file_id":{"type":"string"}}}}]}"#;
        assert_eq!(scan(body, false, 10), Reach::default());
    }

    #[test]
    fn escaped_ascii_is_read_as_the_provider_reads_it() {
        let url = br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"t\u0079pe":"\u0075rl","url":"https:\/\/x"}}]}],
            "system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl":"1\u0068"}}]}"#;
        let r = scan(url, false, 10);
        assert_eq!((r.by_reference, r.images, r.cache_1h), (Some(URL_SOURCE), 1, true));
        let tool = br#"{"tools":[{"type":"web\u005fsearch_20250305","name":"web_search","max_uses":4}]}"#;
        assert_eq!(scan(tool, false, 10).web_searches, 4);
        // Non-ASCII escapes (what JSON.stringify writes for control characters) keep the fast path.
        let ansi = br#"{"messages":[{"role":"user","content":"\u001b[31mred"}]}"#;
        assert_eq!(scan(ansi, false, 10), Reach::default());
    }

    #[test]
    fn a_duplicated_max_uses_counts_as_the_provider_reads_it() {
        let body = br#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":2,"max_uses":500}]}"#;
        assert_eq!(scan(body, false, 10).web_searches, 500);
    }

    #[test]
    fn images_and_pdfs_are_counted() {
        let body = br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBO"}},
            {"type": "image","source":{"type":"base64","media_type":"image/png","data":"iVBO"}},
            {"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"JVBE"}}]}]}"#;
        let r = scan(body, false, 10);
        assert_eq!((r.images, r.pdf, r.by_reference), (2, true, None));
    }

    #[test]
    fn sources_by_reference() {
        let url = br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type" : "url","url":"https://x"}}]}]}"#;
        assert_eq!(scan(url, false, 10).by_reference, Some("source.type = \"url\""));
        let file =
            br#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"f"}}]}]}"#;
        assert_eq!(scan(file, false, 10).by_reference, Some("source.type = \"file\""));
        assert_eq!(scan(b"{}", true, 10).by_reference, Some("mcp_servers"));
    }

    #[test]
    fn server_tools_and_their_uses() {
        let body = br#"{"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5},
            {"type":"web_fetch_20250910","name":"web_fetch"},{"name":"web_search","input_schema":{}}]}"#;
        let r = scan(body, false, 7);
        assert_eq!((r.web_searches, r.web_fetches), (5, 7));
        assert!(r.by_reference.is_some());
        // A custom tool merely named like one is not a server tool.
        let custom = br#"{"tools":[{"name":"web_search_v2","type":"custom","input_schema":{}}]}"#;
        assert_eq!(scan(custom, false, 7), Reach::default());
    }

    #[test]
    fn one_hour_cache_writes() {
        let body = br#"{"system":[{"type":"text","text":"x","cache_control":{"type":"ephemeral","ttl": "1h"}}]}"#;
        assert!(scan(body, false, 0).cache_1h);
        assert!(asks_one_hour_cache(body));
        assert!(!asks_one_hour_cache(br#"{"cache_control":{"type":"ephemeral","ttl":"5m"}}"#));
        let five =
            br#"{"system":[{"type":"text","text":"\"ttl\": \"1h\"","cache_control":{"type":"ephemeral","ttl":"5m"}}]}"#;
        assert!(!scan(five, false, 0).cache_1h);
    }
}
