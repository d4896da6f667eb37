//! Prometheus metrics. Labels are bounded: public model names and teams come from the config,
//! providers likewise; raw keys and client-supplied model names never become labels.

use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost_usd: CounterVec,
    pub duration: HistogramVec,
    pub ttfb: HistogramVec,
    pub in_flight: IntGauge,
    pub upstream_errors: IntCounterVec,
    pub unpriced: IntCounterVec,
    /// Records whose usage or cost is an estimate, by the rule that set it.
    pub estimated: IntCounterVec,
    pub audit_dropped: IntCounter,
    /// Trace spans by what became of them: `exported`, `dropped_queue`, `dropped_export`.
    pub otel_spans: IntCounterVec,
    /// Spend alert webhook calls: `sent`, `failed_attempt` (retried).
    pub alerts: IntCounterVec,
    pub attempts: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub cooldowns: IntCounterVec,
    pub endpoint_up: IntGaugeVec,
    pub refused: IntCounterVec,
    pub budget_remaining: prometheus::GaugeVec,
    pub limit_remaining: IntGaugeVec,
    pub ledger_queue: IntGauge,
    /// Keys and JWT principals the limiter counts now, and those forgotten while idle.
    pub key_scopes: IntGauge,
    pub key_scopes_forgotten: IntGauge,
    pub jwt_failures: IntCounterVec,
    pub betas_dropped: IntCounterVec,
    pub client_refused: IntCounterVec,
    pub open_connections: IntGaugeVec,
    /// Round trips to the fleet's shared backends (Redis, PostgreSQL).
    pub backend: Backend,
    /// 1 while the shared limiter is unreachable and this gateway counts on its own share.
    pub limits_local: IntGauge,
    /// Ledger rows in the local spool, waiting for the database.
    pub ledger_spooled: IntGauge,
}

/// Latency and failures of the calls a gateway makes to a shared backend, by backend and
/// operation. Cloned into the limiter and the store, which record their own calls.
#[derive(Clone)]
pub struct Backend {
    seconds: HistogramVec,
    errors: IntCounterVec,
}

impl Backend {
    fn new() -> Self {
        Backend {
            seconds: HistogramVec::new(
                HistogramOpts::new("tollgate_backend_seconds", "Round trips to Redis and PostgreSQL, by operation")
                    .buckets(BACKEND_BUCKETS.to_vec()),
                &["backend", "op"],
            )
            .unwrap(),
            errors: IntCounterVec::new(
                Opts::new("tollgate_backend_errors_total", "Failed or timed-out calls to Redis and PostgreSQL"),
                &["backend", "op"],
            )
            .unwrap(),
        }
    }

    pub fn observe(&self, backend: &str, op: &str, took: std::time::Duration) {
        self.seconds.with_label_values(&[backend, op]).observe(took.as_secs_f64());
    }

    pub fn error(&self, backend: &str, op: &str) {
        self.errors.with_label_values(&[backend, op]).inc();
    }
}

