//! Reads usage from a provider's response as it streams past.

use crate::protocol::sse::SseUsageScanner;
use crate::protocol::usage::{usage_from_json, Usage};

/// A JSON answer larger than this is not kept whole (none comes close); its usage is read from
/// its last `TAIL` bytes, where the Messages API puts it.
const MAX_JSON_METERED: usize = 32 << 20;
const TAIL: usize = 64 << 10;

pub enum ResponseMeter {
    Sse(SseUsageScanner),
    Json {
        buf: Vec<u8>,
        /// Past `MAX_JSON_METERED`: `buf` holds only the answer's last bytes.
        overflow: bool,
    },
    /// Nothing to meter (e.g. `count_tokens`, which is free).
    Off,
}

/// What metering found once the response ended.
#[derive(Debug, Default)]
pub struct Metered {
    pub usage: Usage,
    /// For streams: `message_stop` was seen. Always true for JSON answers that parsed.
    pub complete: bool,
    /// `error.type` from an error body or an SSE `error` event.
    pub error_type: Option<String>,
    /// The provider's own final count is in `usage`. False when the answer ended before it
    /// (a cut stream) or never carried one.
    pub final_usage: bool,
    /// For a stream without its final count: an upper bound of the output tokens streamed.
    pub output_bound: Option<u64>,
}

impl ResponseMeter {
    /// The meter for an answer: SSE (`sse`, as the meter sees it after any decoding), else a
    /// JSON body when it is metered or an error (read for its error type), else none.
    pub fn for_response(sse: bool, success: bool, metered: bool) -> Self {
        if sse {
            ResponseMeter::Sse(SseUsageScanner::new())
        } else if metered || !success {
            ResponseMeter::Json { buf: Vec::new(), overflow: false }
        } else {
            ResponseMeter::Off
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            ResponseMeter::Sse(s) => s.feed(chunk),
            ResponseMeter::Json { buf, overflow } => {
                if !*overflow && buf.len() + chunk.len() > MAX_JSON_METERED {
                    *overflow = true;
                }
                buf.extend_from_slice(chunk);
                if *overflow && buf.len() > TAIL {
                    buf.drain(..buf.len() - TAIL);
                }
            }
            ResponseMeter::Off => {}
        }
    }

    pub fn finish(self) -> Metered {
        match self {
            ResponseMeter::Sse(s) => Metered {
                usage: s.usage(),
                complete: s.completed(),
                error_type: s.error_type().map(str::to_string),
                final_usage: s.has_final_usage(),
                output_bound: Some(s.output_upper_bound()),
            },
            ResponseMeter::Json { buf, overflow: false } => match usage_from_json(&buf) {
                Some((usage, error_type)) => {
                    let final_usage = !usage.is_zero() || error_type.is_some();
                    Metered { usage, complete: true, error_type, final_usage, output_bound: None }
                }
                None => Metered::default(),
            },
            ResponseMeter::Json { buf, overflow: true } => match usage_from_tail(&buf) {
                Some(usage) => Metered { usage, complete: true, final_usage: true, ..Default::default() },
                None => Metered { complete: true, ..Default::default() },
            },
            ResponseMeter::Off => Metered { complete: true, final_usage: true, ..Default::default() },
        }
    }
}

/// The last `"usage"` member in the tail of a JSON answer: the top-level one, which the Messages
/// API writes after the content. (Keys inside content strings are escaped and cannot match.)
fn usage_from_tail(tail: &[u8]) -> Option<Usage> {
    let at = memchr::memmem::rfind(tail, b"\"usage\"")?;
    let rest = &tail[at + b"\"usage\"".len()..];
    let colon = rest.iter().position(|c| !c.is_ascii_whitespace())?;
    let rest = rest[colon..].strip_prefix(b":")?;
    let json: crate::protocol::usage::UsageJson =
        serde_json::Deserializer::from_slice(rest).into_iter().next()?.ok()?;
    let mut usage = Usage::default();
    usage.apply(&json);
    Some(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_answer_is_metered_from_its_tail() {
        let mut m = ResponseMeter::for_response(false, true, true);
        let text = "x".repeat(MAX_JSON_METERED + 100);
        m.feed(b"{\"content\":[{\"type\":\"text\",\"text\":\"");
        for chunk in text.as_bytes().chunks(1 << 20) {
            m.feed(chunk);
        }
        m.feed(b"\"}],\"usage\": {\"input_tokens\":7,\"output_tokens\":9000}}");
        let got = m.finish();
        assert!(got.final_usage);
        assert_eq!((got.usage.input_tokens, got.usage.output_tokens), (7, 9000));
    }
}
