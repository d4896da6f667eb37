//! The API formats clients speak, told apart by the request path, and how their bodies become
//! the canonical Anthropic Messages body.
//!
//! - Anthropic Messages: `/v1/messages`, `/v1/messages/count_tokens`.
//! - Bedrock InvokeModel (Claude Code with `CLAUDE_CODE_USE_BEDROCK`):
//!   `/model/{id}/invoke`, `/model/{id}/invoke-with-response-stream`, the id raw or
//!   percent-encoded; the body has `anthropic_version` and an `anthropic_beta` array, no `model`
//!   and no `stream`.
//! - Vertex rawPredict (`CLAUDE_CODE_USE_VERTEX`): `[/v1]/projects/{p}/locations/{r}/publishers/
//!   anthropic/models/{model}:rawPredict` or `:streamRawPredict`, and `…/models/count-tokens:
//!   rawPredict`; the body has `anthropic_version` and no `model` (except for counting).

use bytes::Bytes;

use super::json_peek::{rewrite_members, scan_object, JsonError};

/// The format a client speaks, which its answer must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Anthropic,
    Bedrock,
    Vertex,
}

impl Format {
    /// The name the usage record writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Anthropic => "anthropic",
            Format::Bedrock => "bedrock",
            Format::Vertex => "vertex",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Messages,
    CountTokens,
    /// The model comes from the path; `stream` from the path too (Bedrock) or the body (Vertex).
    Bedrock {
        model: String,
        stream: bool,
    },
    Vertex {
        model: String,
        stream: bool,
    },
    VertexCountTokens,
    /// Bedrock's CountTokens: the model from the path, the InvokeModel body wrapped in the body.
    BedrockCountTokens {
        model: String,
    },
}

impl Call {
    pub fn format(&self) -> Format {
        match self {
            Call::Messages | Call::CountTokens => Format::Anthropic,
            Call::Bedrock { .. } | Call::BedrockCountTokens { .. } => Format::Bedrock,
            Call::Vertex { .. } | Call::VertexCountTokens => Format::Vertex,
        }
    }

