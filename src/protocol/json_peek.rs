//! A single pass over the top level of a JSON object that finds the byte spans of the fields the
//! gateway needs (`model`, `stream`, `max_tokens`, ...) without building a document.
//!
//! Why not serde: the gateway must forward the body byte-exact (prompt-cache prefixes depend on
//! it) and may only rewrite the `model` value in place, so it needs the value's span, not a tree.
//! Nested values are skipped with `memchr` over strings (where nearly all the bytes of a Claude
//! request are), checking that brackets balance and strings terminate. Deeper grammar mistakes
//! (a stray comma inside a tool schema) are left to the provider, which answers them with its own
//! 400 `invalid_request_error`.

use std::ops::Range;

use memchr::memchr2;

/// Nesting deeper than this below the top-level object is refused. serde_json reads at most 127
/// levels, the top-level object included; a body the peek passes must be one the exact readers
/// (the reference walk, the translations) can read too.
const MAX_DEPTH: usize = 126;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct JsonError {
    pub what: &'static str,
    pub at: usize,
}

fn err<T>(what: &'static str, at: usize) -> Result<T, JsonError> {
    Err(JsonError { what, at })
}

/// What a walk over the document can watch for besides the top-level members: every string at
/// any depth, keys included, and every escape inside one. The walk stops at both anyway, so a
/// caller looking for words in the body watches them here instead of scanning it again.
pub trait Watch {
    /// `span` is a string token, quotes included; called in document order.
    fn string(&mut self, body: &[u8], span: Range<usize>);
    /// `at` is the backslash of an escape inside a string (`\\` is one escape, not two).
    fn escape(&mut self, body: &[u8], at: usize);
}

/// Watches nothing; the walk compiles to what it would be without the hooks.
impl Watch for () {
    #[inline(always)]
    fn string(&mut self, _: &[u8], _: Range<usize>) {}
    #[inline(always)]
    fn escape(&mut self, _: &[u8], _: usize) {}
}

/// Calls `visit(key, value_span)` for every top-level member of the object in `body`.
/// Keys are passed unescaped. The whole input is checked for balanced structure.
pub fn scan_object(
    body: &[u8],
    mut visit: impl FnMut(&str, Range<usize>) -> Result<(), JsonError>,
) -> Result<(), JsonError> {
    scan_members(body, &mut (), |key, _member, value| visit(key, value))
}

/// Like [`scan_object`], with the span of the whole member (key to end of value) too, and
/// every string and escape shown to `watch`.
fn scan_members<W: Watch>(
    body: &[u8],
    watch: &mut W,
    mut visit: impl FnMut(&str, Range<usize>, Range<usize>) -> Result<(), JsonError>,
) -> Result<(), JsonError> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return err("expected a JSON object", i);
    }
    i = skip_ws(body, i + 1);
    if body.get(i) == Some(&b'}') {
        return finish(body, i + 1);
    }
    loop {
        if body.get(i) != Some(&b'"') {
            return err("expected a string key", i);
        }
        let key_start = i;
        let key_end = skip_string(body, i, watch)?;
        let raw_key = &body[i + 1..key_end - 1];
        let key_owned;
        let key = if raw_key.contains(&b'\\') {
            key_owned = serde_json::from_slice::<String>(&body[i..key_end])
                .map_err(|_| JsonError { what: "invalid escape in key", at: i })?;
            key_owned.as_str()
        } else {
            std::str::from_utf8(raw_key).map_err(|_| JsonError { what: "invalid UTF-8 in key", at: i })?
        };
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return err("expected ':' after key", i);
        }
        let start = skip_ws(body, i + 1);
        let end = skip_value(body, start, watch)?;
        visit(key, key_start..end, start..end)?;
        i = skip_ws(body, end);
        match body.get(i) {
            Some(b',') => i = skip_ws(body, i + 1),
            Some(b'}') => return finish(body, i + 1),
            _ => return err("expected ',' or '}'", i),
        }
    }
}

fn finish(body: &[u8], i: usize) -> Result<(), JsonError> {
    let j = skip_ws(body, i);
    if j != body.len() {
        return err("trailing characters after the object", j);
    }
    Ok(())
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(c) = b.get(i) {
        if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            break;
        }
        i += 1;
    }
    i
}

