//! Errors the gateway answers itself, in the Anthropic shape:
//! `{"type":"error","error":{"type":"…","message":"…"}}`.

use bytes::Bytes;
use pingora::http::ResponseHeader;

use crate::config::ProviderKind;
use crate::metering::Outcome;
use crate::protocol::inbound::Format;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// Anthropic's error type for the status (`invalid_request_error`, ...).
    pub kind: &'static str,
    pub message: String,
    pub outcome: Outcome,
    /// Close the client connection after answering (the request body was not read).
    pub close: bool,
    /// Extra response headers (`retry-after`, `anthropic-ratelimit-*`).
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>, outcome: Outcome) -> Self {
        ApiError { status, kind, message: message.into(), outcome, close: false, headers: Vec::new() }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message, Outcome::Rejected)
    }
    pub fn authentication(message: impl Into<String>) -> Self {
        Self::new(401, "authentication_error", message, Outcome::Rejected)
    }
    pub fn permission(message: impl Into<String>) -> Self {
        Self::new(403, "permission_error", message, Outcome::Rejected)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "not_found_error", message, Outcome::Rejected)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "invalid_request_error", message, Outcome::Rejected)
    }
    /// The client sent too slowly; the connection closes (what is left of the body is unread).
    pub fn request_timeout(message: impl Into<String>) -> Self {
        let mut e = Self::new(408, "invalid_request_error", message, Outcome::Rejected);
        e.close = true;
        e
    }
    pub fn uri_too_long(message: impl Into<String>) -> Self {
        Self::new(414, "invalid_request_error", message, Outcome::Rejected)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        let mut e = Self::new(413, "request_too_large", message, Outcome::Rejected);
        e.close = true;
        e
    }
    /// The gateway could not reach or use the provider.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "api_error", message, Outcome::Failed)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "api_error", message, Outcome::Failed)
    }
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, "api_error", message, Outcome::Failed)
    }

    /// A budget or rate limit said no: 429 `rate_limit_error` with `retry-after` when it frees
    /// up by itself, 403 `permission_error` when the budget is spent until it resets, 503
    /// `api_error` when the limiter itself could not answer (a shared one unreachable).
    pub fn refused(r: crate::limits::Refusal) -> Self {
        let (kind, outcome) = match r.status {
            429 => ("rate_limit_error", Outcome::Rejected),
            503 => ("api_error", Outcome::Failed),
            _ => ("permission_error", Outcome::Rejected),
        };
        let mut e = Self::new(r.status, kind, r.message, outcome);
        e.headers = r.headers;
        if let Some(wait) = r.retry_after {
            // Whole seconds, rounded up: a client retrying early is refused again.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            e.headers.push(("retry-after".into(), secs.to_string()));
        }
        e
    }

    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "type": "error",
            "error": { "type": self.kind, "message": self.message },
        });
        Bytes::from(serde_json::to_vec(&v).expect("JSON values serialize"))
    }

    /// The answer in the client's format: header and body.
    pub fn answer(&self, format: Format, request_id: &str) -> (ResponseHeader, Bytes) {
        let shaped = for_client(format, self.status, self.body());
        (shaped.header(request_id, &self.headers, self.close), shaped.body)
    }
}

/// A body the JSON scanner could not read: the client's mistake, said with where it is.
impl From<crate::protocol::json_peek::JsonError> for ApiError {
    fn from(e: crate::protocol::json_peek::JsonError) -> Self {
        ApiError::invalid_request(format!("the body is not valid JSON: {e}"))
    }
}

/// Whether a provider answers in the client's own format: its errors then reach the client
/// unmodified (clients match on the provider's wording).
pub fn same_format(format: Format, kind: ProviderKind) -> bool {
    matches!(
        (format, kind),
        (Format::Anthropic, ProviderKind::Anthropic)
            | (Format::Bedrock, ProviderKind::Bedrock)
            | (Format::Vertex, ProviderKind::Vertex)
    )
}

/// An error answer in the client's format, from an Anthropic-shaped body: as it is for a
/// Messages client; for a Bedrock client, Bedrock's status, `x-amzn-errortype` and
/// `{"message"}`; for a Vertex client, Google's `{"error": {code, message, status}}`.
pub struct Shaped {
    pub status: u16,
    pub body: Bytes,
    pub errortype: Option<&'static str>,
}

pub fn for_client(format: Format, status: u16, anthropic: Bytes) -> Shaped {
    match format {
        Format::Anthropic => Shaped { status, body: anthropic, errortype: None },
        Format::Bedrock => {
            let (status, exception, body) = crate::protocol::bedrock::error_from_anthropic(status, &anthropic);
            Shaped { status, body, errortype: Some(exception) }
        }
        Format::Vertex => {
            Shaped { status, body: crate::protocol::vertex::error_from_anthropic(status, &anthropic), errortype: None }
        }
    }
}

impl Shaped {
    /// The response header: JSON, the gateway's request ids, and `x-amzn-errortype` for Bedrock.
    pub fn header(&self, request_id: &str, extra: &[(String, String)], close: bool) -> ResponseHeader {
        let mut h = ResponseHeader::build(self.status, Some(6 + extra.len())).expect("valid status");
        let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = h.insert_header(http::header::CONTENT_LENGTH, self.body.len());
        let _ = h.insert_header("request-id", request_id);
        let _ = h.insert_header(super::headers::REQUEST_ID_HEADER, request_id);
        if let Some(t) = self.errortype {
            let _ = h.insert_header("x-amzn-errortype", t);
        }
        if close {
            let _ = h.insert_header(http::header::CONNECTION, "close");
        }
        for (name, value) in extra {
            let _ = h.insert_header(name.clone(), value.as_str());
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_shape() {
        let e = ApiError::not_found("model: claude-nope");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","error":{"type":"not_found_error","message":"model: claude-nope"}})
        );
    }
}
