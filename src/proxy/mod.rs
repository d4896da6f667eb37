//! The gateway's request path: Pingora's `ProxyHttp`, with the whole exchange in
//! `request_filter`.
//!
//! Why not Pingora's `upstream_peer` phases: the body must be read whole before the request is
//! sent (to find the model, rewrite it, and later to replay it to a fallback or sign it), and
//! Pingora can replay only 64 KiB. So `request_filter` reads the body, sends it through
//! Pingora's pooled connector and streams the answer back itself; `logging` then writes the
//! usage record. See DESIGN.md §1.

mod accounting;
mod admission;
mod body;
mod context;
mod dialect;
mod errors;
mod exchange;
mod fallback;
mod headers;
mod identity;
mod meter;
mod models;
mod payload;
mod sso;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::Method;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

pub use context::{Client, RequestCtx};
pub use errors::ApiError;
pub use headers::REQUEST_ID_HEADER;
use payload::Payload;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::limits::ScopeKind;
use crate::metering::Outcome;
use crate::metrics::Metrics;
use crate::protocol::inbound::{from_bedrock, from_vertex, parse_path, Call};
use crate::protocol::json_peek::peek_request;
use crate::protocol::references::{self, Reach};
use crate::runtime::Runtime;
use crate::runtime::{SharedState, State};
use crate::telemetry::Telemetry;
use admission::{caller_scopes, Admission, Generation};
use body::{read_body, BodyTimeouts};

pub struct Gateway {
    runtime: Arc<Runtime>,
    state: SharedState,
    audit: AuditLog,
    telemetry: Telemetry,
    metrics: Arc<Metrics>,
    /// A client that accepts no bytes for this long is dropped.
    client_write_timeout: Duration,
    /// Whole seconds a kept-alive connection may wait for its next request.
    client_idle_secs: u64,
    /// Bounds on receiving a request body: each read, and the whole.
    body_timeouts: BodyTimeouts,
    /// A header that carries the gateway key (for clients that can only add a custom header).
    key_header: Option<http::HeaderName>,
    /// Provider response headers clients get beyond the built-in list.
    response_headers: Vec<http::HeaderName>,
    /// Every listener's address, with the key its keyless requests count as, if any.
    anonymous: HashMap<std::net::SocketAddr, Option<String>>,
    /// When this gateway started: the `created_at` of the models it lists.
    started: SystemTime,
    /// Requests the gateway refused itself get a ledger row (`store.record_refused`).
    record_refused: bool,
}

impl Gateway {
    pub fn new(
        runtime: Arc<Runtime>,
        config: &Config,
        audit: AuditLog,
        telemetry: Telemetry,
        metrics: Arc<Metrics>,
    ) -> Self {
        let server = &config.server;
        let anonymous = config
            .listeners
            .iter()
            .filter_map(|l| {
                Some((l.address.get_ref().parse().ok()?, l.anonymous_key.as_ref().map(|k| k.get_ref().clone())))
            })
            .collect();
        Gateway {
            state: runtime.state.clone(),
            runtime,
            audit,
            telemetry,
            metrics,
            client_write_timeout: server.client_write_timeout,
            client_idle_secs: server.client_idle_timeout.as_secs().max(1),
            body_timeouts: BodyTimeouts { per_read: server.body_read_timeout, total: server.body_timeout },
            key_header: server.key_header.as_deref().and_then(|h| http::HeaderName::try_from(h).ok()),
            response_headers: server
                .response_headers
                .iter()
                .filter_map(|h| http::HeaderName::try_from(h.as_str()).ok())
                .collect(),
            anonymous,
            started: SystemTime::now(),
            record_refused: config.store.record_refused,
        }
    }

    async fn serve(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), ApiError> {
        let req = session.req_header();
        // HTTP/1.1 requires Host (RFC 9112 §3.2); HTTP/2 carries :authority instead.
        if req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST) {
            return Err(ApiError::invalid_request("the request has no Host header"));
        }
        if req.uri.path().len() > MAX_PATH {
            return Err(ApiError::uri_too_long(format!("the path is longer than {MAX_PATH} bytes")));
        }
        let call = match (req.uri.path(), &req.method) {
            ("/", &Method::HEAD) | ("/", &Method::GET) => {
                ctx.probe = true;
                return self.answer_probe(session, ctx, &b"{\"status\":\"ok\"}"[..]).await;
            }
            // Claude Code on Bedrock lists inference profiles at start; none are offered here:
            // models are addressed by the ids the gateway routes.
            (p, &Method::GET) if p == "/inference-profiles" || p.starts_with("/inference-profiles/") => {
                ctx.probe = true;
                return self.answer_probe(session, ctx, &b"{\"inferenceProfileSummaries\":[]}"[..]).await;
            }
            // Model discovery (Claude Code's `/model` picker on a gateway): the caller's models.
            (p, &Method::GET) if models::listing_path(p).is_some() => {
                let id = models::listing_path(p).flatten().map(str::to_string);
                let state = self.state.load_full();
                let key = self.authenticate(session, ctx, &state)?;
                ctx.probe = true;
                let (status, body) = models::answer(&state, &key, id.as_deref(), self.started)?;
                return self.answer_json(session, ctx, status, body).await;
            }
            (p, _) if p.starts_with("/sso/") => return self.serve_sso(session, ctx).await,
            (path, &Method::POST) => {
                parse_path(path).ok_or_else(|| ApiError::not_found(format!("no endpoint at POST {}", shorten(path))))?
            }
            (path, m) if parse_path(path).is_some() => {
                return Err(ApiError::method_not_allowed(format!("{m} is not allowed here: use POST")))
            }
            (path, m) => return Err(ApiError::not_found(format!("no endpoint at {m} {}", shorten(path)))),
        };
        ctx.format = call.format();