/// `i` is at an opening quote; returns the index just past the closing quote.
#[inline]
fn skip_string<W: Watch>(b: &[u8], i: usize, watch: &mut W) -> Result<usize, JsonError> {
    let mut j = i + 1;
    loop {
        match memchr2(b'"', b'\\', &b[j.min(b.len())..]) {
            Some(off) => {
                let k = j + off;
                if b[k] == b'"' {
                    watch.string(b, i..k + 1);
                    return Ok(k + 1);
                }
                watch.escape(b, k);
                // A backslash escapes exactly the next byte as far as finding the end goes
                // (`\uXXXX` continues with hex digits, never a quote).
                j = k + 2;
            }
            None => return err("unterminated string", i),
        }
    }
}

fn skip_value<W: Watch>(b: &[u8], i: usize, watch: &mut W) -> Result<usize, JsonError> {
    match b.get(i) {
        Some(b'"') => skip_string(b, i, watch),
        Some(b'{') | Some(b'[') => skip_nested(b, i, watch),
        Some(c) if c.is_ascii_digit() || matches!(c, b'-' | b't' | b'f' | b'n') => {
            let mut j = i;
            while let Some(c) = b.get(j) {
                if !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.')) {
                    break;
                }
                j += 1;
            }
            Ok(j)
        }
        Some(_) => err("expected a value", i),
        None => err("unexpected end of input", i),
    }
}

fn skip_nested<W: Watch>(b: &[u8], i: usize, watch: &mut W) -> Result<usize, JsonError> {
    let mut stack = [0u8; MAX_DEPTH];
    let mut depth = 0usize;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'"' => {
                j = skip_string(b, j, watch)?;
                continue;
            }
            open @ (b'{' | b'[') => {
                if depth == MAX_DEPTH {
                    return err("nesting too deep", j);
                }
                stack[depth] = if open == b'{' { b'}' } else { b']' };
                depth += 1;
            }
            close @ (b'}' | b']') => {
                if depth == 0 || stack[depth - 1] != close {
                    return err("mismatched bracket", j);
                }
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    err("unexpected end of input", j)
}

/// What the gateway reads from an Anthropic Messages request body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestPeek {
    /// The `model` value, unescaped, and the span of its JSON string (quotes included).
    pub model: Option<(String, Range<usize>)>,
    pub stream: bool,
    /// `max_tokens` when it is a whole number from 1 up; see `max_tokens_invalid`.
    pub max_tokens: Option<u64>,
    /// `max_tokens` is present but not a whole number from 1 to 2^64-1 (`-1`, `1.5`, `1e15`,
    /// `"x"`): the gateway refuses it rather than reserve a guess.
    pub max_tokens_invalid: bool,
    /// The span of the `metadata` object, if any (it may carry `user_id`).
    pub metadata: Option<Range<usize>>,
    /// `speed` is `"fast"`.
    pub fast: bool,
    /// The `inference_geo` value, when it is a string.
    pub inference_geo: Option<String>,
    /// `mcp_servers` is present and not empty.
    pub mcp_servers: bool,
}

/// Reads `model`, `stream` and `max_tokens`. A duplicated `model` is refused: providers keep the
/// last one, so letting it through would let a client pass one model to the gateway's checks and
/// another to the provider.
pub fn peek_request(body: &[u8]) -> Result<RequestPeek, JsonError> {
    peek_request_watching(body, &mut ())
}

