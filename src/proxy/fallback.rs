//! The attempt loop: deployments in order, endpoints within each, until one answers usably.
//!
//! An attempt is abandoned (and the next one made) only before any byte went to the client:
//! on a connect error, a connect or first-byte timeout, or a 429, 500, 502, 503, 504 or 529.
//! A client mistake (400, 401, 403, 404, 413) goes straight back. The body is the whole
//! request, kept in memory, so it can be sent again however large it is; each deployment gets
//! its own `model` value. When every attempt fails, the client gets the last provider error as
//! the provider sent it (a 429 keeps its `retry-after`), or the gateway's own error when no
//! provider answered at all.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora_proxy::Session;

use super::dialect::{outbound, Answer, Inbound, Outbound};
use super::errors::{for_client, same_format};
use super::exchange::SendError;
use super::headers::{copy_request_headers, response_for_client, RequestPolicy};
use super::{ApiError, Gateway, RequestCtx, State};
use crate::config::ProviderKind;
use crate::metering::{AttemptRecord, Outcome};
use crate::providers::Auth;
use crate::providers::{now_ms, Endpoint, Provider};
use crate::routing::Route;

/// An error body is read whole to decide on a fallback; none is near this size.
const MAX_ERROR_BODY: usize = 256 << 10;

/// Longest wait for an error body; a provider trickling its error is not waited for.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Counts a request on an endpoint while it is sent or streamed.
pub(super) struct InFlight(Arc<Endpoint>);

impl InFlight {
    fn new(e: Arc<Endpoint>) -> Self {
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(e)
    }

