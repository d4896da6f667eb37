//! The admin listener: Prometheus metrics, health probes, and the `/admin/` API (keys, usage,
//! budgets, reload) behind a bearer token. Keep it off public networks.

// Handlers return the error answer itself as `Err`: it is built once per admin call, so its
// size does not matter.
#![allow(clippy::result_large_err)]

mod console;
mod keys;
mod people;
mod reports;
mod session;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::limits::{rfc3339, ScopeKind, ScopeStatus};
use crate::metering::usd;
use crate::providers::now_ms;
use crate::runtime::{AdminToken, Runtime};

/// Admin request bodies are small JSON documents.
const MAX_BODY: usize = 64 << 10;

#[derive(Clone)]
pub struct Admin {
    runtime: Arc<Runtime>,
    sessions: Arc<session::Sessions>,
}

impl Admin {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        Admin { runtime, sessions: Arc::default() }
    }
}

type Reply = Response<Vec<u8>>;

fn ok(status: u16, value: Value) -> Reply {
    let body = serde_json::to_vec_pretty(&value).expect("JSON values serialize");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        // Answers carry key secrets (create, rotate) and spend: never kept by a cache.
        .header(http::header::CACHE_CONTROL, "no-store")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("valid response")
}

/// An error in the same shape as the proxy's.
fn error(status: u16, kind: &str, message: impl Into<String>) -> Reply {
    ok(status, json!({"type": "error", "error": {"type": kind, "message": message.into()}}))
}

/// A scope's budget and limits as the API shows them; money as exact decimal strings.
fn status_json(s: &ScopeStatus) -> Value {
    let mut v = json!({ "in_flight": s.in_flight });
    if let Some(limit) = s.limit_nanos {
        v["budget"] = json!({
            "limit_usd": usd(limit),
            "spent_usd": usd(s.spent_nanos),
            "reserved_usd": usd(s.reserved_nanos),
            "remaining_usd": usd(limit.saturating_sub(s.spent_nanos).saturating_sub(s.reserved_nanos)),
            "period": s.period,
            "period_start": s.period_start_ms.map(rfc3339),
            "resets_at": s.resets_at_ms.map(rfc3339),
        });
    }
    if let Some(r) = s.requests_remaining {
        v["requests_remaining"] = json!(r);
    }
    if let Some(r) = s.input_tokens_remaining {
        v["input_tokens_remaining"] = json!(r);
    }
    if let Some(r) = s.output_tokens_remaining {
        v["output_tokens_remaining"] = json!(r);
    }
    v
}

