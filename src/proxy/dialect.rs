//! What a deployment's provider expects, and what its answer needs on the way back: the
//! Anthropic API takes the client's request as it came (model rewritten at most); Bedrock takes
//! the model in the path, a different body envelope and SigV4 or its own API key, and streams
//! AWS event-stream frames that the client must receive as SSE.

use bytes::Bytes;

use super::payload::Payload;
use super::{with_model, ApiError};
use crate::config::ProviderKind;
use crate::protocol::inbound::Format;
use crate::protocol::{bedrock, vertex};
use crate::providers::Provider;

/// How the answer must be changed for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transcode {
    /// The provider speaks the client's format.
    None,
    /// Bedrock event-stream frames to SSE.
    BedrockStream,
    /// Bedrock's `{"inputTokens"}` to `{"input_tokens"}`.
    BedrockCountTokens,
    /// `{"input_tokens"}` to Bedrock's `{"inputTokens"}`, for a Bedrock client.
    CountTokensForBedrock,
}

/// What the answer needs on its way to the client.
#[derive(Debug, Clone, Copy)]
pub(super) struct Answer {
    /// Usage is read from it (not for token counts, which are free).
    pub metered: bool,
    pub transcode: Transcode,
}

/// One deployment's request.
pub(super) struct Outbound {
    pub body: Payload,
    /// The path to send to; `None` keeps the client's (with its query).
    pub path: Option<String>,
    pub transcode: Transcode,
    /// Bedrock carries the version and the betas in the body; the headers would only repeat them.
    pub drop_headers: &'static [&'static str],
    /// Headers the provider needs that the client's format did not carry. An empty value
    /// removes the header.
    pub set_headers: Vec<(&'static str, String)>,
    /// The policy rules that dropped a beta, for the metric.
    pub dropped_betas: Vec<String>,
    pub accept: Option<&'static str>,
    /// The body's SHA-256 for SigV4, computed on the first signed attempt and kept for the
    /// deployment's other endpoints.
    pub payload_hash: std::cell::OnceCell<String>,
}

pub(super) struct Inbound<'a> {
    pub body: &'a Bytes,
    pub model_span: std::ops::Range<usize>,
    pub requested: &'a str,
    pub stream: bool,
    pub count_tokens: bool,
    pub beta: Option<&'a str>,
    /// The betas a Bedrock client put in its body (comma-joined), apart from its header's.
    pub body_betas: Option<&'a str>,
    pub format: Format,
    /// The client's own body in its own format (Bedrock, Vertex).
    pub original: Option<&'a Bytes>,
    /// The client sent `anthropic-version`.
    pub has_version: bool,
}

/// The betas (after the provider's policy) and version as headers, for a provider that takes
/// them so. The client's own `anthropic-beta` lines are never copied: only the policy's result
/// is sent (an empty value sends none).
fn beta_headers(req: &Inbound<'_>, betas: &Betas, version: bool) -> Vec<(&'static str, String)> {
    let mut h = vec![("anthropic-beta", betas.value.clone())];
    if version && !req.has_version {
        h.push(("anthropic-version", ANTHROPIC_VERSION.to_string()));
    }
    h
}

/// How a token count comes back to the client from a provider answering `{"input_tokens"}`.
fn count_for(req: &Inbound<'_>) -> Transcode {
    if req.count_tokens && req.format == Format::Bedrock {
        Transcode::CountTokensForBedrock
    } else {
        Transcode::None
    }
}

/// Whether two comma-joined beta lists hold the same betas.
fn same_set(a: &str, b: Option<&str>) -> bool {
    fn set(s: &str) -> std::collections::BTreeSet<&str> {
        s.split(',').map(str::trim).filter(|x| !x.is_empty()).collect()
    }
    set(a) == set(b.unwrap_or_default())
}

/// The Messages API version sent for clients whose format carries none in a header.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The client's betas after the provider's policy.
struct Betas {
    value: String,
    /// The policy dropped or renamed one.
    changed: bool,
}

pub(super) fn outbound(provider: &Provider, req: &Inbound<'_>, model_id: &str) -> Result<Outbound, ApiError> {
    // Bedrock and Vertex take the model in the URL path. A configured id is the operator's; a
    // requested name passed through comes from the client and must not reach another path.
    let in_path = matches!(provider.kind, ProviderKind::Bedrock | ProviderKind::Vertex);
    let one_segment = provider.kind != ProviderKind::Vertex || !model_id.contains('/');
    if in_path && !(crate::protocol::is_path_safe_model_id(model_id) && one_segment) {
        return Err(ApiError::invalid_request(format!(
            "model {:?} is not a model id provider {} can be asked for",
            model_id.chars().take(200).collect::<String>(),
            provider.name
        )));
    }
    let (value, dropped) = provider.betas.apply(req.beta.unwrap_or_default());
    let betas = Betas { changed: value != req.beta.unwrap_or_default().trim(), value };
    let out = outbound_with(provider, req, model_id, &betas)?;
    Ok(Outbound { dropped_betas: dropped, ..out })
}

