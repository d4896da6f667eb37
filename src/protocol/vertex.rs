//! The Vertex AI rawPredict envelope around an Anthropic Messages body.
//!
//! Vertex takes the model in the URL
//! (`/v1/projects/{p}/locations/{r}/publishers/anthropic/models/{model}:streamRawPredict`, or
//! `:rawPredict` unstreamed) and `anthropic_version: "vertex-2023-10-16"` in the body, which
//! otherwise is the Messages body (with `stream`). Answers and streams are the Messages API's.
//! Token counting is `…/models/count-tokens:rawPredict` with the model in the body.

use bytes::Bytes;

use super::json_peek::{rewrite_members, scan_object, JsonError};

pub const VERTEX_VERSION: &str = "vertex-2023-10-16";

fn ensure_version(body: &[u8], drop: &[&str]) -> Result<Bytes, JsonError> {
    let mut has_version = false;
    scan_object(body, |key, _| {
        has_version |= key == "anthropic_version";
        Ok(())
    })?;
    let version = serde_json::to_vec(VERTEX_VERSION).expect("a string serializes");
    let add: Vec<(&str, &[u8])> = if has_version { Vec::new() } else { vec![("anthropic_version", &version)] };
    rewrite_members(body, drop, &add)
}

/// The rawPredict body: `model` leaves (it is in the URL), `anthropic_version` comes in.
pub fn request_body(body: &[u8]) -> Result<Bytes, JsonError> {
    ensure_version(body, &["model"])
}

/// The count-tokens body keeps `model` (with the provider's id already in it).
pub fn count_tokens_body(body: &[u8]) -> Result<Bytes, JsonError> {
    ensure_version(body, &[])
}

fn base(project: &str, region: &str) -> String {
    format!("/v1/projects/{project}/locations/{region}/publishers/anthropic/models")
}

/// The model is checked by the caller ([`super::is_path_safe_model_id`], no `/`); what is not
/// unreserved or `@` is still percent-encoded, so nothing in it can end the segment.
pub fn predict_path(project: &str, region: &str, model: &str, stream: bool) -> String {
    let mut escaped = String::with_capacity(model.len());
    for b in model.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            escaped.push(b as char);
        } else {
            escaped.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{}/{escaped}:{}", base(project, region), if stream { "streamRawPredict" } else { "rawPredict" })
}

pub fn count_tokens_path(project: &str, region: &str) -> String {
    format!("{}/count-tokens:rawPredict", base(project, region))
}

/// The public endpoint of a region (`global` has no region prefix).
pub fn endpoint(region: &str) -> String {
    if region == "global" {
        "https://aiplatform.googleapis.com".into()
    } else {
        format!("https://{region}-aiplatform.googleapis.com")
    }
}

/// A Google error (`{"error": {"code", "message", "status"}}`, sometimes inside a list) in the
/// Anthropic shape; an Anthropic-shaped error (what Vertex relays from the model) stays as it is.
pub fn anthropic_error(status: u16, body: &[u8]) -> Bytes {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if v["type"] == "error" {
        return Bytes::copy_from_slice(body);
    }
    let google = if v.is_array() { &v[0]["error"] } else { &v["error"] };
    let message =
        google["message"].as_str().map(str::to_string).unwrap_or_else(|| format!("Vertex AI answered {status}"));
    let kind = super::bedrock::error_type(status);
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}))
            .expect("JSON values serialize"),
    )
}

/// An Anthropic error body in Google's shape, for a Vertex client:
/// `{"error": {"code", "message", "status"}}`.
pub fn error_from_anthropic(status: u16, body: &[u8]) -> Bytes {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message =
        v["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| format!("the gateway answered {status}"));
    let code = match status {
        400 | 413 | 414 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        408 | 504 => "DEADLINE_EXCEEDED",
        429 => "RESOURCE_EXHAUSTED",
        503 | 529 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"error": {"code": status, "message": message, "status": code}}))
            .expect("JSON values serialize"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_and_paths() {
        let body = br#"{"model":"claude-sonnet-4-5","stream":true,"max_tokens":5,"messages":[]}"#;
        assert_eq!(
            &request_body(body).unwrap()[..],
            br#"{"stream":true,"max_tokens":5,"messages":[],"anthropic_version":"vertex-2023-10-16"}"#
        );
        assert_eq!(
            &count_tokens_body(br#"{"model":"m","messages":[]}"#).unwrap()[..],
            br#"{"model":"m","messages":[],"anthropic_version":"vertex-2023-10-16"}"#
        );
        assert_eq!(
            predict_path("p1", "us-east5", "claude-sonnet-4-5@20250929", true),
            "/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict"
        );
        assert_eq!(endpoint("global"), "https://aiplatform.googleapis.com");
        assert_eq!(endpoint("europe-west1"), "https://europe-west1-aiplatform.googleapis.com");
    }

    #[test]
    fn google_errors_take_the_anthropic_shape() {
        let e = anthropic_error(
            429,
            br#"[{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}]"#,
        );
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["error"], serde_json::json!({"type": "rate_limit_error", "message": "Quota exceeded"}));
    }
}
