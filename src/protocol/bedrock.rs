//! The Bedrock InvokeModel envelope around an Anthropic Messages body, and its stream framing.
//!
//! Bedrock takes the model in the URL (`/model/{id}/invoke`, or `invoke-with-response-stream`
//! for a stream) and the body without `model` and `stream`, with `anthropic_version`
//! (`bedrock-2023-05-31`) and the betas as an `anthropic_beta` array. Answers are the same
//! Messages JSON; a stream is AWS event-stream frames whose `chunk` events carry each SSE event's
//! JSON, base64-encoded, in `{"bytes": ...}`. Errors are `{"message": ...}`.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

use super::eventstream::{Decoder, FrameError};
use super::json_peek::{rewrite_members, scan_object, JsonError};

pub const BEDROCK_VERSION: &str = "bedrock-2023-05-31";

/// The Bedrock body for an Anthropic Messages body: `model` and `stream` leave (they are in the
/// URL), `anthropic_version` and the `anthropic-beta` header's values come in unless the body
/// already has them. Everything else is copied as it came.
pub fn request_body(body: &[u8], beta_header: Option<&str>) -> Result<Bytes, JsonError> {
    let (mut has_version, mut has_beta) = (false, false);
    scan_object(body, |key, _| {
        has_version |= key == "anthropic_version";
        has_beta |= key == "anthropic_beta";
        Ok(())
    })?;
    let version = serde_json::to_vec(BEDROCK_VERSION).expect("a string serializes");
    let betas: Vec<&str> =
        beta_header.iter().flat_map(|h| h.split(',')).map(str::trim).filter(|b| !b.is_empty()).collect();
    let betas = serde_json::to_vec(&betas).expect("strings serialize");
    let mut add: Vec<(&str, &[u8])> = Vec::new();
    if !has_version {
        add.push(("anthropic_version", &version));
    }
    if !has_beta && beta_header.is_some_and(|h| !h.trim().is_empty()) {
        add.push(("anthropic_beta", &betas));
    }
    rewrite_members(body, &["model", "stream"], &add)
}