/// Compares in time independent of where the first difference is, and of the lengths: the
/// digests are compared, not the secrets.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes a path segment: `%XX` escapes only (a `+` in a path is a plus, not a space; e-mail
/// addresses have them).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Admin {
    /// The admin token as a bearer token, or a console session (whose changes must carry its
    /// CSRF token in `x-csrf-token`).
    fn authorized(&self, session: &ServerSession) -> Result<(), Reply> {
        let req = session.req_header();
        if req.headers.get(http::header::AUTHORIZATION).is_none() {
            if let Some(id) = session::cookie_of(req.headers.get(http::header::COOKIE)) {
                return self.console_session(&id, req);
            }
        }
        self.bearer(session)
    }

    fn console_session(&self, id: &str, req: &pingora::http::RequestHeader) -> Result<(), Reply> {
        let token = self.runtime.admin_token.load_full();
        let AdminToken::Set(token) = &*token else {
            return Err(error(401, "authentication_error", "the admin API is closed: set admin.token in the config"));
        };
        let Some(csrf) = self.sessions.check(id, token.expose()) else {
            return Err(error(401, "authentication_error", "the console session has ended: sign in again"));
        };
        if matches!(req.method, Method::GET | Method::HEAD) {
            return Ok(());
        }
        let sent = req.headers.get("x-csrf-token").map(|v| v.as_bytes()).unwrap_or_default();
        if same_secret(sent, csrf.as_bytes()) {
            Ok(())
        } else {
            Err(error(403, "permission_error", "a change from the console needs its x-csrf-token header"))
        }
    }

    fn bearer(&self, session: &ServerSession) -> Result<(), Reply> {
        let token = self.runtime.admin_token.load_full();
        let token = match &*token {
            AdminToken::Set(t) => t,
            AdminToken::Unset => {
                return Err(error(
                    401,
                    "authentication_error",
                    "the admin API is closed: set admin.token in the config",
                ))
            }
            AdminToken::Unreadable(why) => {
                return Err(error(401, "authentication_error", format!("the admin API is closed: {why}")))
            }
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match presented {
            Some(p) if same_secret(p.as_bytes(), token.expose().as_bytes()) => Ok(()),
            Some(_) => Err(error(401, "authentication_error", "invalid admin token")),
            None => Err(error(401, "authentication_error", "send the admin token as Authorization: Bearer <token>")),
        }
    }

    async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Reply> {
        let mut body = BytesMut::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return Err(error(
                            413,
                            "request_too_large",
                            format!("admin bodies are at most {MAX_BODY} bytes"),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.to_vec()),
                Err(e) => return Err(error(400, "invalid_request_error", format!("cannot read the body: {e}"))),
            }
        }
    }

    /// `/admin/...`: authenticated, then routed by method and path.
    async fn api(&self, session: &mut ServerSession, path: &str) -> Reply {
        if let Err(r) = self.authorized(session) {
            return r;
        }
        let method = session.req_header().method.clone();
        let params: HashMap<String, String> = session
            .req_header()
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let body = match method {
            Method::POST | Method::PATCH | Method::PUT => match Self::read_body(session).await {
                Ok(b) => b,
                Err(r) => return r,
            },
            _ => Vec::new(),
        };
        let segments: Vec<String> =
            path.trim_start_matches("/admin/").split('/').filter(|s| !s.is_empty()).map(percent_decode).collect();
        if method == Method::POST && segments == ["reload"] {
            let rt = self.runtime.clone();
            return match tokio::task::spawn_blocking(move || rt.reload()).await {
                Ok(Ok(())) => ok(200, json!({"reloaded": true})),
                Ok(Err(e)) => {
                    error(400, "invalid_request_error", format!("reload refused, the running config stays: {e}"))
                }
                Err(e) => error(500, "api_error", e.to_string()),
            };
        }
        // The store and a shared limiter answer over the network: the call waits on a thread
        // of its own, so a slow report never holds up `/healthz` and `/readyz` on this listener.
        let (admin, path) = (self.clone(), path.to_string());
        tokio::task::spawn_blocking(move || admin.dispatch(&method, &segments, &params, &body, &path))
            .await
            .unwrap_or_else(|e| error(500, "api_error", format!("the admin call failed: {e}")))
    }

    fn dispatch(
        &self,
        method: &Method,
        segments: &[String],
        params: &HashMap<String, String>,
        body: &[u8],
        path: &str,
    ) -> Reply {
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let body_or_empty = if body.is_empty() { &b"{}"[..] } else { body };
        match (method, segs.as_slice()) {
            (&Method::GET, ["keys"]) => self.list_keys(),
            (&Method::POST, ["keys"]) => self.create_key(body_or_empty),
            (&Method::GET, ["keys", id]) => self.show_key(id),
            (&Method::PATCH, ["keys", id]) => self.update_key(id, body_or_empty),
            (&Method::DELETE, ["keys", id]) => self.delete_key(id),
            (&Method::POST, ["keys", id, "rotate"]) => self.rotate_key(id),
            (&Method::POST, ["keys", id, "disable"]) => self.set_disabled(id, true),
            (&Method::POST, ["keys", id, "enable"]) => self.set_disabled(id, false),
            (&Method::GET, ["usage"]) => self.usage(params),
            (&Method::GET, ["budgets"]) => self.budgets(),
            (&Method::GET, ["overview"]) => self.overview(),
            (&Method::GET, ["people"]) => self.people(),
            (&Method::POST, ["people", user, action @ ("revoke" | "disable" | "enable")]) => {
                self.person_action(user, action)
            }
            (
                _,
                ["keys"]
                | ["keys", _]
                | ["keys", _, _]
                | ["usage"]
                | ["budgets"]
                | ["overview"]
                | ["reload"]
                | ["people"]
                | ["people", _, _],
            ) => error(405, "invalid_request_error", format!("{method} is not allowed on {path}")),
            _ => error(404, "not_found_error", format!("no admin endpoint at {path}")),
        }
    }

    /// Pools and the health of each endpoint, as JSON; why a provider is not ready only with
    /// `detail` (the admin token was presented).
    fn status(&self, detail: bool) -> Value {
        let state = self.runtime.state.load();
        let now = now_ms();
        let providers: Vec<_> = state
            .providers
            .iter()
            .map(|p| {
                let problem = p.unready_reason().or_else(|| p.credential_problem());
                let endpoints: Vec<_> = p
                    .endpoints
                    .iter()
                    .map(|e| {
                        let cooling = e.passive.cooling_down_for(now);
                        let probe_up = p.pool.probed_healthy(e);
                        json!({
                            "endpoint": e.label.clone(),
                            "address": e.address().map(|a| a.to_string()),
                            "dns_error": e.dns_error(),
                            "probe_up": probe_up,
                            "in_rotation": probe_up && cooling.is_none() && e.address().is_some(),
                            "cooldown_remaining_ms": cooling.map(|d| d.as_millis() as u64),
                            "consecutive_failures": e.passive.consecutive_failures(),
                            "cooldowns": e.passive.cooldowns(),
                            "in_flight": e.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                            "weight": e.weight,
                        })
                    })
                    .collect();
                json!({
                    "provider": p.name,
                    "selection": p.pool.selection,
                    "credentials": p.credential_count(),
                    "ready": problem.is_none(),
                    "problem": problem.map(|why| if detail { why } else { "not ready: details with the admin token".into() }),
                    "endpoints": endpoints,
                })
            })
            .collect();
        json!({ "providers": providers })
    }

    /// Gauges computed at scrape time rather than on the request path.
    fn update_gauges(&self) {
        let m = &self.runtime.metrics;
        let state = self.runtime.state.load();
        let now = now_ms();
        for p in &state.providers {
            for e in &p.endpoints {
                let up = p.pool.probed_healthy(e) && e.passive.available(now) && e.address().is_some();
                m.endpoint_up.with_label_values(&[&p.name, &e.label]).set(up as i64);
            }
        }
        // Teams and users come from the config, so these labels stay bounded.
        for scope in self.runtime.scopes().iter().filter(|s| s.kind != ScopeKind::Key) {
            let st = self.runtime.limiter_status(scope);
            let (kind, id) = (scope.kind.name(), &*scope.id);
            if let Some(limit) = st.limit_nanos {
                let left = limit.saturating_sub(st.spent_nanos).saturating_sub(st.reserved_nanos);
                m.budget_remaining.with_label_values(&[kind, id]).set(left as f64 / 1e9);
            }
            let l = scope.policy.limits;
            let headroom = [
                ("rpm", st.requests_remaining.map(|r| r as i64)),
                ("input_tpm", st.input_tokens_remaining),
                ("output_tpm", st.output_tokens_remaining),
                ("concurrency", l.concurrency.map(|c| i64::from(c) - i64::from(st.in_flight))),
            ];
            for (limit, value) in headroom {
                if let Some(v) = value {
                    m.limit_remaining.with_label_values(&[kind, id, limit]).set(v);
                }
            }
        }
        m.ledger_queue.set(self.runtime.store.pending() as i64);
        m.ledger_spooled.set(self.runtime.store.spooled() as i64);
        m.limits_local.set(i64::from(self.runtime.limiter.counting_locally()));
        let (keys, forgotten) = self.runtime.limiter.key_scopes();
        m.key_scopes.set(keys as i64);
        m.key_scopes_forgotten.set(forgotten as i64);
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if path.starts_with("/admin/") {
            return self.api(session, &path).await;
        }
        if path == "/console" || path.starts_with("/console/") {
            return self.console(session, &path).await;
        }
        match path.as_str() {
            "/metrics" => {
                // Budget gauges read a shared limiter over the network: off this thread.
                let admin = self.clone();
                let _ = tokio::task::spawn_blocking(move || admin.update_gauges()).await;
                let body = self.runtime.metrics.render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .expect("valid response")
            }
            "/status" => ok(200, self.status(self.authorized(session).is_ok())),
            "/healthz" => ok(200, json!({"status": "ok"})),
            "/readyz" => {
                // The reasons can name roles, accounts, files and hosts: in full only for the
                // admin token; a probe without it learns which part is not ready.
                let detail = self.authorized(session).is_ok();
                let state = self.runtime.state.load();
                let problems: Vec<String> = state
                    .providers
                    .iter()
                    .filter_map(|p| {
                        let why = p.unready_reason().or_else(|| p.credential_problem())?;
                        Some(if detail { why } else { format!("provider {}: not ready", p.name) })
                    })
                    .chain(self.runtime.store.problem().map(|why| if detail { why } else { "store: not ready".into() }))
                    .collect();
                if problems.is_empty() {
                    ok(200, json!({"status": "ready"}))
                } else {
                    ok(503, json!({"status": "not ready", "problems": problems}))
                }
            }
            _ => error(404, "not_found_error", format!("no admin endpoint at {path}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn path_segments_decode_escapes_only() {
        assert_eq!(percent_decode("alice+oncall@example.com"), "alice+oncall@example.com");
        assert_eq!(percent_decode("alice%2Boncall%40example.com"), "alice+oncall@example.com");
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        // A broken escape stays as it came.
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