/// [`peek_request`], showing `watch` every string and escape in the body on the way.
pub fn peek_request_watching(body: &[u8], watch: &mut impl Watch) -> Result<RequestPeek, JsonError> {
    let mut peek = RequestPeek::default();
    scan_members(body, watch, |key, _member, span| {
        match key {
            "model" => {
                if peek.model.is_some() {
                    return err("duplicate \"model\" field", span.start);
                }
                let raw = &body[span.clone()];
                if raw.first() != Some(&b'"') {
                    return err("\"model\" must be a string", span.start);
                }
                let value: String = serde_json::from_slice(raw)
                    .map_err(|_| JsonError { what: "invalid \"model\" string", at: span.start })?;
                peek.model = Some((value, span));
            }
            // `stream` informs metering; validating it is the provider's job. The last value
            // wins, as in the provider's parser.
            "stream" => peek.stream = &body[span] == b"true",
            "metadata" => peek.metadata = Some(span),
            "max_tokens" => {
                let raw = &body[span];
                // Digits only: a sign, a fraction or an exponent is not a token count.
                let digits = !raw.is_empty() && raw.iter().all(u8::is_ascii_digit);
                let n = digits.then(|| std::str::from_utf8(raw).ok()?.parse::<u64>().ok()).flatten();
                peek.max_tokens = n.filter(|n| *n >= 1);
                peek.max_tokens_invalid = peek.max_tokens.is_none();
            }
            // Read as the provider reads it: `"f\u0061st"` is fast too.
            "speed" => peek.fast = serde_json::from_slice::<String>(&body[span]).is_ok_and(|v| v == "fast"),
            "inference_geo" => peek.inference_geo = serde_json::from_slice::<String>(&body[span]).ok(),
            "mcp_servers" => {
                let raw = trim_ws(&body[span]);
                peek.mcp_servers = raw != b"null" && !(raw.starts_with(b"[") && trim_ws(&raw[1..]) == b"]");
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(peek)
}

fn trim_ws(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// Rebuilds the top-level object of `body` without the members named in `drop` and with the
/// `add` members (name, raw JSON value) appended; the kept members are copied byte for byte.
/// This is how a body moves between API envelopes (Bedrock and Vertex keep the model in the
/// URL and the version in the body).
pub fn rewrite_members(body: &[u8], drop: &[&str], add: &[(&str, &[u8])]) -> Result<bytes::Bytes, JsonError> {
    let mut out = bytes::BytesMut::with_capacity(body.len() + 64);
    out.extend_from_slice(b"{");
    let mut first = true;
    scan_members(body, &mut (), |key, member, _| {
        if !drop.contains(&key) {
            if !first {
                out.extend_from_slice(b",");
            }
            out.extend_from_slice(&body[member]);
            first = false;
        }
        Ok(())
    })?;
    for (name, value) in add {
        if !first {
            out.extend_from_slice(b",");
        }
        out.extend_from_slice(serde_json::to_string(name).expect("a string serializes").as_bytes());
        out.extend_from_slice(b":");
        out.extend_from_slice(value);
        first = false;
    }
    out.extend_from_slice(b"}");
    Ok(out.freeze())
}

/// Returns `body` with the bytes in `span` replaced by `new_model` as a JSON string; everything
/// else is copied as it was.
pub fn replace_string_value(body: &[u8], span: Range<usize>, new_value: &str) -> bytes::Bytes {
    let quoted = serde_json::to_string(new_value).expect("a string always serializes");
    let mut out = bytes::BytesMut::with_capacity(body.len() - span.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_and_spans() {
        let body = br#" {"max_tokens": 64000, "messages":[{"role":"user","content":"a \"model\": x}"}],
            "model" : "claude-sonnet-4-5", "stream":true, "metadata":{"user_id":"{\"a\":1}"}} "#;
        let p = peek_request(body).unwrap();
        let (model, span) = p.model.unwrap();
        assert_eq!(model, "claude-sonnet-4-5");
        assert_eq!(&body[span], br#""claude-sonnet-4-5""#);
        assert!(p.stream);
        assert_eq!(p.max_tokens, Some(64000));
    }

    #[test]
    fn escaped_key_is_still_model() {
        let body = br#"{"mod\u0065l":"a","model":"b"}"#;
        assert_eq!(peek_request(body).unwrap_err().what, "duplicate \"model\" field");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b""[..],
            b"[]",
            b"{",
            b"{\"model\":\"a\"",
            b"{\"model\":\"a\",}",
            b"{\"model\":\"a\"} x",
            b"{\"a\":[1,2}",
            b"{\"a\":\"unterminated}",
            b"{\"model\":5}",
        ] {
            assert!(peek_request(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn nesting_stops_where_serde_json_stops() {
        let nested = |levels: usize| format!("{{\"a\":{}{}}}", "[".repeat(levels), "]".repeat(levels));
        let deepest = nested(MAX_DEPTH);
        assert!(peek_request(deepest.as_bytes()).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&deepest).is_ok());
        let deeper = nested(MAX_DEPTH + 1);
        assert_eq!(peek_request(deeper.as_bytes()).unwrap_err().what, "nesting too deep");
        assert!(serde_json::from_str::<serde_json::Value>(&deeper).is_err());
    }

    #[test]
    fn rewrite_touches_only_the_value() {
        let body = br#"{"model":"sonnet","messages":[]}"#;
        let p = peek_request(body).unwrap();
        let out = replace_string_value(body, p.model.unwrap().1, "claude-sonnet-4-5-20250929");
        assert_eq!(&out[..], br#"{"model":"claude-sonnet-4-5-20250929","messages":[]}"#);
    }
}
