//! After the answer: metrics, the usage record, the ledger row and the reservation's settlement.

use pingora_proxy::Session;

use super::{Client, Gateway, RequestCtx};
use crate::limits::Actual;
use crate::metering::Outcome;
use crate::store::LedgerRow;

impl Gateway {
    /// Metrics and the usage record for a finished request.
    pub(super) fn account(&self, session: &Session, ctx: &mut RequestCtx) {
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
        // Refusals (no provider asked, nothing spent) stay out of the ledger when the operator
        // says so; a request refused after an attempt at a provider keeps its row.
        let refusal = record.outcome == Outcome::Rejected && record.attempts.is_empty();
        if record.key_id.is_some() && (self.record_refused || !refusal) {
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
        // Sampled only now: a request refused before routing is traced too, and tracing off
        // costs one branch.
        // Only an authenticated caller's `traceparent` is followed: anyone else could force
        // tracing on (and fill the queue) or off.
        let traceparent = req.headers.get("traceparent").filter(|_| ctx.key.is_some()).map(|v| v.as_bytes());
        if let Some(sampled) = self.telemetry.sample(traceparent) {
            let state = self.state.load();
            let kind_of = |name: &str| state.providers.iter().find(|p| p.name == name).map(|p| p.kind);
            self.telemetry.record(sampled, &record, ctx.start, kind_of);
        }
        self.audit.submit(record);
    }
}
