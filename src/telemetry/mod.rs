//! OpenTelemetry traces: one trace per request, its attempts at providers as child spans, with
//! the GenAI semantic conventions' model, token and provider attributes and the request's cost.
//!
//! The request path decides sampling (a client's `traceparent`, else `sample_ratio`), builds
//! the spans from the finished usage record and pushes them onto a bounded batch under a short
//! mutex, as the audit log does; a thread of its own encodes them as OTLP protobuf and posts
//! them to the collector. A full batch or a failed export drops spans and counts them: tracing
//! never makes a request wait.

mod export;
pub mod otlp;
pub mod trace_context;

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntCounterVec;

use crate::config::{ProviderKind, TelemetryConfig};
use crate::metering::{Outcome, UsageRecord};
pub use export::Exporter;
use otlp::{Kind, Span, Value};
pub use trace_context::{parse_traceparent, Parent};

struct Shared {
    batch: Mutex<Vec<Span>>,
    capacity: usize,
    sample_ratio: f64,
    spans: IntCounterVec,
}

/// The request path's side; cheap to clone. Off (no endpoint), every call is one branch.
#[derive(Clone, Default)]
pub struct Telemetry {
    shared: Option<Arc<Shared>>,
}

/// Starts the exporter thread when `[telemetry] otlp_endpoint` is set. `spans` counts spans by
/// `result`: `exported`, `dropped_queue`, `dropped_export`.
pub fn start(config: &TelemetryConfig, spans: IntCounterVec) -> Result<(Telemetry, Option<export::Exporter>), String> {
    let Some(endpoint) = &config.otlp_endpoint else { return Ok((Telemetry::default(), None)) };
    let mut headers = Vec::new();
    for (name, value) in &config.headers {
        let secret = value.resolve().map_err(|e| format!("telemetry.headers.{name}: {e}"))?;
        headers.push((name.clone(), secret));
    }
    let shared = Arc::new(Shared {
        batch: Mutex::new(Vec::with_capacity(256)),
        capacity: config.queue_capacity,
        sample_ratio: config.sample_ratio,
        spans,
    });
    let resource = vec![
        ("service.name", Value::Str(config.service_name.clone())),
        ("service.version", Value::Str(env!("CARGO_PKG_VERSION").into())),
    ];
    let exporter = export::Exporter::start(export::Settings {
        endpoint: endpoint.clone(),
        headers,
        resource,
        interval: config.export_interval,
        timeout: config.export_timeout,
        shared: shared.clone(),
    })
    .map_err(|e| format!("cannot start the telemetry exporter: {e}"))?;
    Ok((Telemetry { shared: Some(shared) }, Some(exporter)))
}

/// The request's place in a trace, decided when it ends.
pub struct Sampled {
    trace_id: [u8; 16],
    parent: Option<[u8; 8]>,
}

impl Telemetry {
    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether this request is traced, from the client's `traceparent` header when it sent a
    /// valid one (its `sampled` flag decides), else by the configured ratio.
    pub fn sample(&self, traceparent: Option<&[u8]>) -> Option<Sampled> {
        let shared = self.shared.as_ref()?;
        match traceparent.and_then(parse_traceparent) {
            Some(p) if p.sampled => Some(Sampled { trace_id: p.trace_id, parent: Some(p.span_id) }),
            Some(_) => None,
            None => {
                let trace_id: [u8; 16] = rand::random();
                trace_context::sampled_by_ratio(&trace_id, shared.sample_ratio)
                    .then_some(Sampled { trace_id, parent: None })
            }
        }
    }

    /// Queues the request's spans: the request (SERVER) and each attempt (CLIENT).
    /// `started` is when the request began; `kind_of` names a configured provider's kind.
    pub fn record(
        &self,
        sampled: Sampled,
        record: &UsageRecord,
        started: Instant,
        kind_of: impl Fn(&str) -> Option<ProviderKind>,
    ) {
        let Some(shared) = &self.shared else { return };
        let spans = spans(sampled, record, started, kind_of);
        let n = spans.len() as u64;
        let mut batch = shared.batch.lock().unwrap_or_else(|p| p.into_inner());
        if batch.len() + spans.len() <= shared.capacity {
            batch.extend(spans);
            return;
        }
        drop(batch);
        shared.spans.with_label_values(&["dropped_queue"]).inc_by(n);
    }
}

/// The GenAI conventions' `gen_ai.provider.name` of a provider kind.
fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Anthropic => "anthropic",
        ProviderKind::Bedrock => "aws.bedrock",
        ProviderKind::Vertex => "gcp.vertex_ai",
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A low-cardinality `error.type` for an abandoned attempt.
fn error_class(status: Option<u16>, why: &str) -> String {
    if let Some(s) = status {
        return s.to_string();
    }
    let why = why.to_ascii_lowercase();
    if why.contains("timed out") || why.contains("timeout") || why.contains("deadline") {
        "timeout".into()
    } else if why.contains("connect") {
        "connect_error".into()
    } else {
        "_OTHER".into()
    }
}