/// Characters of a model id (or inference-profile ARN) that stay as they are in the path.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// `/model/{id}/invoke` or `/model/{id}/invoke-with-response-stream`, the id percent-encoded
/// (ids carry `:`, ARNs `/`).
pub fn invoke_path(model_id: &str, stream: bool) -> String {
    let mut path = String::from("/model/");
    for b in model_id.bytes() {
        if unreserved(b) {
            path.push(b as char);
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path.push_str(if stream { "/invoke-with-response-stream" } else { "/invoke" });
    path
}

/// The Anthropic error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_json(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}))
        .expect("JSON values serialize")
}

/// A Bedrock error body (`{"message": ...}`) in the Anthropic shape; a body that already has it
/// passes as it is.
pub fn anthropic_error(status: u16, body: &[u8]) -> Bytes {
    #[derive(Deserialize)]
    struct BedrockError {
        message: Option<String>,
        #[serde(rename = "Message")]
        message_upper: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    match serde_json::from_slice::<BedrockError>(body) {
        Ok(e) if e.kind.as_deref() == Some("error") => Bytes::copy_from_slice(body),
        Ok(e) => {
            let message = e.message.or(e.message_upper).unwrap_or_else(|| format!("Bedrock answered {status}"));
            Bytes::from(error_json(error_type(status), &message))
        }
        Err(_) => Bytes::from(error_json(error_type(status), &format!("Bedrock answered {status}"))),
    }
}

/// An Anthropic error body as Bedrock answers it, for a Bedrock client (boto3, Claude Code on
/// Bedrock): the status, the exception name for `x-amzn-errortype` (what boto3 turns into its
/// exception class), and `{"message": ...}`.
pub fn error_from_anthropic(status: u16, body: &[u8]) -> (u16, &'static str, Bytes) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message =
        v["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| format!("the gateway answered {status}"));
    let (status, exception) = match (status, v["error"]["type"].as_str()) {
        (429, _) | (_, Some("rate_limit_error")) => (429, "ThrottlingException"),
        (529, _) | (503, _) | (_, Some("overloaded_error")) => (503, "ServiceUnavailableException"),
        (401 | 403, _) => (403, "AccessDeniedException"),
        (404, _) => (404, "ResourceNotFoundException"),
        (408 | 504, _) => (408, "ModelTimeoutException"),
        (400..=499, _) => (status, "ValidationException"),
        _ => (500, "InternalServerException"),
    };
    let body = serde_json::to_vec(&serde_json::json!({ "message": message })).expect("JSON values serialize");
    (status, exception, Bytes::from(body))
}

/// The Anthropic error type of a Bedrock stream exception.
fn exception_type(exception: &str) -> &'static str {
    match exception {
        "throttlingException" => "rate_limit_error",
        "validationException" => "invalid_request_error",
        "serviceUnavailableException" => "overloaded_error",
        "accessDeniedException" => "permission_error",
        _ => "api_error",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("a Bedrock stream chunk is not valid: {0}")]
    Chunk(String),
}

/// Turns a Bedrock event stream into the SSE stream the Messages API sends: one SSE event per
/// `chunk` frame, and an SSE `error` event for an exception frame.
#[derive(Default)]
pub struct StreamToSse {
    decoder: Decoder,
}

impl StreamToSse {
    pub fn new() -> Self {
        StreamToSse::default()
    }

    /// The SSE bytes for every frame completed by `chunk` (possibly none).
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, TranscodeError> {
        #[derive(Deserialize)]
        struct Chunk {
            bytes: String,
        }
        #[derive(Deserialize)]
        struct Event {
            #[serde(rename = "type")]
            kind: String,
        }
        #[derive(Deserialize)]
        struct Exception {
            message: Option<String>,
            #[serde(rename = "Message")]
            message_upper: Option<String>,
        }
        self.decoder.feed(chunk);
        let mut out = BytesMut::new();
        while let Some(frame) = self.decoder.next_frame()? {
            match frame.header(":message-type") {
                Some("event") if frame.header(":event-type") == Some("chunk") => {
                    let c: Chunk =
                        serde_json::from_slice(&frame.payload).map_err(|e| TranscodeError::Chunk(e.to_string()))?;
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(c.bytes.as_bytes())
                        .map_err(|e| TranscodeError::Chunk(e.to_string()))?;
                    let event: Event =
                        serde_json::from_slice(&data).map_err(|e| TranscodeError::Chunk(e.to_string()))?;
                    out.put_slice(b"event: ");
                    out.put_slice(event.kind.as_bytes());
                    // One `data:` line per line of the JSON (providers send it on one line).
                    for line in data.split(|&b| b == b'\n') {
                        out.put_slice(b"\ndata: ");
                        out.put_slice(line.strip_suffix(b"\r").unwrap_or(line));
                    }
                    out.put_slice(b"\n\n");
                }
                // Other events (none today) carry nothing a Messages client knows.
                Some("event") => {}
                Some("exception") | Some("error") => {
                    let exception = frame.header(":exception-type").or(frame.header(":error-code")).unwrap_or("");
                    let e: Option<Exception> = serde_json::from_slice(&frame.payload).ok();
                    let message = e
                        .and_then(|e| e.message.or(e.message_upper))
                        .unwrap_or_else(|| format!("Bedrock stream error {exception}"));
                    out.put_slice(b"event: error\ndata: ");
                    out.put_slice(&error_json(exception_type(exception), &message));
                    out.put_slice(b"\n\n");
                }
                _ => {}
            }
        }
        Ok(out.freeze())
    }
}

/// The CountTokens body for a Bedrock InvokeModel body (which travels base64-encoded inside).
/// A token-count request has no `max_tokens`, which an InvokeModel body must have: it gets one.
pub fn count_tokens_body(invoke_body: &[u8]) -> Bytes {
    let mut has_max = false;
    let _ = scan_object(invoke_body, |key, _| {
        has_max |= key == "max_tokens";
        Ok(())
    });
    let completed;
    let invoke_body = if has_max {
        invoke_body
    } else {
        completed = rewrite_members(invoke_body, &[], &[("max_tokens", b"1")]).unwrap_or_default();
        &completed[..]
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(invoke_body);
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"input": {"invokeModel": {"body": b64}}}))
            .expect("JSON values serialize"),
    )
}

/// `/model/{id}/count-tokens`.
pub fn count_tokens_path(model_id: &str) -> String {
    invoke_path(model_id, false).replace("/invoke", "/count-tokens")
}

/// The InvokeModel body inside a Bedrock CountTokens request
/// (`{"input": {"invokeModel": {"body": "<base64>"}}}`).
pub fn count_tokens_inner(body: &[u8]) -> Result<Vec<u8>, JsonError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| JsonError { what: "not JSON", at: 0 })?;
    let b64 = v["input"]["invokeModel"]["body"]
        .as_str()
        .ok_or(JsonError { what: "input.invokeModel.body (a base64 InvokeModel body) is required", at: 0 })?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| JsonError { what: "input.invokeModel.body is not base64", at: 0 })
}

