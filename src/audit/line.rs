//! A usage record as one JSON line, written field by field.
//!
//! The writer thread turns every request into a line, on the same cores as the proxy. Going
//! through serde cost about 13,000 instructions a line, half of it escaping strings one byte at
//! a time; this writer checks eight bytes at a step and copies clean strings whole. The output
//! is byte for byte what `serde_json` makes of the record's `Serialize` derive (the tests hold
//! the two together), so readers of the log see no change.

use std::io::Write;

use crate::metering::{AttemptRecord, UsageRecord};
use crate::protocol::usage::{Speed, Usage};

/// Appends `r` as JSON (no newline) to `out`.
pub fn usage_record(r: &UsageRecord, out: &mut Vec<u8>) {
    let mut o = Object::open(out);
    o.str("request_id", &r.request_id);
    o.key("time");
    o.out.push(b'"');
    let _ = write!(o.out, "{}", humantime::format_rfc3339_millis(r.time));
    o.out.push(b'"');
    o.opt_str("key_id", r.key_id.as_deref());
    o.opt_str("user", r.user.as_deref());
    o.opt_str("team", r.team.as_deref());
    o.opt_str("auth", r.auth);
    o.str("format", r.format.as_str());
    o.opt_str("jwt_issuer", r.jwt_issuer.as_deref());
    o.opt_str("jwt_kid", r.jwt_kid.as_deref());
    o.opt_str("client_ip", r.client_ip.as_deref());
    o.opt_str("user_agent", r.user_agent.as_deref());
    o.opt_str("session_id", r.session_id.as_deref());
    o.str("method", &r.method);
    o.str("path", &r.path);
    o.opt_str("requested_model", r.requested_model.as_deref());
    o.opt_str("model", r.model.as_deref());
    o.opt_str("provider", r.provider.as_deref());
    o.opt_str("provider_model", r.provider_model.as_deref());
    if let Some(s) = r.upstream_status {
        o.uint("upstream_status", s.into());
    }
    o.uint("status", r.status.into());
    o.bool("stream", r.stream);
    o.key("usage");
    usage(&r.usage, o.out);
    o.uint("cost_nanos", r.cost_nanos);
    o.float("cost_usd", r.cost_usd);
    o.bool("priced", r.priced);
    o.opt_str("usage_estimated", r.usage_estimated.map(|e| e.as_str()));
    o.float("latency_ms", r.latency_ms);
    if let Some(t) = r.ttfb_ms {
        o.float("ttfb_ms", t);
    }
    o.str("outcome", r.outcome.as_str());
    o.opt_str("error", r.error.as_deref());
    o.key("attempts");
    o.out.push(b'[');
    for (i, a) in r.attempts.iter().enumerate() {
        if i > 0 {
            o.out.push(b',');
        }
        attempt(a, o.out);
    }
    o.out.push(b']');
    o.close();
}

fn usage(u: &Usage, out: &mut Vec<u8>) {
    let mut o = Object::open(out);
    o.uint("input_tokens", u.input_tokens);
    o.uint("output_tokens", u.output_tokens);
    o.uint("cache_read_input_tokens", u.cache_read_input_tokens);
    o.uint("cache_creation_input_tokens", u.cache_creation_input_tokens);
    o.uint("cache_creation_5m_input_tokens", u.cache_creation_5m_input_tokens);
    o.uint("cache_creation_1h_input_tokens", u.cache_creation_1h_input_tokens);
    if u.speed == Speed::Fast {
        o.str("speed", "fast");
    }
    if !u.inference_geo.is_empty() {
        o.str("inference_geo", u.inference_geo.as_str());
    }
    for (name, n) in [
        ("web_search_requests", u.web_search_requests),
        ("web_fetch_requests", u.web_fetch_requests),
        ("cache_writes_unsplit", u.cache_writes_unsplit),
    ] {
        if n != 0 {
            o.uint(name, n);
        }
    }
    o.close();
}

fn attempt(a: &AttemptRecord, out: &mut Vec<u8>) {
    let mut o = Object::open(out);
    o.str("provider", &a.provider);
    o.str("endpoint", &a.endpoint);
    o.str("model", &a.model);
    if let Some(s) = a.status {
        o.uint("status", s.into());
    }
    o.float("latency_ms", a.latency_ms);
    o.opt_str("abandoned", a.abandoned.as_deref());
    if a.may_be_billed {
        o.bool("may_be_billed", true);
    }
    o.close();
}

/// An object being written: commas between members, keys written as they come.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, first: true }
    }

    fn close(self) {
        self.out.push(b'}');
    }

    /// Keys are the record's own field names: plain ASCII, never escaped.
    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        string(v, self.out);
    }

    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.str(k, v);
        }
    }

    fn uint(&mut self, k: &str, v: u64) {
        self.key(k);
        self.out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
    }

    /// As serde_json (which formats with zmij): the shortest round-trip form, `null` when not
    /// finite.
    fn float(&mut self, k: &str, v: f64) {
        self.key(k);
        if v.is_finite() {
            self.out.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
        } else {
            self.out.extend_from_slice(b"null");
        }
    }
}

/// A JSON string, escaped as serde_json escapes: `"`, `\` and control characters.
fn string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    while let Some(at) = next_escape(bytes, start) {
        out.extend_from_slice(&bytes[start..at]);
        let b = bytes[at];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
            }
        }
        start = at + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The first byte at or after `from` that JSON needs escaped, eight bytes at a step.
