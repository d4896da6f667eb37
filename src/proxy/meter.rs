//! Reads usage from a provider's response as it streams past.

use pingora::http::ResponseHeader;

use crate::protocol::sse::SseUsageScanner;
use crate::protocol::usage::{usage_from_json, Usage};

/// A JSON answer larger than this is passed on but not metered (none comes close).
const MAX_JSON_METERED: usize = 32 << 20;

pub enum ResponseMeter {
    Sse(SseUsageScanner),
    Json {
        buf: Vec<u8>,
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
}

impl ResponseMeter {
    pub fn for_response(resp: &ResponseHeader, metered: bool) -> Self {
        let is_sse = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        if is_sse {
            ResponseMeter::Sse(SseUsageScanner::new())
        } else if metered || !resp.status.is_success() {
            // Error bodies are read too, for the error type.
            ResponseMeter::Json { buf: Vec::new(), overflow: false }
        } else {
            ResponseMeter::Off
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            ResponseMeter::Sse(s) => s.feed(chunk),
            ResponseMeter::Json { buf, overflow } => {
                if buf.len() + chunk.len() > MAX_JSON_METERED {
                    *overflow = true;
                    buf.clear();
                } else if !*overflow {
                    buf.extend_from_slice(chunk);
                }
            }
            ResponseMeter::Off => {}
        }
    }

    pub fn finish(self) -> Metered {
        match self {
            ResponseMeter::Sse(s) => {
                Metered { usage: s.usage(), complete: s.completed(), error_type: s.error_type().map(str::to_string) }
            }
            ResponseMeter::Json { buf, overflow: false } => match usage_from_json(&buf) {
                Some((usage, error_type)) => Metered { usage, complete: true, error_type },
                None => Metered::default(),
            },
            ResponseMeter::Json { overflow: true, .. } => Metered::default(),
            ResponseMeter::Off => Metered { complete: true, ..Default::default() },
        }
    }
}
