//! Per-request state, from the first filter to the usage record.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::auth::ApiKey;
use crate::metering::{Outcome, Price, UsageRecord};
use crate::protocol::inbound::Format;
use crate::protocol::usage::Usage;
use crate::routing::{Deployment, Route};

pub struct RequestCtx {
    pub id: String,
    pub start: Instant,
    pub time: SystemTime,
    /// `request_filter` ran and counted the request as in flight.
    pub in_flight: bool,
    /// Reachability probes (`HEAD /`) leave no usage record.
    pub probe: bool,
    pub key: Option<Arc<ApiKey>>,
    pub requested_model: Option<String>,
    pub route: Option<Arc<Route>>,
    /// Index into `route.deployments` of the deployment that served the request.
    pub deployment: usize,
    /// The model id sent to the provider.
    pub provider_model: Option<String>,
    pub price: Option<Arc<Price>>,
    pub stream: bool,
    pub upstream_status: Option<u16>,
    pub status: u16,
    pub usage: Usage,
    pub ttfb: Option<Duration>,
    pub outcome: Outcome,
    pub error: Option<String>,
    /// Every try at an endpoint, the abandoned ones first.
    pub attempts: Vec<super::AttemptRecord>,
    /// The request's hold on its budgets and limits, settled when it ends.
    pub reservation: Option<crate::limits::Reservation>,
    /// The API format the client speaks; its answer keeps it.
    pub format: Format,
    /// Authenticated by its listener's `anonymous_key`, not by a key it sent.
    pub anonymous: bool,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            id: new_request_id(),
            start: Instant::now(),
            time: SystemTime::now(),
            in_flight: false,
            probe: false,
            key: None,
            requested_model: None,
            route: None,
            deployment: 0,
            provider_model: None,
            price: None,
            stream: false,
            upstream_status: None,
            status: 0,
            usage: Usage::default(),
            ttfb: None,
            outcome: Outcome::Failed,
            error: None,
            attempts: Vec::new(),
            reservation: None,
            format: Format::Anthropic,
            anonymous: false,
        }
    }

    pub fn deployment(&self) -> Option<&Deployment> {
        self.route.as_ref().and_then(|r| r.deployments.get(self.deployment))
    }

    /// The usage record, priced; the attempts move into it.
    pub fn record(&mut self, method: &str, path: &str, client: Client) -> UsageRecord {
        let dep = self.deployment();
        let price = self.price.as_ref();
        let cost_nanos = price.map(|p| p.cost_nanos(&self.usage)).unwrap_or(0);
        UsageRecord {
            request_id: self.id.clone(),
            time: self.time,
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            user: self.key.as_ref().and_then(|k| k.user.clone()),
            team: self.key.as_ref().and_then(|k| k.team.clone()),
            auth: self.key.as_ref().map(|k| match (self.anonymous, k.jwt.is_some()) {
                (true, _) => "listener",
                (false, true) => "jwt",
                (false, false) => "key",
            }),
            format: self.format,
            jwt_issuer: self.key.as_ref().and_then(|k| k.jwt.as_ref()).map(|j| j.issuer.clone()),
            jwt_kid: self.key.as_ref().and_then(|k| k.jwt.as_ref()).and_then(|j| j.kid.clone()),
            client_ip: client.ip,
            user_agent: client.user_agent,
            session_id: client.session_id,
            method: method.to_string(),
            path: path.to_string(),
            requested_model: self.requested_model.clone(),
            model: self.route.as_ref().map(|r| r.name.clone()),
            provider: dep.map(|d| d.provider.name.clone()),
            provider_model: self.provider_model.clone(),
            upstream_status: self.upstream_status,
            status: self.status,
            stream: self.stream,
            usage: self.usage,
            cost_nanos,
            cost_usd: cost_nanos as f64 / 1e9,
            priced: price.is_some() || self.usage.is_zero(),
            latency_ms: self.start.elapsed().as_secs_f64() * 1e3,
            ttfb_ms: self.ttfb.map(|t| t.as_secs_f64() * 1e3),
            outcome: self.outcome,
            error: self.error.clone(),
            attempts: std::mem::take(&mut self.attempts),
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}

/// What the record says about the client, read from the downstream session.
#[derive(Default)]
pub struct Client {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub session_id: Option<String>,
}

/// `req_` and 24 hex digits: unique enough to find one request in a year of logs.
fn new_request_id() -> String {
    let bits: u128 = rand::random();
    format!("req_{:024x}", bits >> 32)
}