fn outbound_with(provider: &Provider, req: &Inbound<'_>, model_id: &str, betas: &Betas) -> Result<Outbound, ApiError> {
    match provider.kind {
        ProviderKind::Anthropic => Ok(Outbound {
            body: with_model(req.body, req.model_span.clone(), req.requested, model_id),
            path: match req.format {
                Format::Anthropic => None,
                _ if req.count_tokens => Some("/v1/messages/count_tokens".into()),
                _ => Some("/v1/messages".into()),
            },
            transcode: count_for(req),
            drop_headers: &[],
            set_headers: beta_headers(req, betas, true),
            dropped_betas: Vec::new(),
            accept: None,
            payload_hash: Default::default(),
        }),
        ProviderKind::Bedrock => {
            // A Bedrock client's body goes to Bedrock as it came (a CountTokens body too),
            // unless the policy changed its betas, or the header brought betas its body lacks.
            let as_it_came = match (req.format, req.original) {
                (Format::Bedrock, Some(original)) if !betas.changed && same_set(&betas.value, req.body_betas) => {
                    Some(original.clone())
                }
                _ => None,
            };
            let rebuilt = || {
                let beta = Some(betas.value.as_str()).filter(|b| !b.is_empty());
                bedrock::request_body(req.body, beta).map_err(ApiError::from)
            };
            let drop_headers: &'static [&'static str] = &["anthropic-version", "anthropic-beta"];
            Ok(if req.count_tokens {
                Outbound {
                    body: Payload::whole(match as_it_came {
                        Some(body) => body,
                        None => bedrock::count_tokens_body(&rebuilt()?),
                    }),
                    path: Some(bedrock::count_tokens_path(model_id)),
                    // A Bedrock client reads Bedrock's own answer.
                    transcode: if req.format == Format::Bedrock {
                        Transcode::None
                    } else {
                        Transcode::BedrockCountTokens
                    },
                    drop_headers,
                    set_headers: Vec::new(),
                    dropped_betas: Vec::new(),
                    accept: Some("application/json"),
                    payload_hash: Default::default(),
                }
            } else {
                Outbound {
                    body: Payload::whole(match as_it_came {
                        Some(body) => body,
                        None => rebuilt()?,
                    }),
                    path: Some(bedrock::invoke_path(model_id, req.stream)),
                    transcode: if req.stream { Transcode::BedrockStream } else { Transcode::None },
                    drop_headers,
                    set_headers: Vec::new(),
                    dropped_betas: Vec::new(),
                    accept: Some(if req.stream { "application/vnd.amazon.eventstream" } else { "application/json" }),
                    payload_hash: Default::default(),
                }
            })
        }
        ProviderKind::Vertex => {
            let project = provider.project.as_deref().unwrap_or_default();
            let region = provider.region.as_deref().unwrap_or_default();
            // Only the version moves into the body; betas stay in their header, as Vertex takes them.
            let drop_headers: &'static [&'static str] = &["anthropic-version"];
            Ok(if req.count_tokens {
                // A Vertex client's count goes as it came (its own `anthropic_version`), with
                // the deployment's model id; another client's gets Vertex's envelope.
                let body = match (req.format, req.original) {
                    (Format::Vertex, Some(original)) => {
                        let span = crate::protocol::json_peek::peek_request(original)?
                            .model
                            .map(|(_, span)| span)
                            .ok_or_else(|| ApiError::invalid_request("model: field required"))?;
                        with_model(original, span, req.requested, model_id)
                    }
                    _ => {
                        let with_id = with_model(req.body, req.model_span.clone(), req.requested, model_id);
                        Payload::whole(vertex::count_tokens_body(&with_id.to_bytes())?)
                    }
                };
                Outbound {
                    body,
                    path: Some(vertex::count_tokens_path(project, region)),
                    transcode: count_for(req),
                    drop_headers,
                    set_headers: beta_headers(req, betas, false),
                    dropped_betas: Vec::new(),
                    accept: Some("application/json"),
                    payload_hash: Default::default(),
                }
            } else {
                // A Vertex client's body goes to Vertex as it came.
                let body = Payload::whole(match (req.format, req.original) {
                    (Format::Vertex, Some(original)) => original.clone(),
                    _ => vertex::request_body(req.body)?,
                });
                Outbound {
                    body,
                    path: Some(vertex::predict_path(project, region, model_id, req.stream)),
                    transcode: Transcode::None,
                    drop_headers,
                    set_headers: beta_headers(req, betas, false),
                    dropped_betas: Vec::new(),
                    accept: Some(if req.stream { "text/event-stream" } else { "application/json" }),
                    payload_hash: Default::default(),
                }
            })
        }
    }
}