/// The Messages API's `{"input_tokens": N}` as Bedrock's `{"inputTokens": N}`, for a Bedrock
/// client counting through another provider.
pub fn count_tokens_for_bedrock_client(body: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Count {
        input_tokens: u64,
    }
    let c: Count = serde_json::from_slice(body).ok()?;
    Some(Bytes::from(format!("{{\"inputTokens\":{}}}", c.input_tokens)))
}

/// Bedrock's `{"inputTokens": N}` as the Messages API's `{"input_tokens": N}`.
pub fn count_tokens_answer(body: &[u8]) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Count {
        #[serde(rename = "inputTokens")]
        input_tokens: u64,
    }
    let c: Count = serde_json::from_slice(body).ok()?;
    Some(Bytes::from(format!("{{\"input_tokens\":{}}}", c.input_tokens)))
}

/// Turns an SSE stream (from the Anthropic API or Vertex) into the event stream a Bedrock client
/// expects: one `chunk` frame per SSE event, its data base64-encoded.
#[derive(Default)]
pub struct SseToStream {
    /// The line not yet ended.
    line: BytesMut,
    /// The data lines of the event not yet ended, joined with `\n` (SSE's own rule).
    data: Vec<u8>,
    /// The event being read is past [`MAX_EVENT`]: the rest of it is dropped.
    oversized: bool,
}

/// No Anthropic event comes near this; a stream that does is not buffered without bound.
const MAX_EVENT: usize = 16 << 20;

impl SseToStream {
    pub fn new() -> Self {
        SseToStream::default()
    }

    /// The frames for every event `chunk` completes; a partial event waits for the rest. Lines
    /// end in LF or CRLF; a blank line ends an event.
    pub fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        let mut rest = chunk;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let line = if self.line.is_empty() {
                &rest[..nl]
            } else {
                self.line.extend_from_slice(&rest[..nl]);
                &self.line[..]
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if !self.data.is_empty() && !self.oversized {
                    out.put_slice(&event_frame(&self.data));
                }
                self.data.clear();
                self.oversized = false;
            } else if let Some(d) = line.strip_prefix(b"data:") {
                let d = d.strip_prefix(b" ").unwrap_or(d);
                if self.data.len() + d.len() + 1 > MAX_EVENT {
                    self.oversized = true;
                } else if !self.oversized {
                    if !self.data.is_empty() {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(d);
                }
            }
            self.line.clear();
            rest = &rest[nl + 1..];
        }
        if self.line.len() + rest.len() > MAX_EVENT {
            self.oversized = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(rest);
        }
        out.freeze()
    }
}

/// The frame for one SSE event's JSON: a `chunk` frame, or for an `error` event the exception
/// frame Bedrock ends a stream with (boto3 raises it as an `EventStreamError` naming it).
fn event_frame(event_json: &[u8]) -> Bytes {
    // Only an event with an `"error"` key can be one; the content deltas never parse here.
    if memchr::memmem::find(event_json, b"\"error\"").is_some() {
        let v: serde_json::Value = serde_json::from_slice(event_json).unwrap_or_default();
        if v["type"] == "error" {
            let exception = exception_name(v["error"]["type"].as_str().unwrap_or_default());
            let message = v["error"]["message"].as_str().unwrap_or("the stream failed");
            let payload =
                serde_json::to_vec(&serde_json::json!({ "message": message })).expect("JSON values serialize");
            return super::eventstream::encode(
                &[
                    (":exception-type", exception),
                    (":content-type", "application/json"),
                    (":message-type", "exception"),
                ],
                &payload,
            );
        }
    }
    chunk_frame(event_json)
}

/// The Bedrock stream exception for an Anthropic error type (the reverse of `exception_type`).
fn exception_name(anthropic: &str) -> &'static str {
    match anthropic {
        "rate_limit_error" => "throttlingException",
        "invalid_request_error" => "validationException",
        "overloaded_error" => "serviceUnavailableException",
        "permission_error" => "accessDeniedException",
        _ => "modelStreamErrorException",
    }
}

