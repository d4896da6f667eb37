//! Per-request state, from the first filter to the usage record.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::auth::ApiKey;
use crate::metering::{Estimate, Outcome, Price, UsageRecord};
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
    pub attempts: Vec<crate::metering::AttemptRecord>,
    /// The request's hold on its budgets and limits, settled when it ends.
    pub reservation: Option<crate::limits::Reservation>,
    /// The API format the client speaks; its answer keeps it.
    pub format: Format,
    /// Authenticated by its listener's `anonymous_key`, not by a key it sent.
    pub anonymous: bool,
    /// The deployment that answered is a regional Bedrock or Vertex endpoint.
    pub regional: bool,
    /// The request's worst-case cost on any deployment it may reach (admission's bound).
    pub worst_nanos: u64,
    /// The output tokens admission reserved (`max_tokens`, or the model's maximum): no
    /// estimate goes above it, as no provider generates more.
    pub output_cap: u64,
    /// Some `cache_control` in the request asked for a 1-hour TTL.
    pub cache_1h: bool,
    /// Charge an interrupted stream its worst case (`controls.interrupted = "reservation"` and
    /// a budget applies).
    pub interrupted_at_worst: bool,
    /// Why the usage is an estimate, when it is one.
    pub estimate: Option<Estimate>,
}

impl RequestCtx {
    pub fn new() -> Self {
        let time = SystemTime::now();
        RequestCtx {
            id: new_request_id(time),
            start: Instant::now(),
            time,
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
            regional: false,
            worst_nanos: 0,
            output_cap: 0,
            cache_1h: false,
            interrupted_at_worst: false,
            estimate: None,
        }
    }

    pub fn deployment(&self) -> Option<&Deployment> {
        self.route.as_ref().and_then(|r| r.deployments.get(self.deployment))
    }

    /// Takes what metering found. A successful answer without the provider's final count gets
    /// an estimate: output bounded by the content streamed when the stream reported its input
    /// side, the worst case when nothing at all was reported.
    pub fn take_metered(&mut self, m: &super::meter::Metered) {
        self.usage = m.usage;
        let answered = self.upstream_status.is_some_and(|s| (200..300).contains(&s));
        if m.final_usage || !answered {
            return;
        }
        match m.output_bound {
            Some(bound) if !self.usage.is_zero() => {
                let cap = if self.output_cap > 0 { self.output_cap } else { u64::MAX };
                self.usage.output_tokens = bound.min(cap).max(self.usage.output_tokens);
                self.estimate = Some(Estimate::StreamedContent);
            }
            _ => self.estimate = Some(Estimate::MissingUsage),
        }
    }

    /// The priced usage and cost, by the rules for estimates (docs/pricing.md).
    fn priced(&mut self) -> (u64, bool) {
        if self.cache_1h && self.usage.unsplit_writes_as_one_hour() {
            self.estimate.get_or_insert(Estimate::CacheTtlFromRequest);
        }
        let Some(price) = self.price.as_ref() else {
            // No price: the cost cannot be known; a worst case, if one was computed, still counts.
            let cost = if self.estimate == Some(Estimate::MissingUsage) { self.worst_nanos } else { 0 };
            return (cost, self.usage.is_zero() && self.estimate.is_none());
        };
        let cost = price.cost_nanos(&self.usage, self.regional);
        let cost = match self.estimate {
            Some(Estimate::MissingUsage) => cost.max(self.worst_nanos),
            Some(Estimate::StreamedContent) if self.interrupted_at_worst => {
                self.estimate = Some(Estimate::Reservation);
                cost.max(self.worst_nanos)
            }
            _ => cost,
        };
        (cost, true)
    }

    /// The usage record, priced; the attempts move into it.
    pub fn record(&mut self, method: &str, path: &str, client: Client) -> UsageRecord {
        let (cost_nanos, priced) = self.priced();
        let dep = self.deployment();
        UsageRecord {
            request_id: self.id.clone(),
            time: self.time,
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            user: self.key.as_ref().and_then(|k| k.user.clone()),
            team: self.key.as_ref().and_then(|k| k.team.clone()),
            auth: self.key.as_ref().map(|k| match (self.anonymous, k.jwt.is_some(), k.source) {
                (true, _, _) => "listener",
                (false, _, crate::auth::KeySource::Sso) => "sso",
                (false, true, _) => "jwt",
                (false, false, _) => "key",
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
            priced,
            usage_estimated: self.estimate,
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

/// `req_`, the request's time in milliseconds (12 hex digits) and 80 random bits (20 more):
/// unique across a fleet, and roughly in time order. The ledger's primary key is this id, so
/// a new row's index entry goes to one busy place in the index rather than to a random page
/// of it, which in a ledger of millions of rows cost a page read and write per insert.
fn new_request_id(time: SystemTime) -> String {
    let ms = time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64) & 0xffff_ffff_ffff;
    let bits: u128 = rand::random();
    format!("req_{ms:012x}{:020x}", bits >> 48)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_and_in_time_order() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_600_000_123);
        let a = new_request_id(t);
        assert_eq!(a.len(), 36, "{a}");
        assert!(a.starts_with("req_019ada5b2e7b"), "the time in ms, in hex: {a}");
        assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        let later = new_request_id(t + Duration::from_millis(1));
        assert!(later > a, "{later} sorts after {a}");
        let same: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id(t)).collect();
        assert_eq!(same.len(), 1000, "80 random bits tell requests of the same millisecond apart");
    }
}