    pub(super) fn endpoint(&self) -> &Endpoint {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the client gets when nothing better came.
enum Failure {
    /// A provider's error answer, read whole: as the provider sent it (`header`, `raw`) and in
    /// the Anthropic shape (`body`).
    Upstream { header: Box<ResponseHeader>, raw: Bytes, body: Bytes, kind: ProviderKind },
    /// The gateway's own error (no provider answered).
    Gateway(ApiError),
}

/// Statuses worth another endpoint or deployment.
fn retryable(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504 | 529)
}

fn retry_after(h: &ResponseHeader) -> Option<Duration> {
    let v = h.headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// What the request looks like to the attempt loop.
pub(super) struct Request {
    pub body: Bytes,
    pub model_span: Range<usize>,
    /// The model name the client sent.
    pub requested: String,
    /// Picks the endpoint under session affinity.
    pub affinity_key: Vec<u8>,
    pub metered: bool,
    pub format: crate::protocol::inbound::Format,
    /// The client's own body, when its format is not Anthropic's.
    pub original: Option<Bytes>,
    /// Betas the client sent in its body (Bedrock), comma-joined.
    pub betas: Option<String>,
}

impl Gateway {
    pub(super) async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &State,
        first: Arc<Route>,
        req: Request,
    ) -> Result<(), ApiError> {
        let started = Instant::now();
        let mut route = first.clone();
        let mut attempts = 0usize;
        let mut widened = false;
        // The last provider error wins over the gateway's own: a 429 with its retry-after is
        // worth more to the client than a later "cannot connect".
        let mut last_upstream: Option<Failure> = None;
        let mut last_gateway: Option<ApiError> = None;
        // Which deployment the last failure came from, for the record.
        let mut last_from: Option<(usize, String)> = None;
        // When every endpoint is down or cooling down, one more pass tries them anyway.
        let mut last_resort = false;
        // Every `anthropic-beta` line the client sent (a value that is not text is no beta):
        // the provider's policy sees them all, and only its result is sent on.
        let header_lines: Vec<&str> =
            session.req_header().headers.get_all("anthropic-beta").iter().filter_map(|v| v.to_str().ok()).collect();
        let header_betas = (!header_lines.is_empty()).then(|| header_lines.join(","));
        let beta = merge_betas(header_betas.as_deref(), req.betas.as_deref());
        let has_version = session.req_header().headers.contains_key("anthropic-version");
        let inbound = Inbound {
            body: &req.body,
            model_span: req.model_span.clone(),
            requested: &req.requested,
            stream: ctx.stream,
            count_tokens: !req.metered,
            beta: beta.as_deref(),
            body_betas: req.betas.as_deref(),
            format: req.format,
            original: req.original.as_ref(),
            has_version,
        };
        'routes: loop {
            let deadline = started + route.deadline;
            for d in 0..route.deployments.len() {
                let provider = route.deployments[d].provider.clone();
                let model_id = route.deployments[d].model_id.as_deref().unwrap_or(&req.requested).to_string();
                // One body per deployment, however many of its endpoints are tried.
                let out = outbound(&provider, &inbound, &model_id)?;
                for rule in &out.dropped_betas {
                    self.metrics.betas_dropped.with_label_values(&[&provider.name, rule]).inc();
                }
                let mut tried = Vec::new();
                loop {
                    let now = Instant::now();
                    if attempts >= route.max_attempts || now >= deadline {
                        break;
                    }
                    let Some(endpoint) = provider.pool.select(&req.affinity_key, &tried, now_ms(), last_resort) else {
                        // Say why, when the provider cannot serve at all (no credential, no address).
                        if let (true, Some(reason)) = (tried.is_empty(), provider.unready_reason()) {
                            last_gateway.get_or_insert(ApiError::unavailable(reason));
                        }
                        break;
                    };
                    tried.push(endpoint.index);
                    let credential = match provider.credential(last_resort) {
                        Ok(c) => c,
                        Err(e) => {
                            last_gateway = Some(ApiError::unavailable(format!("provider {}: {e}", provider.name)));
                            break;
                        }
                    };
                    attempts += 1;
                    let mut record = AttemptRecord {
                        provider: provider.name.clone(),
                        endpoint: endpoint.label.clone(),
                        model: model_id.clone(),
                        status: None,
                        latency_ms: 0.0,
                        abandoned: None,
                        may_be_billed: false,
                        started: None,
                    };
                    let guard = InFlight::new(endpoint.clone());
                    let attempt_started = Instant::now();
                    record.started = Some(attempt_started);
                    let remaining = deadline.saturating_duration_since(now);
                    let timeout = provider.first_byte_timeout.min(remaining);
                    let cut_by_deadline = timeout < provider.first_byte_timeout;
                    // Sent and timed in one expression down to `up`: a named result would keep a
                    // slot of its own beside `up`'s in this future, for the whole answer.
                    let mut up = match {
                        let sent = match self.upstream_request(session, &provider, &endpoint, &credential, &out) {
                            // The deadline bounds the whole attempt, writing a large body included.
                            // Whether the request was written whole when it struck is not known:
                            // count it as written.
                            // Pingora's timer wheel: no syscall to arm it on every attempt.
                            Ok(r) => pingora_timeout::fast_timeout::fast_timeout(
                                remaining,
                                self.send(&provider, &endpoint, r, &out.body, timeout),
                            )
                            .await
                            .unwrap_or_else(|_| {
                                let error =
                                    ApiError::gateway_timeout(format!("model {}: deadline reached", route.name));
                                Err(SendError { error, written: true })
                            }),
                            Err(error) => Err(SendError { error, written: false }),
                        };
                        record.latency_ms = attempt_started.elapsed().as_secs_f64() * 1e3;
                        sent
                    } {
                        Ok(up) => up,
                        Err(SendError { error: e, written }) => {
                            // A timeout the deadline shortened says nothing about the endpoint.
                            if !(cut_by_deadline && e.status == 504) {
                                self.note_failure(&provider, &endpoint);
                            }
                            record.abandoned = Some(e.message.clone());
                            record.may_be_billed = written;
                            self.count_attempt(&provider, "failed");
                            ctx.attempts.push(record);
                            last_from = Some((d, model_id.clone()));
                            // The provider got the whole request and may be generating it: only
                            // a first-byte timeout (a provider that may never answer) is worth
                            // the risk of paying twice. Any other failure goes to the client.
                            if written && e.status != 504 {
                                ctx.route = Some(route.clone());
                                ctx.deployment = d;
                                ctx.provider_model = Some(model_id);
                                return Err(e);
                            }
                            last_gateway = Some(e);
                            continue;
                        }
                    };
                    let status = up.response_header().map_or(0, |h| h.status.as_u16());
                    record.status = Some(status);
                    let maybe_too_long = status == 400 && route.context_fallback.is_some() && !widened;
                    if !retryable(status) && !maybe_too_long {
                        // This one answers: 2xx, or a client mistake the client must see.
                        endpoint.passive.success();
                        credential.passive.success();
                        self.count_attempt(&provider, "answered");
                        ctx.attempts.push(record);
                        if ctx.attempts.len() > 1 {
                            self.metrics.fallbacks.with_label_values(&[&route.name]).inc();
                        }
                        ctx.route = Some(route.clone());
                        ctx.deployment = d;
                        ctx.price = route.deployments[d].price_for(&state.prices, &model_id);
                        ctx.regional = provider.regional(&model_id);
                        ctx.provider_model = Some(model_id);
                        let answer = Answer { metered: req.metered, transcode: out.transcode };
                        // The bodies are not needed any more: free them before a long stream.
                        drop(out);
                        drop(req);
                        return self.stream_answer(session, ctx, up, &provider, guard, answer).await;
                    }
                    let error_body = read_error_body(&mut up, ERROR_BODY_TIMEOUT.min(remaining)).await;
                    let header = Box::new(
                        up.response_header()
                            .cloned()
                            .unwrap_or_else(|| ResponseHeader::build(status, None).expect("valid status")),
                    );
                    if error_body.is_some() {
                        if let Ok(peer) = endpoint.peer() {
                            provider.connector.release(up, &peer, provider.pool_idle_timeout).await;
                        }
                    }
                    let raw = error_body.filter(|b| !b.is_empty()).unwrap_or_else(|| {
                        // Nothing readable came with the error: give the client the Anthropic shape.
                        let e = ApiError::bad_gateway(format!("provider {} answered {status}", provider.name));
                        e.body()
                    });
                    // What the error says, in the Anthropic shape, for the record and the checks
                    // below; the client gets it in its own format at the end.
                    let body = match provider.kind {
                        ProviderKind::Anthropic => raw.clone(),
                        kind => provider_error(kind, status, &raw),
                    };
                    let upstream = |header, raw, body| Failure::Upstream { header, raw, body, kind: provider.kind };
                    if maybe_too_long {
                        let next = is_prompt_too_long(&body)
                            .then(|| route.context_fallback.as_deref().and_then(|n| state.models.resolve(n)).cloned())
                            .flatten()
                            .filter(|r| ctx.key.as_ref().is_none_or(|k| k.allows(&r.name, None)));
                        if let Some(next) = next {
                            record.abandoned = Some(format!("prompt too long; trying {}", next.name));
                            self.count_attempt(&provider, "context_fallback");
                            ctx.attempts.push(record);
                            last_upstream = Some(upstream(header, raw, body));
                            last_from = Some((d, model_id.clone()));
                            widened = true;
                            // The larger model gets its own attempts.
                            attempts = 0;
                            route = next;
                            continue 'routes;
                        }
                        // An ordinary 400 (or no usable fallback): the client's to see.
                        self.count_attempt(&provider, "answered");
                        ctx.attempts.push(record);
                        ctx.route = Some(route.clone());
                        ctx.deployment = d;
                        ctx.provider_model = Some(model_id);
                        return self.replay(session, ctx, upstream(header, raw, body)).await;
                    }
                    // 429: this credential (or endpoint) pauses; 5xx and 529 count as failures.
                    if status == 429 {
                        let pause =
                            retry_after(&header).unwrap_or(provider.health.cooldown).min(provider.health.max_cooldown);
                        if provider.credential_count() > 1 {
                            // The key is rate-limited, not the endpoint: try it again with another key.
                            credential.passive.cool_down(pause);
                            tried.pop();
                        } else {
                            endpoint.passive.cool_down(pause);
                        }
                        self.metrics.cooldowns.with_label_values(&[&provider.name, &endpoint.label]).inc();
                    } else {
                        self.note_failure(&provider, &endpoint);
                    }
                    record.abandoned = Some(format!("provider answered {status}"));
                    self.count_attempt(&provider, "retried");
                    ctx.attempts.push(record);
                    last_upstream = Some(upstream(header, raw, body));
                    last_from = Some((d, model_id.clone()));
                }
            }
            if attempts == 0 && !last_resort {
                last_resort = true;
                route = first.clone();
                continue 'routes;
            }
            break;
        }
        let failure = last_upstream.or(last_gateway.map(Failure::Gateway)).unwrap_or_else(|| {
            Failure::Gateway(ApiError::unavailable(format!(
                "no endpoint of model {} is available: all are failing or cooling down",
                route.name
            )))
        });
        ctx.route = Some(route.clone());
        if let Some((d, model_id)) = last_from {
            ctx.deployment = d;
            ctx.provider_model = Some(model_id);
        }
        self.replay(session, ctx, failure).await
    }