    pub fn counts_tokens(&self) -> bool {
        matches!(self, Call::CountTokens | Call::VertexCountTokens | Call::BedrockCountTokens { .. })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The call a POST to `path` makes, if the path is one of the formats'. The pass-through
/// prefixes LiteLLM offers (`/anthropic`, `/bedrock`, `/vertex_ai/v1`) name the format
/// explicitly and are served like the bare paths: authenticated, limited, metered, audited.
pub fn parse_path(path: &str) -> Option<Call> {
    // No route has a dot segment, raw or percent-encoded; one in a client's path is a traversal
    // attempt or a mistake.
    let dot = |seg: &str| seg == "." || seg == "..";
    if path.split('/').any(dot) || percent_decode(path).is_some_and(|d| d.split('/').any(dot)) {
        return None;
    }
    let prefixed = |rest: &str, format: Format| parse_bare(rest).filter(|c| c.format() == format);
    if let Some(rest) = path.strip_prefix("/anthropic/") {
        return prefixed(&path["/anthropic".len()..], Format::Anthropic).filter(|_| !rest.is_empty());
    }
    if path.starts_with("/bedrock/") {
        return prefixed(&path["/bedrock".len()..], Format::Bedrock);
    }
    if path.starts_with("/vertex_ai/v1/") {
        return prefixed(&path["/vertex_ai".len()..], Format::Vertex);
    }
    parse_bare(path)
}

/// The path (and query) a Messages-format call takes to an Anthropic provider: the client's,
/// less the `/anthropic` pass-through prefix, which names the format to the gateway only.
pub fn upstream_path(path_and_query: &str) -> &str {
    path_and_query.strip_prefix("/anthropic").filter(|rest| rest.starts_with('/')).unwrap_or(path_and_query)
}

fn parse_bare(path: &str) -> Option<Call> {
    match path {
        "/v1/messages" => return Some(Call::Messages),
        "/v1/messages/count_tokens" => return Some(Call::CountTokens),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/model/") {
        let (id, action) = rest.rsplit_once('/')?;
        let model = percent_decode(id)?;
        if !super::is_path_safe_model_id(&model) {
            return None;
        }
        return match action {
            "invoke" => Some(Call::Bedrock { model, stream: false }),
            "invoke-with-response-stream" => Some(Call::Bedrock { model, stream: true }),
            "count-tokens" => Some(Call::BedrockCountTokens { model }),
            _ => None,
        };
    }
    let rest = path.strip_prefix("/v1").unwrap_or(path);
    let mut parts = rest.strip_prefix('/')?.splitn(7, '/');
    let shape = [parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?];
    if shape[0] != "projects" || shape[2] != "locations" || shape[4] != "publishers" || shape[5] != "anthropic" {
        return None;
    }
    let tail = parts.next()?.strip_prefix("models/")?;
    let (model, action) = tail.rsplit_once(':')?;
    match (model, action) {
        ("count-tokens", "rawPredict") => Some(Call::VertexCountTokens),
        (m, "rawPredict") if vertex_model(m) => Some(Call::Vertex { model: m.into(), stream: false }),
        (m, "streamRawPredict") if vertex_model(m) => Some(Call::Vertex { model: m.into(), stream: true }),
        _ => None,
    }
}

/// A Vertex model in a path is one segment, taken as it is (Vertex ids are never encoded).
fn vertex_model(m: &str) -> bool {
    !m.contains('/') && super::is_path_safe_model_id(m)
}

/// A Bedrock InvokeModel body as a Messages body, and the betas it carried (they travel as the
/// `anthropic-beta` header from here on).
pub fn from_bedrock(body: &[u8], model: &str, stream: bool) -> Result<(Bytes, Vec<String>), JsonError> {
    let mut betas = Vec::new();
    scan_object(body, |key, span| {
        if key == "anthropic_beta" {
            betas = serde_json::from_slice::<Vec<String>>(&body[span.clone()])
                .map_err(|_| JsonError { what: "anthropic_beta must be a list of strings", at: span.start })?;
        }
        Ok(())
    })?;
    let model = serde_json::to_vec(model).expect("a string serializes");
    let mut add: Vec<(&str, &[u8])> = vec![("model", &model)];
    if stream {
        add.push(("stream", b"true"));
    }
    let out = rewrite_members(body, &["anthropic_version", "anthropic_beta", "model", "stream"], &add)?;
    Ok((out, betas))
}

/// A Vertex rawPredict body as a Messages body (`stream` stays as the body says).
pub fn from_vertex(body: &[u8], model: Option<&str>) -> Result<Bytes, JsonError> {
    match model {
        Some(m) => {
            let m = serde_json::to_vec(m).expect("a string serializes");
            rewrite_members(body, &["anthropic_version", "model"], &[("model", &m)])
        }
        None => rewrite_members(body, &["anthropic_version"], &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pass_through_prefix_stays_at_the_gateway() {
        assert_eq!(upstream_path("/anthropic/v1/messages?beta=true"), "/v1/messages?beta=true");
        assert_eq!(upstream_path("/v1/messages/count_tokens"), "/v1/messages/count_tokens");
        assert_eq!(upstream_path("/anthropicx/v1/messages"), "/anthropicx/v1/messages");
    }

    #[test]
    fn paths() {
        assert_eq!(parse_path("/v1/messages"), Some(Call::Messages));
        assert_eq!(
            parse_path("/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke-with-response-stream"),
            Some(Call::Bedrock { model: "us.anthropic.claude-sonnet-4-5-20250929-v1:0".into(), stream: true })
        );
        assert_eq!(
            parse_path("/model/anthropic.claude-haiku-4-5-20251001-v1:0/invoke"),
            Some(Call::Bedrock { model: "anthropic.claude-haiku-4-5-20251001-v1:0".into(), stream: false })
        );
        for prefix in ["/v1", ""] {
            assert_eq!(
                parse_path(&format!(
                    "{prefix}/projects/p1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict"
                )),
                Some(Call::Vertex { model: "claude-sonnet-4-5@20250929".into(), stream: true })
            );
            assert_eq!(
                parse_path(&format!(
                    "{prefix}/projects/p/locations/global/publishers/anthropic/models/count-tokens:rawPredict"
                )),
                Some(Call::VertexCountTokens)
            );
        }
        // The pass-through prefixes, each for its own format only.
        assert_eq!(parse_path("/anthropic/v1/messages"), Some(Call::Messages));
        assert_eq!(parse_path("/anthropic/v1/messages/count_tokens"), Some(Call::CountTokens));
        assert_eq!(parse_path("/bedrock/model/m/invoke"), Some(Call::Bedrock { model: "m".into(), stream: false }));
        assert_eq!(
            parse_path("/vertex_ai/v1/projects/p/locations/r/publishers/anthropic/models/m:rawPredict"),
            Some(Call::Vertex { model: "m".into(), stream: false })
        );
        assert_eq!(parse_path("/anthropic/model/m/invoke"), None);
        assert_eq!(parse_path("/bedrock/v1/messages"), None);
        for bad in [
            "/model/x/other",
            "/model//invoke",
            "/model/%zz/invoke",
            "/projects/p/locations/r/publishers/google/models/m:rawPredict",
            "/v1/other",
        ] {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn bodies_become_messages_bodies() {
        let bedrock =
            br#"{"anthropic_version":"bedrock-2023-05-31","anthropic_beta":["a","b"],"max_tokens":5,"messages":[]}"#;
        let (body, betas) = from_bedrock(bedrock, "us.anthropic.x-v1:0", true).unwrap();
        assert_eq!(&body[..], br#"{"max_tokens":5,"messages":[],"model":"us.anthropic.x-v1:0","stream":true}"#);
        assert_eq!(betas, ["a", "b"]);
        let vertex = br#"{"anthropic_version":"vertex-2023-10-16","stream":true,"max_tokens":5,"messages":[]}"#;
        assert_eq!(
            &from_vertex(vertex, Some("claude-x@1")).unwrap()[..],
            br#"{"stream":true,"max_tokens":5,"messages":[],"model":"claude-x@1"}"#
        );
    }
}