        let state = self.state.load_full();
        let key = self.authenticate(session, ctx, &state)?;
        ctx.key = Some(key.clone());
        // The key's concurrency slot is taken before its body is read: so the limit bounds the
        // bodies a key can hold in memory too, and a key at its limit is refused unread.
        let scopes = caller_scopes(&state, &key);
        let budgeted = scopes.iter().any(|s| s.policy.budget.is_some());
        let key_scope = scopes.first().filter(|s| s.kind == ScopeKind::Key);
        let held = match key_scope.filter(|s| s.policy.limits.concurrency.is_some()) {
            Some(scope) => Some(self.runtime.limiter.hold(scope).await.map_err(|refusal| {
                self.metrics.refused.with_label_values(&[refusal.reason]).inc();
                ApiError::refused(refusal)
            })?),
            None => None,
        };

        let raw = read_body(session, state.max_body_bytes, self.body_timeouts).await.inspect_err(|e| {
            let reason = match e.status {
                408 => "body_timeout",
                413 => "body_too_large",
                _ => return,
            };
            self.metrics.client_refused.with_label_values(&[reason]).inc();
        })?;
        // JSON is UTF-8 (RFC 8259 §8.1): refuse anything else here rather than let the provider
        // refuse it after the request was reserved and sent. Checked with SIMD (a quarter of
        // std's cost on a large prompt); std finds the offset for the refusal.
        if simdutf8::basic::from_utf8(&raw).is_err() {
            let at = std::str::from_utf8(&raw).err().map_or(0, |e| e.valid_up_to());
            return Err(ApiError::invalid_request(format!("the body is not valid UTF-8: invalid byte at offset {at}")));
        }
        // Every format becomes the Messages body; the client's own body is kept for a provider
        // that speaks the same format, which gets it unchanged.
        let (body, betas, original) = match &call {
            Call::Bedrock { model, stream } => {
                let (body, betas) = from_bedrock(&raw, model, *stream)?;
                (body, Some(betas.join(",")), Some(raw))
            }
            Call::BedrockCountTokens { model } => {
                let inner = crate::protocol::bedrock::count_tokens_inner(&raw)?;
                let (body, betas) = from_bedrock(&inner, model, false)?;
                (body, Some(betas.join(",")), Some(raw))
            }
            Call::Vertex { model, .. } => (from_vertex(&raw, Some(model))?, None, Some(raw)),
            Call::VertexCountTokens => (from_vertex(&raw, None)?, None, Some(raw)),
            Call::Messages | Call::CountTokens => (raw, None, None),
        };
        // What the body reaches beyond its bytes matters to a budget's bound (and its cache TTL
        // to pricing): the peek's walk finds it on the way. Token counting needs neither.
        let (mut peek, reach) = if call.counts_tokens() {
            (peek_request(&body)?, Reach::default())
        } else {
            references::peek_and_scan(&body, state.server_tool_uses)?
        };
        if let (true, Some(why)) = (budgeted, &reach.unreadable) {
            return Err(ApiError::invalid_request(format!(
                "the body cannot be read exactly ({why}), so its cost cannot be bounded, and a budget applies"
            )));
        }
        let (requested, model_span) =
            peek.model.take().ok_or_else(|| ApiError::invalid_request("model: field required"))?;
        ctx.stream = peek.stream;
        let route = state
            .models
            .resolve(&requested)
            .ok_or_else(|| ApiError::not_found(format!("model: {}", shorten(&requested))))?
            .clone();
        ctx.requested_model = Some(shorten(&requested).into_owned());
        // A pass-through deployment sends the requested name on, so that name must be allowed;
        // a fixed one sends its own id, so the route's public name counts.
        let passthrough = route.passthrough.then_some(requested.as_str());
        if !key.allows(&route.name, passthrough) {
            return Err(ApiError::permission(format!("API key {:?} may not use model {}", key.id, route.name)));
        }
        ctx.route = Some(route.clone());
        // Every route is admitted; token counting is free, so it takes a request slot and
        // reserves nothing.
        let generation = if call.counts_tokens() {
            None
        } else {
            if peek.max_tokens_invalid {
                return Err(ApiError::invalid_request("max_tokens: must be a whole number from 1 up"));
            }
            ctx.cache_1h = reach.cache_1h;
            Some(Generation { body_len: body.len(), peek: &peek, reach: &reach })
        };
        let admission = Admission { scopes, route: &route, requested: &requested, generation, held };
        let ask = self.admission(&state, ctx, admission)?;
        ctx.reservation = self.reserve(ask).await?;
        // Only session affinity needs the key; most requests never compute it.
        let affinity_key =
            if route.affinity { session_key(session.req_header(), &body, peek.metadata) } else { Vec::new() };
        let request = fallback::Request {
            body,
            model_span,
            requested,
            affinity_key,
            metered: !call.counts_tokens(),
            format: call.format(),
            original,
            betas,
        };
        self.forward(session, ctx, &state, route, request).await
    }

    async fn answer_json(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        status: u16,
        body: Bytes,
    ) -> Result<(), ApiError> {
        let mut h = ResponseHeader::build(status, Some(3)).expect("valid status");
        let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = h.insert_header(http::header::CONTENT_LENGTH, body.len());
        let _ = h.insert_header(REQUEST_ID_HEADER, ctx.id.as_str());
        ctx.status = status;
        ctx.outcome = Outcome::Complete;
        if session.write_response_header(Box::new(h), false).await.is_ok() {
            let _ = session.write_response_body(Some(body), true).await;
        }
        Ok(())
    }

    async fn answer_probe(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: &'static [u8],
    ) -> Result<(), ApiError> {
        let body = Bytes::from_static(body);
        let mut h = ResponseHeader::build(200, Some(3)).expect("valid status");
        let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = h.insert_header(http::header::CONTENT_LENGTH, body.len());
        let _ = h.insert_header(REQUEST_ID_HEADER, ctx.id.as_str());
        ctx.status = 200;
        ctx.outcome = Outcome::Complete;
        let head = session.req_header().method == Method::HEAD;
        if session.write_response_header(Box::new(h), head).await.is_ok() && !head {
            let _ = session.write_response_body(Some(body), true).await;
        }
        Ok(())
    }

    /// Answers `err` to the client, or, when the answer already started, cuts the connection so
    /// the client cannot take a truncated answer for a whole one.
    async fn answer_error(&self, session: &mut Session, ctx: &mut RequestCtx, err: ApiError) {
        ctx.outcome = err.outcome;
        ctx.error.get_or_insert_with(|| err.message.clone());
        if session.response_written().is_some() {
            session.shutdown().await;
            return;
        }
        // A body left unread would be drained before the connection could be reused, at
        // whatever pace the client likes: close instead.
        let close = err.close || !session.is_body_done();
        let mut err = err;
        err.close = close;
        let (header, body) = err.answer(ctx.format, &ctx.id);
        ctx.status = header.status.as_u16();
        if close {
            session.set_keepalive(None);
        }
        if session.write_response_header(Box::new(header), false).await.is_ok() {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }
}