    /// The request header for one attempt at `endpoint`.
    fn upstream_request(
        &self,
        session: &Session,
        provider: &Provider,
        endpoint: &Endpoint,
        credential: &crate::providers::Credential,
        out: &Outbound,
    ) -> Result<RequestHeader, ApiError> {
        let client = session.req_header();
        let path = match &out.path {
            Some(p) => p.as_str(),
            None => crate::protocol::inbound::upstream_path(client.uri.path_and_query().map_or("/", |p| p.as_str())),
        };
        let target = format!("{}{}", endpoint.url.path_prefix, path);
        let mut req = RequestHeader::build("POST", target.as_bytes(), Some(client.headers.len() + 5))
            .map_err(|e| ApiError::invalid_request(format!("cannot build the upstream request: {e}")))?;
        let policy = RequestPolicy { key_header: self.key_header.as_ref(), allow: &provider.allow_headers };
        copy_request_headers(client, &mut req, &policy);
        for name in out.drop_headers {
            let _ = req.remove_header(*name);
        }
        for (name, value) in &out.set_headers {
            if value.is_empty() {
                let _ = req.remove_header(*name);
            } else {
                let _ = req.insert_header(*name, value.as_str());
            }
        }
        if let Some(accept) = out.accept {
            let _ = req.insert_header(http::header::ACCEPT, accept);
            let _ = req.insert_header(http::header::CONTENT_TYPE, "application/json");
        }
        let _ = req.insert_header(http::header::HOST, endpoint.host_header.clone());
        match &credential.auth {
            Auth::Header(name, value) => {
                let _ = req.insert_header(name.clone(), value.clone());
            }
            Auth::OAuth(source) => {
                let header = source.header().map_err(|e| no_credential(provider, e))?;
                let _ = req.insert_header(http::header::AUTHORIZATION, header);
            }
            Auth::SigV4(signer) => {
                let host = endpoint.host_header.to_str().unwrap_or_default();
                let url = format!("{}://{host}{target}", endpoint.url.scheme());
                let hash = out
                    .payload_hash
                    .get_or_init(|| crate::providers::payload_hash_of(out.body.pieces().map(|p| &p[..])));
                let signed = signer
                    .sign_hashed(
                        "POST",
                        &url,
                        &[("host", host), ("content-type", "application/json")],
                        hash,
                        std::time::SystemTime::now(),
                    )
                    .map_err(|e| no_credential(provider, e))?;
                for (name, value) in signed {
                    let _ = req.insert_header(name, value);
                }
            }
        }
        let _ = req.insert_header(http::header::CONTENT_LENGTH, out.body.len());
        Ok(req)
    }

