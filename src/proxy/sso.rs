//! The sign-in endpoints on the client listener, for `tollgate login` and `tollgate token`:
//!
//! - `POST /sso/device`: starts a device sign-in; answers the code and where to enter it;
//! - `POST /sso/device/token` `{"device_code"}`: 202 while the person has not approved, then
//!   the session's refresh credential and a first gateway token;
//! - `POST /sso/refresh` `{"refresh_token"}`: a new gateway token;
//! - `POST /sso/logout` `{"refresh_token"}`: ends that sign-in;
//! - `GET /sso/settings`: Claude Code's managed settings for the bearer's groups.
//!
//! Errors come in the Anthropic shape, like every other answer of this listener.

use bytes::Bytes;
use http::Method;
use pingora_proxy::Session;
use serde_json::{json, Value};

use super::body::read_body;
use super::{ApiError, Gateway, RequestCtx};
use crate::audit::AuditEvent;
use crate::auth::presented_key;
use crate::sso::{DevicePoll, SsoError};

/// A sign-in request body is a few hundred bytes.
const MAX_SSO_BODY: usize = 16 << 10;

fn api_error(e: SsoError) -> ApiError {
    match e.status {
        401 => ApiError::authentication(e.message),
        403 => ApiError::permission(e.message),
        502 => ApiError::bad_gateway(e.message),
        400 => ApiError::invalid_request(e.message),
        _ => ApiError::unavailable(e.message),
    }
}

impl Gateway {
    pub(super) async fn serve_sso(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), ApiError> {
        // Sign-in traffic is not model usage: no ledger row.
        ctx.probe = true;
        let state = self.state.load_full();
        let Some(sso) = state.sso.as_ref() else {
            return Err(ApiError::not_found("this gateway offers no sign-in ([sso] is not configured)"));
        };
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        // JSON only: a web page cannot send it cross-site without the browser asking first.
        let json_body =
            session.req_header().headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(
                |v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")),
            );
        if method == Method::POST && !json_body {
            return Err(ApiError::invalid_request("sign-in requests are JSON: send content-type application/json"));
        }
        let store = self.runtime.store.clone();
        let client_ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip().to_string());
        // Sign-ins and tokens, given or refused, go to the audit log.
        let audit = |event: &'static str, answer: Result<&Value, &SsoError>| {
            let mut e = AuditEvent::new(event, "person");
            e.client_ip = client_ip.clone();
            match answer {
                Ok(v) => {
                    e.user = v["user"].as_str().map(str::to_string);
                    e.team = v["team"].as_str().map(str::to_string);
                    e.groups = serde_json::from_value(v["groups"].clone()).unwrap_or_default();
                    e.session = v["session"].as_str().map(str::to_string);
                }
                Err(x) => {
                    // A refusal that names nobody (a made-up credential) is not worth a line:
                    // anyone could fill the log, and the queue usage records share, with them.
                    if x.user.is_none() {
                        return;
                    }
                    e.user = x.user.clone();
                    e.detail = Some(x.message.clone());
                }
            }
            self.runtime.audit_event(e);
        };
        let (status, body) = match (path.as_str(), &method) {
            ("/sso/device", &Method::POST) => (200, sso.start_device().await.map_err(api_error)?),
            ("/sso/device/token", &Method::POST) => {
                let code = self.field(session, "device_code").await?;
                let polled = sso.poll_device(store, &code).await;
                match &polled {
                    Ok(DevicePoll::SignedIn(v)) => audit("sign_in", Ok(v)),
                    Err(e) if e.status == 401 || e.status == 403 => audit("sign_in_refused", Err(e)),
                    _ => {}
                }
                match polled.map_err(api_error)? {
                    DevicePoll::Pending { slow_down } => {
                        (202, json!({ "status": if slow_down { "slow_down" } else { "pending" } }))
                    }
                    DevicePoll::SignedIn(v) => (200, v),
                }
            }
            ("/sso/refresh", &Method::POST) => {
                let refresh = self.field(session, "refresh_token").await?;
                let refreshed = sso.refresh(store, &refresh).await;
                match &refreshed {
                    Ok(v) => audit("token", Ok(v)),
                    Err(e) if e.status == 401 || e.status == 403 => audit("token_refused", Err(e)),
                    Err(_) => {}
                }
                (200, refreshed.map_err(api_error)?)
            }
            ("/sso/logout", &Method::POST) => {
                let refresh = self.field(session, "refresh_token").await?;
                if let Some(user) = sso.logout(store, &refresh).await.map_err(api_error)? {
                    let mut e = AuditEvent::new("sign_out", "person");
                    e.user = Some(user);
                    e.client_ip = client_ip.clone();
                    self.runtime.audit_event(e);
                }
                // The same answer whether or not the credential named a sign-in.
                (200, json!({ "signed_out": true }))
            }
            ("/sso/settings", &Method::GET) => {
                let req = session.req_header();
                let token = presented_key(
                    req.headers.get("x-api-key").map(|v| v.as_bytes()),
                    req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
                )
                .ok_or_else(|| ApiError::authentication("send a gateway token (`tollgate token`)"))?;
                let settings = sso.settings(token).map_err(|e| {
                    self.metrics.jwt_failures.with_label_values(&[e.reason]).inc();
                    ApiError::authentication(e.message)
                })?;
                (200, settings)
            }
            ("/sso/device" | "/sso/device/token" | "/sso/refresh" | "/sso/logout", m) => {
                return Err(ApiError::method_not_allowed(format!("{m} is not allowed here: use POST")))
            }
            ("/sso/settings", m) => {
                return Err(ApiError::method_not_allowed(format!("{m} is not allowed here: use GET")))
            }
            _ => return Err(ApiError::not_found(format!("no sign-in endpoint at {path}"))),
        };
        if status == 200 && body.get("access_token").is_some() {
            self.seed_person(sso, &body).await?;
        }
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        self.answer_json(session, ctx, status, body).await
    }

    /// Before a person's token is handed out, their budget counts what the ledger holds for them
    /// this period (after a restart, or a sign-in after a long absence).
    async fn seed_person(&self, sso: &crate::sso::Sso, answer: &Value) -> Result<(), ApiError> {
        let user = answer["user"].as_str().unwrap_or_default();
        let groups: Vec<String> = serde_json::from_value(answer["groups"].clone()).unwrap_or_default();
        let Some(person) = sso.groups.principal(user, &groups, 0) else { return Ok(()) };
        let runtime = self.runtime.clone();
        tokio::task::spawn_blocking(move || runtime.seed_person(&person))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "seeding a person's budget did not finish");
                ApiError::unavailable("cannot count this person's budget now: try again later")
            })?
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot seed a person's budget from the ledger");
                ApiError::unavailable("cannot count this person's budget now: try again later")
            })
    }

    /// One string field of a small JSON body.
    async fn field(&self, session: &mut Session, name: &str) -> Result<String, ApiError> {
        let raw = read_body(session, MAX_SSO_BODY, self.body_timeouts).await?;
        let v: Value = serde_json::from_slice(&raw)
            .map_err(|e| ApiError::invalid_request(format!("the body is not JSON: {e}")))?;
        v.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ApiError::invalid_request(format!("the body needs a {name:?} string")))
    }
}