/// The event-stream frame Bedrock sends for one SSE event's JSON (for the mock and the tests).
pub fn chunk_frame(event_json: &[u8]) -> Bytes {
    let b64 = base64::engine::general_purpose::STANDARD.encode(event_json);
    let payload = serde_json::to_vec(&serde_json::json!({"bytes": b64})).expect("JSON values serialize");
    super::eventstream::encode(
        &[(":event-type", "chunk"), (":content-type", "application/json"), (":message-type", "event")],
        &payload,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_moves_model_stream_version_and_betas() {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let out = request_body(body, Some("context-1m-2025-08-07, interleaved-thinking-2025-05-14")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "max_tokens": 64,
                "messages": [{"role":"user","content":"hi"}],
                "anthropic_version": "bedrock-2023-05-31",
                "anthropic_beta": ["context-1m-2025-08-07", "interleaved-thinking-2025-05-14"],
            })
        );
        // The messages bytes are copied as they were.
        assert!(memchr::memmem::find(&out, br#""messages":[{"role":"user","content":"hi"}]"#).is_some());
        // A body that already speaks Bedrock keeps its own version and betas.
        let own = br#"{"anthropic_version":"bedrock-2023-05-31","anthropic_beta":["x"],"max_tokens":1,"messages":[]}"#;
        assert_eq!(&request_body(own, Some("y")).unwrap()[..], &own[..]);
    }

    #[test]
    fn model_ids_are_percent_encoded() {
        assert_eq!(
            invoke_path("anthropic.claude-sonnet-4-5-20250929-v1:0", true),
            "/model/anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke-with-response-stream"
        );
        assert_eq!(
            invoke_path("arn:aws:bedrock:us-east-1:123:inference-profile/us.anthropic.x", false),
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123%3Ainference-profile%2Fus.anthropic.x/invoke"
        );
    }

    #[test]
    fn stream_becomes_sse_at_any_split() {
        let events = [
            r#"{"type":"message_start","message":{"usage":{"input_tokens":5,"output_tokens":1}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hé"}}"#,
            r#"{"type":"message_stop"}"#,
        ];
        let mut wire: Vec<u8> = events.iter().flat_map(|e| chunk_frame(e.as_bytes()).to_vec()).collect();
        wire.extend_from_slice(&super::super::eventstream::encode(
            &[(":message-type", "exception"), (":exception-type", "throttlingException")],
            br#"{"message":"slow down"}"#,
        ));
        let expected = format!(
            "event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\nevent: message_stop\ndata: {}\n\n\
             event: error\ndata: {{\"error\":{{\"message\":\"slow down\",\"type\":\"rate_limit_error\"}},\"type\":\"error\"}}\n\n",
            events[0], events[1], events[2]
        );
        for cut in [0, 1, 13, 100, wire.len() / 2, wire.len() - 1] {
            let mut t = StreamToSse::new();
            let mut sse = t.feed(&wire[..cut]).unwrap().to_vec();
            sse.extend_from_slice(&t.feed(&wire[cut..]).unwrap());
            assert_eq!(String::from_utf8(sse).unwrap(), expected, "cut at {cut}");
        }
    }

    #[test]
    fn sse_becomes_frames_and_back() {
        let sse =
            "event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n";
        let mut to_frames = SseToStream::new();
        let mut frames = to_frames.feed(&sse.as_bytes()[..20]).to_vec();
        frames.extend_from_slice(&to_frames.feed(&sse.as_bytes()[20..]));
        assert_eq!(StreamToSse::new().feed(&frames).unwrap(), sse.as_bytes());
    }

    #[test]
    fn count_tokens_round_trip() {
        let body = count_tokens_body(br#"{"max_tokens":1}"#);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["input"]["invokeModel"]["body"], "eyJtYXhfdG9rZW5zIjoxfQ==");
        // Without max_tokens (a token count never has one), the invoke body gets one.
        let v: serde_json::Value = serde_json::from_slice(&count_tokens_body(br#"{"messages":[]}"#)).unwrap();
        assert_eq!(v["input"]["invokeModel"]["body"], "eyJtZXNzYWdlcyI6W10sIm1heF90b2tlbnMiOjF9");
        assert_eq!(count_tokens_path("a.b-v1:0"), "/model/a.b-v1%3A0/count-tokens");
        assert_eq!(&count_tokens_answer(br#"{"inputTokens":42}"#).unwrap()[..], br#"{"input_tokens":42}"#);
    }

    #[test]
    fn errors_take_the_anthropic_shape() {
        let e = anthropic_error(429, br#"{"message":"Too many requests, please wait before trying again."}"#);
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "Too many requests, please wait before trying again.");
        let already = br#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#;
        assert_eq!(&anthropic_error(529, already)[..], &already[..]);
    }
}