    fn note_failure(&self, provider: &Provider, endpoint: &Endpoint) {
        if let Some(d) = endpoint.passive.failure(&provider.health) {
            tracing::warn!(provider = %provider.name, endpoint = %endpoint.label.clone(), cooldown = ?d, "endpoint out of rotation");
            self.metrics.cooldowns.with_label_values(&[&provider.name, &endpoint.label]).inc();
        }
    }

    fn count_attempt(&self, provider: &Provider, outcome: &str) {
        self.metrics.attempts.with_label_values(&[&provider.name, outcome]).inc();
    }

    /// Sends the client a failure: the provider's error as it came, or the gateway's own.
    async fn replay(&self, session: &mut Session, ctx: &mut RequestCtx, failure: Failure) -> Result<(), ApiError> {
        let (header, raw, body, kind) = match failure {
            Failure::Gateway(e) => return Err(e),
            Failure::Upstream { header, raw, body, kind } => (header, raw, body, kind),
        };
        let status = header.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.status = status;
        ctx.outcome = Outcome::UpstreamError;
        ctx.error = crate::protocol::usage::usage_from_json(&body)
            .and_then(|(_, kind)| kind)
            .or_else(|| Some(format!("provider answered {status}")));
        // The provider's own answer when it speaks the client's format (clients match on its
        // wording); otherwise the error in the client's format, with the provider's retry advice.
        let (out, body) = if same_format(ctx.format, kind) {
            let mut out = response_for_client(&header, &ctx.id, false, &self.response_headers);
            let _ = out.remove_header(&http::header::TRANSFER_ENCODING);
            let _ = out.insert_header(http::header::CONTENT_LENGTH, raw.len());
            (out, raw)
        } else {
            let retry = retry_advice(&header);
            let shaped = for_client(ctx.format, status, body);
            ctx.status = shaped.status;
            (shaped.header(&ctx.id, &retry, false), shaped.body)
        };
        if session.write_response_header(Box::new(out), false).await.is_ok() {
            let _ = session.write_response_body(Some(body), true).await;
        }
        Ok(())
    }
}