fn next_escape(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero when some byte of `w` is below `n` (n <= 128): the classic bit trick.
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * n as u64) & !w & HIGHS;
    let mut i = from;
    while i + 8 <= bytes.len() {
        let w = u64::from_ne_bytes(bytes[i..i + 8].try_into().expect("eight bytes"));
        if below(w, 0x20) | below(w ^ (ONES * b'"' as u64), 1) | below(w ^ (ONES * b'\\' as u64), 1) != 0 {
            break;
        }
        i += 8;
    }
    bytes[i..].iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\').map(|p| i + p)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::metering::{Estimate, Outcome};
    use crate::protocol::inbound::Format;
    use crate::protocol::usage::Tag;

    fn serde_line(r: &UsageRecord) -> String {
        serde_json::to_string(r).unwrap()
    }

    fn ours(r: &UsageRecord) -> String {
        let mut out = Vec::new();
        usage_record(r, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn minimal() -> UsageRecord {
        UsageRecord {
            request_id: "req_019ada5b2e7b0123456789abcdef0123".into(),
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_000_000_123),
            key_id: None,
            user: None,
            team: None,
            auth: None,
            format: Format::Anthropic,
            jwt_issuer: None,
            jwt_kid: None,
            client_ip: None,
            user_agent: None,
            session_id: None,
            method: "POST".into(),
            path: "/v1/messages".into(),
            requested_model: None,
            model: None,
            provider: None,
            provider_model: None,
            upstream_status: None,
            status: 401,
            stream: false,
            usage: Usage::default(),
            cost_nanos: 0,
            cost_usd: 0.0,
            priced: false,
            usage_estimated: None,
            latency_ms: 0.25,
            ttfb_ms: None,
            outcome: Outcome::Rejected,
            error: None,
            attempts: Vec::new(),
        }
    }

    fn full() -> UsageRecord {
        let usage = Usage {
            input_tokens: 1_234,
            output_tokens: 56,
            cache_read_input_tokens: 7,
            cache_creation_input_tokens: 8,
            cache_creation_5m_input_tokens: 3,
            cache_creation_1h_input_tokens: 5,
            speed: Speed::Fast,
            inference_geo: Tag::new("us"),
            web_search_requests: 2,
            web_fetch_requests: 1,
            cache_writes_unsplit: u64::MAX,
        };
        UsageRecord {
            key_id: Some("k-1".into()),
            user: Some("ana@example.com".into()),
            team: Some("platform".into()),
            auth: Some("jwt"),
            format: Format::Bedrock,
            jwt_issuer: Some("https://idp.example.com/".into()),
            jwt_kid: Some("kid-7".into()),
            client_ip: Some("2001:db8::1".into()),
            user_agent: Some("claude-cli/2.1.332 (external, cli) \"quoted\" back\\slash".into()),
            session_id: Some("5b0c2a8e-0f1d-4c2b-9a77-1c2d3e4f5a6b".into()),
            requested_model: Some("us.anthropic.claude-sonnet-4-5".into()),
            model: Some("claude-sonnet-4-5".into()),
            provider: Some("bedrock-east".into()),
            provider_model: Some("anthropic.claude-sonnet-4-5-20250929-v1:0".into()),
            upstream_status: Some(200),
            status: 200,
            stream: true,
            usage,
            cost_nanos: 12_345_678,
            cost_usd: 0.012345678,
            priced: true,
            usage_estimated: Some(Estimate::StreamedContent),
            latency_ms: 1234.5678,
            ttfb_ms: Some(f64::NAN),
            outcome: Outcome::Incomplete,
            error: Some("upstream broke off:\n\tline\r\u{1}\u{7f}\u{8}\u{c} é ✓ 🦀 \u{1f}".into()),
            attempts: vec![
                AttemptRecord {
                    provider: "anthropic".into(),
                    endpoint: "https://api.anthropic.com".into(),
                    model: "claude-sonnet-4-5".into(),
                    status: Some(529),
                    latency_ms: 12.0,
                    abandoned: Some("overloaded".into()),
                    may_be_billed: true,
                    started: None,
                },
                AttemptRecord {
                    provider: "bedrock-east".into(),
                    endpoint: "https://bedrock-runtime.us-east-1.amazonaws.com".into(),
                    model: "m".into(),
                    status: None,
                    latency_ms: f64::INFINITY,
                    abandoned: None,
                    may_be_billed: false,
                    started: None,
                },
            ],
            ..minimal()
        }
    }

    #[test]
    fn lines_are_what_serde_writes() {
        for r in [minimal(), full()] {
            assert_eq!(ours(&r), serde_line(&r));
        }
        let vertex = UsageRecord { format: Format::Vertex, ..minimal() };
        assert_eq!(ours(&vertex), serde_line(&vertex));
        let mut r = full();
        r.usage.speed = Speed::Standard;
        r.usage.inference_geo = Tag::default();
        r.attempts.truncate(0);
        r.cost_usd = 1e-12;
        r.latency_ms = 3e21;
        assert_eq!(ours(&r), serde_line(&r));
    }

    #[test]
    fn every_byte_escapes_as_serde_escapes_it() {
        // Each ASCII byte at each position of an eight-byte step, so both scans see it.
        for b in 0u8..128 {
            for pad in 0..9 {
                let s = format!("{}{}{}", "a".repeat(pad), b as char, "z".repeat(9 - pad));
                let mut out = Vec::new();
                string(&s, &mut out);
                assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap(), "byte {b} at {pad}");
            }
        }
    }
}
