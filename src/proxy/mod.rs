//! The gateway's request path: Pingora's `ProxyHttp`, with the whole exchange in
//! `request_filter`.
//!
//! Why not Pingora's `upstream_peer` phases: the body must be read whole before the request is
//! sent (to find the model, rewrite it, and later to replay it to a fallback or sign it), and
//! Pingora can replay only 64 KiB. So `request_filter` reads the body, sends it through
//! Pingora's pooled connector and streams the answer back itself; `logging` then writes the
//! usage record. See DESIGN.md §1.

mod context;
mod dialect;
mod errors;
mod exchange;
mod fallback;
mod headers;
mod meter;
mod models;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::Method;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

pub use crate::metering::AttemptRecord;
pub use context::{Client, RequestCtx};
pub use errors::ApiError;
pub use headers::REQUEST_ID_HEADER;

use crate::audit::AuditLog;
use crate::auth::{looks_like_jwt, presented_key, ApiKey, AuthError};
use crate::config::{ByReference, Config, Interrupted, Unpriced};
use crate::limits::{Actual, Demand, Hold, Limiter, Policy, Reservation, Scope, ScopeKind};
use crate::metering::{Asked, Outcome, DEFAULT_CONTEXT_WINDOW, DEFAULT_MAX_OUTPUT};
use crate::metrics::Metrics;
use crate::protocol::inbound::{from_bedrock, from_vertex, parse_path, Call};
use crate::protocol::json_peek::{peek_request, replace_string_value, RequestPeek};
use crate::protocol::references::{self, Reach};
use crate::routing::Route;
use crate::runtime::Runtime;
pub use crate::runtime::{SharedState, State};
use crate::store::LedgerRow;

/// Prompt tokens reserved beyond the body's size: what the provider adds around a prompt
/// (the tool-use system prompt is a few hundred tokens).
const PROMPT_OVERHEAD_TOKENS: u64 = 1024;

/// A request as admission sees it.
struct Admission<'a> {
    key: &'a ApiKey,
    route: &'a Route,
    requested: &'a str,
    /// `None` for a request that generates nothing (a token count).
    generation: Option<Generation<'a>>,
    /// The key's concurrency slot, taken before the body was read.
    held: Option<Hold>,
}

/// What admission needs to know about a request that generates (and costs).
struct Generation<'a> {
    body_len: usize,
    peek: &'a RequestPeek,
    reach: &'a Reach,
}

pub struct Gateway {
    runtime: Arc<Runtime>,
    state: SharedState,
    audit: AuditLog,
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
}