const BACKEND_BUCKETS: &[f64] = &[0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

const LATENCY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("tollgate_requests_total", "Requests handled, by final status class"),
            &["model", "provider", "status_class", "team"],
        )
        .unwrap();
        let tokens = IntCounterVec::new(
            Opts::new("tollgate_tokens_total", "Tokens metered, by class"),
            &["model", "provider", "team", "class"],
        )
        .unwrap();
        let cost_usd = CounterVec::new(
            Opts::new("tollgate_cost_usd_total", "Metered cost in USD"),
            &["model", "provider", "team"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new("tollgate_request_duration_seconds", "Whole request, first byte in to last byte out")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "provider", "stream"],
        )
        .unwrap();
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_time_to_first_byte_seconds",
                "Request start to the first response body byte sent",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "provider", "stream"],
        )
        .unwrap();
        let in_flight = IntGauge::new("tollgate_in_flight_requests", "Requests being handled now").unwrap();
        let upstream_errors = IntCounterVec::new(
            Opts::new("tollgate_upstream_errors_total", "Failed upstream exchanges, by kind"),
            &["provider", "kind"],
        )
        .unwrap();
        let unpriced = IntCounterVec::new(
            Opts::new("tollgate_unpriced_requests_total", "Requests metered for a model with no price"),
            &["model", "provider"],
        )
        .unwrap();
        let estimated = IntCounterVec::new(
            Opts::new(
                "tollgate_usage_estimated_total",
                "Requests whose usage is an estimate, not the provider's count, by the rule that priced them",
            ),
            &["model", "provider", "rule"],
        )
        .unwrap();
        let attempts = IntCounterVec::new(
            Opts::new("tollgate_upstream_attempts_total", "Tries at provider endpoints, by what became of them"),
            &["provider", "outcome"],
        )
        .unwrap();
        let fallbacks = IntCounterVec::new(
            Opts::new("tollgate_fallbacks_total", "Requests answered by other than their first attempt"),
            &["model"],
        )
        .unwrap();
        let cooldowns = IntCounterVec::new(
            Opts::new("tollgate_endpoint_cooldowns_total", "Times an endpoint left rotation after failures"),
            &["provider", "endpoint"],
        )
        .unwrap();
        let endpoint_up = IntGaugeVec::new(
            Opts::new("tollgate_endpoint_up", "1 while an endpoint is in rotation (probe up, not cooling down)"),
            &["provider", "endpoint"],
        )
        .unwrap();
        let refused = IntCounterVec::new(
            Opts::new("tollgate_refused_total", "Requests refused by a budget or rate limit, by reason"),
            &["reason"],
        )
        .unwrap();
        let budget_remaining = prometheus::GaugeVec::new(
            Opts::new(
                "tollgate_budget_remaining_usd",
                "Budget left in the current period (limit minus spend and reservations in flight), per team and user",
            ),
            &["scope", "id"],
        )
        .unwrap();
        let limit_remaining = IntGaugeVec::new(
            Opts::new("tollgate_rate_limit_remaining", "Headroom of a team's or user's rate limits, by limit"),
            &["scope", "id", "limit"],
        )
        .unwrap();
        let jwt_failures = IntCounterVec::new(
            Opts::new("tollgate_jwt_failures_total", "JWT credentials refused, by the check that failed"),
            &["reason"],
        )
        .unwrap();
        let betas_dropped = IntCounterVec::new(
            Opts::new(
                "tollgate_betas_dropped_total",
                "anthropic-beta values a provider's policy kept from it, by rule",
            ),
            &["provider", "rule"],
        )
        .unwrap();
        let client_refused = IntCounterVec::new(
            Opts::new(
                "tollgate_client_refused_total",
                "Connections and requests ended for how the client sent them (slow, oversized, too many), by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let open_connections = IntGaugeVec::new(
            Opts::new("tollgate_open_connections", "Client connections open now, per listener"),
            &["listener"],
        )
        .unwrap();
        let ledger_queue = IntGauge::new("tollgate_ledger_queue", "Ledger rows waiting to be committed").unwrap();
        let key_scopes = IntGauge::new(
            "tollgate_key_scopes",
            "Keys and JWT principals counted in memory (at most controls.max_principals)",
        )
        .unwrap();
        let key_scopes_forgotten = IntGauge::new(
            "tollgate_key_scopes_forgotten",
            "Idle keys and JWT principals forgotten to stay under controls.max_principals, since start",
        )
        .unwrap();
        let backend = Backend::new();
        let limits_local = IntGauge::new(
            "tollgate_limits_local_fallback",
            "1 while the shared limiter does not answer and this gateway counts on its share of the fleet's limits",
        )
        .unwrap();
        let ledger_spooled =
            IntGauge::new("tollgate_ledger_spooled_rows", "Ledger rows in the local spool, waiting for the database")
                .unwrap();
        let audit_dropped =
            IntCounter::new("tollgate_audit_dropped_total", "Usage records dropped because the audit queue was full")
                .unwrap();
        let alerts = IntCounterVec::new(
            Opts::new("tollgate_alert_webhooks_total", "Spend alert webhook calls, by result (sent, failed_attempt)"),
            &["result"],
        )
        .unwrap();
        let otel_spans = IntCounterVec::new(
            Opts::new("tollgate_otel_spans_total", "Trace spans, by what became of them (exported or dropped)"),
            &["result"],
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tokens.clone()),
            Box::new(cost_usd.clone()),
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(in_flight.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(unpriced.clone()),
            Box::new(estimated.clone()),
            Box::new(audit_dropped.clone()),
            Box::new(otel_spans.clone()),
            Box::new(alerts.clone()),
            Box::new(attempts.clone()),
            Box::new(fallbacks.clone()),
            Box::new(cooldowns.clone()),
            Box::new(endpoint_up.clone()),
            Box::new(refused.clone()),
            Box::new(budget_remaining.clone()),
            Box::new(limit_remaining.clone()),
            Box::new(ledger_queue.clone()),
            Box::new(key_scopes.clone()),
            Box::new(key_scopes_forgotten.clone()),
            Box::new(jwt_failures.clone()),
            Box::new(betas_dropped.clone()),
            Box::new(client_refused.clone()),
            Box::new(open_connections.clone()),
            Box::new(backend.seconds.clone()),
            Box::new(backend.errors.clone()),
            Box::new(limits_local.clone()),
            Box::new(ledger_spooled.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            tokens,
            cost_usd,
            duration,
            ttfb,
            in_flight,
            upstream_errors,
            unpriced,
            estimated,
            audit_dropped,
            otel_spans,
            alerts,
            attempts,
            fallbacks,
            cooldowns,
            endpoint_up,
            refused,
            budget_remaining,
            limit_remaining,
            ledger_queue,
            key_scopes,
            key_scopes_forgotten,
            jwt_failures,
            betas_dropped,
            client_refused,
            open_connections,
            backend,
            limits_local,
            ledger_spooled,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        use prometheus::Encoder;
        let mut out = Vec::with_capacity(16 << 10);
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