fn spans(
    sampled: Sampled,
    r: &UsageRecord,
    started: Instant,
    kind_of: impl Fn(&str) -> Option<ProviderKind>,
) -> Vec<Span> {
    let start = unix_nanos(r.time);
    let end = start + (r.latency_ms * 1e6) as u64;
    let root_id: [u8; 8] = rand::random();
    let str_attr = |k: &'static str, v: &Option<String>| v.as_ref().map(|v| (k, Value::Str(v.clone())));
    let u = &r.usage;
    let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(28);
    a.push(("gen_ai.operation.name", Value::Str("chat".into())));
    // The provider that answered: a request refused before it was sent names its route's
    // provider in the record, but none took part.
    if let Some(kind) = r.provider.as_deref().filter(|_| r.upstream_status.is_some()).and_then(&kind_of) {
        a.push(("gen_ai.provider.name", Value::Str(provider_name(kind).into())));
    }
    a.extend(str_attr("gen_ai.request.model", &r.requested_model));
    a.extend(str_attr("gen_ai.response.model", &r.provider_model));
    // The conventions count cached input in the input tokens, and say how much of it was cached.
    let input = u.input_tokens.saturating_add(u.cache_read_input_tokens).saturating_add(u.cache_creation_input_tokens);
    a.push(("gen_ai.usage.input_tokens", Value::Int(input as i64)));
    a.push(("gen_ai.usage.output_tokens", Value::Int(u.output_tokens as i64)));
    a.push(("gen_ai.usage.cache_read.input_tokens", Value::Int(u.cache_read_input_tokens as i64)));
    a.push(("gen_ai.usage.cache_creation.input_tokens", Value::Int(u.cache_creation_input_tokens as i64)));
    a.push(("tollgate.cost_nanos", Value::Int(r.cost_nanos as i64)));
    a.push(("tollgate.cost_usd", Value::Double(r.cost_usd)));
    a.push(("tollgate.request_id", Value::Str(r.request_id.clone())));
    a.extend(str_attr("tollgate.key_id", &r.key_id));
    a.extend(str_attr("tollgate.team", &r.team));
    a.extend(str_attr("tollgate.user", &r.user));
    a.extend(str_attr("tollgate.provider", &r.provider));
    a.push(("tollgate.outcome", Value::Str(r.outcome.as_str().into())));
    a.push(("tollgate.stream", Value::Bool(r.stream)));
    if let Some(e) = r.usage_estimated {
        a.push(("tollgate.usage_estimated", Value::Str(e.as_str().into())));
    }
    a.push(("http.request.method", Value::Str(r.method.clone())));
    a.push(("url.path", Value::Str(r.path.clone())));
    a.push(("http.response.status_code", Value::Int(i64::from(r.status))));
    if r.outcome != Outcome::Complete {
        a.push(("error.type", Value::Str(r.outcome.as_str().into())));
    }
    // As the HTTP conventions have it for a server: a refusal (4xx) is the client's error,
    // not the span's; a 5xx, a failure or a cut answer is.
    let failed = r.status >= 500 || matches!(r.outcome, Outcome::Failed | Outcome::Incomplete);
    let name = match &r.requested_model {
        Some(m) => format!("chat {m}"),
        None => "chat".to_string(),
    };
    let mut out = Vec::with_capacity(1 + r.attempts.len());
    out.push(Span {
        trace_id: sampled.trace_id,
        span_id: root_id,
        parent_span_id: sampled.parent,
        name,
        kind: Kind::Server,
        start_unix_nanos: start,
        end_unix_nanos: end,
        attributes: a,
        error: failed.then(|| r.error.clone().unwrap_or_else(|| r.outcome.as_str().into())),
    });
    for attempt in &r.attempts {
        let offset = attempt.started.map_or(0, |s| s.saturating_duration_since(started).as_nanos() as u64);
        let a_start = (start + offset).min(end);
        let a_end = (a_start + (attempt.latency_ms * 1e6) as u64).min(end);
        let mut a: Vec<(&'static str, Value)> = Vec::with_capacity(8);
        a.push(("gen_ai.operation.name", Value::Str("chat".into())));
        if let Some(kind) = kind_of(&attempt.provider) {
            a.push(("gen_ai.provider.name", Value::Str(provider_name(kind).into())));
        }
        a.push(("gen_ai.request.model", Value::Str(attempt.model.clone())));
        match attempt.endpoint.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) {
            Some((host, port)) => {
                a.push(("server.address", Value::Str(host.trim_matches(['[', ']']).to_string())));
                a.push(("server.port", Value::Int(i64::from(port))));
            }
            None => a.push(("server.address", Value::Str(attempt.endpoint.clone()))),
        }
        a.push(("tollgate.provider", Value::Str(attempt.provider.clone())));
        if let Some(s) = attempt.status {
            a.push(("http.response.status_code", Value::Int(i64::from(s))));
        }
        if attempt.may_be_billed {
            a.push(("tollgate.may_be_billed", Value::Bool(true)));
        }
        // A class, as the conventions want (the status, or how it failed); the reason itself
        // is the span status's message.
        if let Some(why) = &attempt.abandoned {
            a.push(("error.type", Value::Str(error_class(attempt.status, why))));
        }
        out.push(Span {
            trace_id: sampled.trace_id,
            span_id: rand::random(),
            parent_span_id: Some(root_id),
            name: format!("chat {}", attempt.model),
            kind: Kind::Client,
            start_unix_nanos: a_start,
            end_unix_nanos: a_end,
            attributes: a,
            error: attempt.abandoned.clone(),
        });
    }
    out
}