impl Gateway {
    pub fn new(runtime: Arc<Runtime>, config: &Config, audit: AuditLog, metrics: Arc<Metrics>) -> Self {
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
        let held = match key.policy.limits.concurrency {
            Some(_) => {
                let scope = Scope { kind: ScopeKind::Key, id: key.scope_id.clone(), policy: key.policy };
                let limiter: Arc<dyn Limiter> = self.runtime.limiter.clone();
                Some(limiter.hold(&scope).map_err(|refusal| {
                    self.metrics.refused.with_label_values(&[refusal.reason]).inc();
                    ApiError::refused(refusal)
                })?)
            }
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
        // refuse it after the request was reserved and sent.
        if let Err(e) = std::str::from_utf8(&raw) {
            return Err(ApiError::invalid_request(format!(
                "the body is not valid UTF-8: invalid byte at offset {}",
                e.valid_up_to()
            )));
        }
        let invalid = |e: crate::protocol::json_peek::JsonError| {
            ApiError::invalid_request(format!("the body is not valid JSON: {e}"))
        };
        // Every format becomes the Messages body; the client's own body is kept for a provider
        // that speaks the same format, which gets it unchanged.
        let (body, betas, original) = match &call {
            Call::Bedrock { model, stream } => {
                let (body, betas) = from_bedrock(&raw, model, *stream).map_err(invalid)?;
                (body, Some(betas.join(",")), Some(raw))
            }
            Call::BedrockCountTokens { model } => {
                let inner = crate::protocol::bedrock::count_tokens_inner(&raw).map_err(invalid)?;
                let (body, betas) = from_bedrock(&inner, model, false).map_err(invalid)?;
                (body, Some(betas.join(",")), Some(raw))
            }
            Call::Vertex { model, .. } => (from_vertex(&raw, Some(model)).map_err(invalid)?, None, Some(raw)),
            Call::VertexCountTokens => (from_vertex(&raw, None).map_err(invalid)?, None, Some(raw)),
            Call::Messages | Call::CountTokens => (raw, None, None),
        };
        let mut peek =
            peek_request(&body).map_err(|e| ApiError::invalid_request(format!("the body is not valid JSON: {e}")))?;
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
        let passthrough = route.deployments.iter().any(|d| d.model_id.is_none()).then_some(requested.as_str());
        if !key.allows(&route.name, passthrough) {
            return Err(ApiError::permission(format!("API key {:?} may not use model {}", key.id, route.name)));
        }
        ctx.route = Some(route.clone());
        // Every route is admitted; token counting is free, so it takes a request slot and
        // reserves nothing.
        let reach;
        let generation = if call.counts_tokens() {
            None
        } else {
            if peek.max_tokens_invalid {
                return Err(ApiError::invalid_request("max_tokens: must be a whole number from 1 up"));
            }
            // What the body reaches beyond its bytes matters to a budget's bound; without one,
            // pricing needs only the cache TTL.
            reach = if self.has_budget(&state, &key) {
                references::scan(&body, peek.mcp_servers, state.server_tool_uses)
            } else {
                Reach { cache_1h: references::asks_one_hour_cache(&body), ..Reach::default() }
            };
            ctx.cache_1h = reach.cache_1h;
            Some(Generation { body_len: body.len(), peek: &peek, reach: &reach })
        };
        let admission = Admission { key: &key, route: &route, requested: &requested, generation, held };
        ctx.reservation = self.admit(&state, ctx, admission)?;
        // Only session affinity needs the key; most requests never compute it.
        let affinity =
            route.deployments.iter().any(|d| d.provider.pool.selection == crate::providers::Selection::SessionAffinity);
        let affinity_key = if affinity { session_key(session.req_header(), &body, peek.metadata) } else { Vec::new() };
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

    /// The caller's key: from `server.key_header`, `x-api-key` or `Authorization: Bearer`, a
    /// JWT from a trusted issuer, or the listener's `anonymous_key` when none was sent.
    fn authenticate(&self, session: &Session, ctx: &mut RequestCtx, state: &State) -> Result<Arc<ApiKey>, ApiError> {
        let req = session.req_header();
        let custom = self.key_header.as_ref().and_then(|h| req.headers.get(h)).map(|v| v.as_bytes());
        let presented = custom.or(presented_key(
            req.headers.get("x-api-key").map(|v| v.as_bytes()),
            req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
        ));
        // A listener may stand in for clients that can send no key at all.
        let anonymous = match presented {
            None => session.server_addr().and_then(|a| a.as_inet()).and_then(|a| self.anonymous_key(*a)),
            Some(_) => None,
        };
        let keys = self.runtime.keys.load();
        let authenticated = match anonymous {
            Some(id) => {
                ctx.anonymous = true;
                keys.authenticate_id(id, SystemTime::now())
            }
            None => keys.authenticate(presented, SystemTime::now()),
        };
        let key = match authenticated {
            Ok(key) => key,
            // Not one of our keys: it may be a JWT from a trusted issuer.
            Err(AuthError::Unknown) if !state.jwt.is_empty() && presented.is_some_and(looks_like_jwt) => {
                state.jwt.verify(presented.unwrap_or_default()).map_err(|e| {
                    self.metrics.jwt_failures.with_label_values(&[e.reason]).inc();
                    ApiError::authentication(e.message)
                })?
            }
            Err(e) => return Err(ApiError::authentication(e.to_string())),
        };
        Ok(key)
    }

    /// The `anonymous_key` of the listener that accepted a connection on `local`: the listener
    /// configured for that address, else the wildcard one (`0.0.0.0`, `[::]`) on its port, of
    /// the connection's own address family first (a `[::]` listener may take IPv4 connections
    /// too, a `0.0.0.0` one never IPv6 ones).
    fn anonymous_key(&self, local: std::net::SocketAddr) -> Option<&String> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let wildcards: &[IpAddr] = match local {
            SocketAddr::V4(_) => &[IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
            SocketAddr::V6(_) => &[IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
        };
        let listener = std::iter::once(local)
            .chain(wildcards.iter().map(|ip| SocketAddr::new(*ip, local.port())))
            .find_map(|addr| self.anonymous.get(&addr))?;
        listener.as_ref()
    }

    /// Whether a budget applies to a request with this key: its own, its user's or its team's
    /// (models carry limits, not budgets).
    fn has_budget(&self, state: &State, key: &ApiKey) -> bool {
        let owner = |o: &Option<String>, table: &HashMap<String, (Arc<str>, Policy)>| {
            o.as_ref().and_then(|o| table.get(o)).is_some_and(|(_, p)| p.budget.is_some())
        };
        key.policy.budget.is_some() || owner(&key.user, &state.owners.users) || owner(&key.team, &state.owners.teams)
    }

    /// Reserves the request's worst case on every budget and limit that applies to it: its
    /// key, the key's user and team, and the model. `generation` describes a request that
    /// generates (and costs); `None` for one that does not. Returns `None` when nothing applies.
    fn admit(&self, state: &State, ctx: &mut RequestCtx, a: Admission) -> Result<Option<Reservation>, ApiError> {
        let Admission { key, route, requested, generation, held } = a;
        let mut scopes = Vec::with_capacity(4);
        if !key.policy.is_empty() {
            scopes.push(Scope { kind: ScopeKind::Key, id: key.scope_id.clone(), policy: key.policy });
        }
        for (kind, owner, table) in
            [(ScopeKind::User, &key.user, &state.owners.users), (ScopeKind::Team, &key.team, &state.owners.teams)]
        {
            if let Some((id, policy)) = owner.as_ref().and_then(|o| table.get(o)) {
                if !policy.is_empty() {
                    scopes.push(Scope { kind, id: id.clone(), policy: *policy });
                }
            }
        }
        if !route.limits.is_empty() {
            let policy = Policy { budget: None, limits: route.limits };
            scopes.push(Scope { kind: ScopeKind::Model, id: route.scope_id.clone(), policy });
        }
        let budgeted = scopes.iter().any(|s| s.policy.budget.is_some());
        let demand = match generation {
            None => Demand::default(),
            Some(g) => {
                let options = reachable(state, route, requested);
                let bounds = Bounds::of(&options);
                let output_tokens = match g.peek.max_tokens {
                    Some(n) if n > bounds.max_output => {
                        return Err(ApiError::invalid_request(format!(
                            "max_tokens: {n} is above the {} tokens model {} can generate",
                            bounds.max_output, route.name
                        )))
                    }
                    Some(n) => n,
                    None => bounds.max_output,
                };
                // An image costs by its pixels, not its bytes.
                let images = g.reach.images.saturating_mul(references::IMAGE_MAX_TOKENS);
                let mut prompt = (g.body_len as u64).saturating_add(PROMPT_OVERHEAD_TOKENS).saturating_add(images);
                if let (true, Some(field)) = (budgeted, g.reach.by_reference) {
                    if state.by_reference == ByReference::Refuse {
                        self.metrics.refused.with_label_values(&["by_reference"]).inc();
                        return Err(ApiError::permission(format!(
                            "{field}: this request brings content from outside its body, whose cost cannot be bounded \
                             before it runs, and a budget applies; the operator's policy refuses such requests"
                        )));
                    }
                    // Fetched content lands in the prompt: it can fill the model's window.
                    prompt = bounds.context_window;
                }
                if g.reach.pdf {
                    prompt = bounds.context_window;
                }
                // No provider bills a prompt larger than the window: it refuses it.
                prompt = prompt.min(bounds.context_window);
                let asked = Asked {
                    fast: g.peek.fast,
                    geo: g.peek.inference_geo.as_deref(),
                    regional: false,
                    web_searches: g.reach.web_searches,
                    web_fetches: g.reach.web_fetches,
                };
                let (worst, unpriced) = worst_case(&options, prompt, output_tokens, asked);
                if let (true, Some(model), Unpriced::Refuse) = (budgeted, unpriced, state.unpriced) {
                    return Err(ApiError::permission(format!(
                        "model {} has no price, so its cost cannot be counted against a budget; the operator can add \
                         a [[price]] for it or set controls.unpriced = \"allow\"",
                        shorten(&model)
                    )));
                }
                ctx.worst_nanos = worst;
                ctx.output_cap = output_tokens;
                ctx.interrupted_at_worst = budgeted && state.interrupted == Interrupted::Reservation;
                // Token limits reserve a typical prompt (about four bytes a token) and settle
                // to the real count; only budgets need the strict bound.
                Demand {
                    worst_nanos: if budgeted { worst } else { 0 },
                    input_tokens: g.body_len as u64 / 4,
                    output_tokens,
                }
            }
        };
        if scopes.is_empty() {
            return Ok(None);
        }
        let limiter: Arc<dyn Limiter> = self.runtime.limiter.clone();
        match limiter.admit_held(scopes, demand, held) {
            Ok(r) => Ok(Some(r)),
            Err(refusal) => {
                self.metrics.refused.with_label_values(&[refusal.reason]).inc();
                Err(ApiError::refused(refusal))
            }
        }
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

/// One deployment a request may reach, priced once for admission: its model id, its price
/// (`None`: unpriced) and whether it is a regional endpoint.
struct Reachable<'a> {
    model: &'a str,
    price: Option<Arc<crate::metering::Price>>,
    regional: bool,
}

/// Every deployment a request for `route` may reach (its own, and those of the model it falls
/// back to when the prompt is too long), each priced once.
fn reachable<'a>(state: &'a State, route: &'a Route, requested: &'a str) -> Vec<Reachable<'a>> {
    let fallback = route.context_fallback.as_deref().and_then(|f| state.models.resolve(f));
    route
        .deployments
        .iter()
        .chain(fallback.into_iter().flat_map(|r| r.deployments.iter()))
        .map(|d| {
            let model = d.model_id.as_deref().unwrap_or(requested);
            Reachable { model, price: d.price_for(&state.prices, model), regional: d.provider.regional(model) }
        })
        .collect()
}

/// The largest output and prompt any deployment of the request accepts.
struct Bounds {
    max_output: u64,
    context_window: u64,
}

impl Bounds {
    fn of(options: &[Reachable]) -> Bounds {
        let mut b = Bounds { max_output: 0, context_window: 0 };
        for o in options {
            let (out, window) = o
                .price
                .as_ref()
                .map_or((DEFAULT_MAX_OUTPUT, DEFAULT_CONTEXT_WINDOW), |p| (p.max_output, p.context_window));
            b.max_output = b.max_output.max(out);
            b.context_window = b.context_window.max(window);
        }
        b
    }
}

/// The most the request can cost on any deployment it may be sent to, and the first model on
/// the way that has no price (it adds nothing to the bound).
fn worst_case(options: &[Reachable], prompt: u64, output: u64, asked: Asked) -> (u64, Option<String>) {
    let mut worst = 0;
    let mut unpriced = None;
    for o in options {
        match &o.price {
            Some(p) => {
                let asked = Asked { regional: o.regional, ..asked };
                worst = worst.max(p.worst_case_nanos(prompt, output, &asked));
            }
            None => {
                unpriced.get_or_insert_with(|| o.model.to_string());
            }
        }
    }
    (worst, unpriced)
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

/// The body with `model` set to `model_id`. Takes the original by value so that, when a copy is
/// made, the original is freed now rather than held for the whole answer.
fn with_model(body: Bytes, span: std::ops::Range<usize>, requested: &str, model_id: &str) -> Bytes {
    if model_id == requested {
        body
    } else {
        replace_string_value(&body, span, model_id)
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

#[derive(Debug, Clone, Copy)]
struct BodyTimeouts {
    per_read: Duration,
    total: Duration,
}

/// Reads the whole request body, refusing it past `max` bytes (before reading, when
/// `Content-Length` already says so) and when it arrives too slowly (408).
async fn read_body(session: &mut Session, max: usize, timeouts: BodyTimeouts) -> Result<Bytes, ApiError> {
    let total = timeouts.total;
    session.set_read_timeout(Some(timeouts.per_read));
    match tokio::time::timeout(total, read_body_within(session, max, timeouts.per_read)).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::request_timeout(format!("the request body did not arrive within {total:?}"))),
    }
}

async fn read_body_within(session: &mut Session, max: usize, per_read: Duration) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("request body is larger than the {max} bytes allowed"));
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // The key was accepted: let the client send the body.
        let _ = session.write_continue_response().await;
    }
    // A body that arrives in one chunk is kept as it is; only a body in pieces is copied into
    // one buffer.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0;
    while let Some(chunk) = session.read_request_body().await.map_err(|e| match e.etype {
        pingora::ErrorType::ReadTimedout => {
            ApiError::request_timeout(format!("the request body sent nothing for {per_read:?}"))
        }
        _ => ApiError::invalid_request(format!("cannot read the request body: {e}")),
    })? {
        len += chunk.len();
        if len > max {
            return Err(too_large());
        }
        match (&mut joined, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&chunk),
            (None, None) => first = Some(chunk),
            (None, Some(head)) => {
                let mut buf = BytesMut::with_capacity(declared.unwrap_or(len).max(len));
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&chunk);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map(BytesMut::freeze).or(first).unwrap_or_default())
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

impl Gateway {
    /// Metrics and the usage record for a finished request.
    fn account(&self, session: &Session, ctx: &mut RequestCtx) {
        if ctx.status == 0 {
            ctx.status = session.response_written().map(|h| h.status.as_u16()).unwrap_or(0);
        }
        let model = ctx.route.as_ref().map(|r| r.name.as_str()).unwrap_or("none");
        let provider = ctx.deployment().map(|d| d.provider.name.as_str()).unwrap_or("none");
        let team = ctx.key.as_ref().and_then(|k| k.team.as_deref()).unwrap_or("none");
        let status_class = match ctx.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        let m = &self.metrics;
        m.requests.with_label_values(&[model, provider, status_class, team]).inc();
        if ctx.probe {
            return;
        }
        let stream = if ctx.stream { "true" } else { "false" };
        m.duration.with_label_values(&[model, provider, stream]).observe(ctx.start.elapsed().as_secs_f64());
        if let Some(t) = ctx.ttfb {
            m.ttfb.with_label_values(&[model, provider, stream]).observe(t.as_secs_f64());
        }
        let req = session.req_header();
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let client = Client {
            ip: session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string()),
            user_agent: header("user-agent"),
            session_id: header("x-claude-code-session-id"),
        };
        let record = ctx.record(req.method.as_str(), req.uri.path(), client);
        // The same labels as above, read from the record now that it owns the request's data.
        let model = record.model.as_deref().unwrap_or("none");
        let provider = record.provider.as_deref().unwrap_or("none");
        let team = record.team.as_deref().unwrap_or("none");
        let u = &record.usage;
        for (class, n) in [
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cache_read", u.cache_read_input_tokens),
            ("cache_write_5m", u.cache_creation_5m_input_tokens),
            ("cache_write_1h", u.cache_creation_1h_input_tokens),
        ] {
            if n > 0 {
                m.tokens.with_label_values(&[model, provider, team, class]).inc_by(n);
            }
        }
        if let Some(e) = record.usage_estimated {
            m.estimated.with_label_values(&[model, provider, e.as_str()]).inc();
        }
        if record.cost_nanos > 0 {
            m.cost_usd.with_label_values(&[model, provider, team]).inc_by(record.cost_usd);
        }
        if !record.priced {
            m.unpriced.with_label_values(&[model, provider]).inc();
        }
        // Requests without a key never reach a provider and cost nothing: the audit log has them.
        // The ledger row is queued before the reservation settles, so a budget re-read from the
        // ledger meanwhile (a reload) counts this request at least once.
        if record.key_id.is_some() {
            self.runtime.store.record(LedgerRow::from_record(&record));
        }
        if let Some(r) = ctx.reservation.take() {
            let u = &record.usage;
            let at_ms = record.time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            r.settle(Actual {
                cost_nanos: record.cost_nanos,
                input_tokens: u.input_tokens.saturating_add(u.cache_creation_input_tokens),
                output_tokens: u.output_tokens,
                at_ms,
            });
        }
        self.audit.submit(record);
    }
}