/// What keeps a session on one endpoint: Claude Code's session id, else `metadata.user_id`.
fn session_key(req: &pingora::http::RequestHeader, body: &[u8], metadata: Option<std::ops::Range<usize>>) -> Vec<u8> {
    if let Some(v) = req.headers.get("x-claude-code-session-id") {
        return v.as_bytes().to_vec();
    }
    #[derive(serde::Deserialize)]
    struct Metadata {
        user_id: Option<String>,
    }
    metadata
        .and_then(|span| serde_json::from_slice::<Metadata>(&body[span]).ok())
        .and_then(|m| m.user_id)
        .map(String::into_bytes)
        .unwrap_or_default()
}

/// The body with `model` set to `model_id`: the client's own bytes when that is the name it
/// asked for, else its bytes around the new value (see [`Payload`]).
fn with_model(body: &Bytes, span: std::ops::Range<usize>, requested: &str, model_id: &str) -> Payload {
    if model_id == requested {
        Payload::whole(body.clone())
    } else {
        Payload::with_string(body, span, model_id)
    }
}

/// No API path comes near this; longer ones are refused with 414.
const MAX_PATH: usize = 2048;

/// Client-supplied names are cut to this many characters before they are echoed or recorded.
const MAX_ECHO: usize = 200;

fn shorten(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(MAX_ECHO) {
        Some((i, _)) => format!("{}…", &s[..i]).into(),
        None => s.into(),
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx::new()
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        // `request_filter` answers every request; Pingora's own upstream phase never runs.
        Error::e_explain(InternalError, "the gateway answers in request_filter")
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        self.metrics.in_flight.inc();
        ctx.in_flight = true;
        // Pingora keeps an idle HTTP/1.1 connection open for ever by default. Only bound it:
        // a client that asked to close (or HTTP/1.0 without keep-alive) still gets its close.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.client_idle_secs));
        }
        if let Err(e) = self.serve(session, ctx).await {
            self.answer_error(session, ctx, e).await;
        }
        Ok(true)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&pingora::Error>, ctx: &mut Self::CTX) {
        self.account(session, ctx);
        // Last, so a drain that waits for zero in flight also waits for the record.
        if ctx.in_flight {
            self.metrics.in_flight.dec();
        }
    }
}