/// The provider's advice on when to retry, kept when its error is reshaped.
pub(super) fn retry_advice(h: &ResponseHeader) -> Vec<(String, String)> {
    ["retry-after", "retry-after-ms", "x-should-retry"]
        .iter()
        .filter_map(|name| Some((name.to_string(), h.headers.get(*name)?.to_str().ok()?.to_string())))
        .collect()
}

/// A Bedrock or Vertex error body in the Anthropic shape.
pub(super) fn provider_error(kind: ProviderKind, status: u16, body: &[u8]) -> Bytes {
    match kind {
        ProviderKind::Vertex => crate::protocol::vertex::anthropic_error(status, body),
        _ => crate::protocol::bedrock::anthropic_error(status, body),
    }
}

/// The betas of the `anthropic-beta` header and of a Bedrock body's `anthropic_beta` list
/// together (Claude Code on Bedrock sends some in each), each once, in the order they came.
fn merge_betas(header: Option<&str>, body: Option<&str>) -> Option<String> {
    let mut seen: Vec<&str> = Vec::new();
    for beta in header.into_iter().chain(body).flat_map(|list| list.split(',')).map(str::trim) {
        if !beta.is_empty() && !seen.contains(&beta) {
            seen.push(beta);
        }
    }
    (header.is_some() || !seen.is_empty()).then(|| seen.join(","))
}

/// Reads a (small) error body whole; `None` when it cannot be read or is too large, in which
/// case the connection is not reused.
async fn read_error_body(up: &mut HttpSession, limit: Duration) -> Option<Bytes> {
    up.set_read_timeout(Some(limit));
    let read = async {
        let mut buf = BytesMut::new();
        loop {
            match up.read_response_body().await {
                Ok(Some(chunk)) if buf.len() + chunk.len() <= MAX_ERROR_BODY => buf.extend_from_slice(&chunk),
                Ok(Some(_)) | Err(_) => return None,
                Ok(None) => return Some(buf.freeze()),
            }
        }
    };
    pingora_timeout::fast_timeout::fast_timeout(limit, read).await.ok().flatten()
}

/// Anthropic says `prompt is too long: 250000 tokens > 200000 maximum`.
fn is_prompt_too_long(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"prompt is too long").is_some()
}

/// A provider credential that cannot be used now (not fetched yet, expired, refused by STS):
/// the detail, which can name roles, accounts and files, goes to the log and `/readyz`; the
/// client learns only that the gateway's credentials are at fault.
fn no_credential(provider: &Provider, detail: String) -> ApiError {
    tracing::warn!(provider = %provider.name, error = %detail, "no usable provider credential");
    ApiError::unavailable(format!(
        "provider {}: the gateway has no usable credentials for it now (its log and /readyz say why)",
        provider.name
    ))
}

#[cfg(test)]
mod tests {
    use super::merge_betas;

    #[test]
    fn betas_from_the_header_and_the_body_are_merged() {
        assert_eq!(
            merge_betas(
                Some("claude-code-20250219, interleaved-thinking-2025-05-14"),
                Some("interleaved-thinking-2025-05-14,context-1m-2025-08-07")
            ),
            Some("claude-code-20250219,interleaved-thinking-2025-05-14,context-1m-2025-08-07".into())
        );
        assert_eq!(merge_betas(None, Some("a")), Some("a".into()));
        assert_eq!(merge_betas(None, None), None);
    }
}
