//! OpenTelemetry traces end to end: the real gateway exports OTLP/HTTP protobuf to a real
//! receiver, `tests/otel/receiver.py`, which decodes each export strictly with
//! opentelemetry-proto's own generated classes (a hand-written encoder is checked against the
//! proto, not against itself) and writes every span as a JSON line. It runs in the Python that
//! `scripts/conformance-deps.sh` installs for the conformance suite; without it the test fails
//! and names the script, as the conformance suite does.
//!
//! Every span is checked against the audit record of its request, value for value: one SERVER
//! span per request with the GenAI, HTTP and `tollgate.*` attributes, one CLIENT span per attempt
//! at a provider under it, in order and within its time. Then: a client's `traceparent` (its
//! trace continued; its `sampled` flag followed), fallbacks, refused requests, sampling ratios,
//! and the metric `tollgate_otel_spans_total` when the collector is down or the queue is full.
//!
//! Spans are waited for with a deadline, never a fixed sleep. That a span did *not* come is
//! shown with a later one that did: the gateway queues a request's spans before it writes its
//! audit record, and sends its queue in order from one thread, so once a later request's span
//! has arrived, an earlier request's spans would have too.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Map, Value};

const SERVICE: &str = "tollgate-otel-test";
const SERVER: u64 = 2;
const CLIENT: u64 = 3;
const STATUS_UNSET: u64 = 0;
const STATUS_ERROR: u64 = 2;

/// How long spans may take to arrive: exports run every 100 ms in these tests.
const SPAN_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// The receiver

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The conformance suite's Python (`TOLLGATE_CONFORMANCE_PYTHON`, else its pinned folder in
/// `.cache/conformance/`), where opentelemetry-proto is installed beside the clients.
fn python() -> PathBuf {
    let pins = std::fs::read_to_string(repo().join("tests/conformance/versions.env")).unwrap();
    let pin = |name: &str| {
        std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
            pins.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).unwrap_or_default().trim().to_string()
        })
    };
    let python = std::env::var_os("TOLLGATE_CONFORMANCE_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let dir = std::env::var_os("TOLLGATE_CONFORMANCE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".cache/conformance"));
        dir.join(format!(
            "py-anthropic-{}-boto3-{}-otelproto-{}",
            pin("ANTHROPIC_PY_VERSION"),
            pin("BOTO3_VERSION"),
            pin("OTEL_PROTO_VERSION")
        ))
        .join("bin/python")
    });
    let install = "Install it (python3 with venv required; cached in .cache/conformance/) with\n\n    \
                   scripts/conformance-deps.sh\n\n\
                   or run `scripts/test --test otel`, which installs it first.";
    assert!(
        python.exists(),
        "\n\nThe OTLP test decodes traces with opentelemetry-proto in the conformance suite's Python, and \
         {} does not exist.\n{install}\n",
        python.display()
    );
    let import = Command::new(&python)
        .args(["-c", "import opentelemetry.proto.collector.trace.v1.trace_service_pb2"])
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "\n\n{} cannot import opentelemetry-proto (an install from before OTEL_PROTO_VERSION was pinned?): {}\n{install}\n",
        python.display(),
        String::from_utf8_lossy(&import.stderr)
    );
    python
}

/// `tests/otel/receiver.py` on a loopback port of its own; killed when dropped.
struct Receiver {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let (port_file, out) = (dir.path().join("port"), dir.path().join("spans.jsonl"));
        let mut child = Command::new(python())
            .arg(repo().join("tests/otel/receiver.py"))
            .arg("--port-file")
            .arg(&port_file)
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .spawn()
            .expect("the OTLP receiver starts");
        // The receiver writes the port file whole, once it listens.
        let deadline = Instant::now() + Duration::from_secs(20);
        let port: u16 = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("a port number");
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the OTLP receiver exited ({status}) before listening");
            }
            assert!(Instant::now() < deadline, "the OTLP receiver did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        };
        Receiver { child, port, out, _dir: dir }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    /// Every span received so far, in the order exported. An export the receiver refused (it
    /// did not decode, or broke an OTLP rule) fails the test with the receiver's reason.
    fn spans(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        // A read may race the writer: its last line is whole only once its newline is there.
        text[..text.rfind('\n').map_or(0, |end| end + 1)]
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("the receiver writes JSON lines");
                assert!(v.get("rejected").is_none(), "the receiver refused an export from the gateway: {v}");
                v
            })
            .collect()
    }

    /// Waits until `done` holds for the spans received, and returns them.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + SPAN_DEADLINE;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "no {what} within {SPAN_DEADLINE:?}; spans so far:\n{}", lines(&spans));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the trace of the request whose audit record is `rec`: its SERVER span and a
    /// span under it for each of the record's attempts.
    async fn trace(&self, rec: &Value) -> Trace {
        let id = rec["request_id"].as_str().unwrap();
        let attempts = rec["attempts"].as_array().unwrap().len();
        let spans = self
            .wait_for(&format!("trace of {id} with {attempts} attempt spans"), |spans| {
                roots(spans, id).first().is_some_and(|root| children(spans, root).len() >= attempts)
            })
            .await;
        let found = roots(&spans, id);
        assert_eq!(found.len(), 1, "exactly one SERVER span per request:\n{}", lines(&found));
        let root = found[0].clone();
        let mut kids = children(&spans, &root);
        kids.sort_by_key(|s| s["start_time_unix_nano"].as_u64().unwrap());
        let in_trace: Vec<Value> = spans.iter().filter(|s| s["trace_id"] == root["trace_id"]).cloned().collect();
        assert_eq!(in_trace.len(), 1 + kids.len(), "the trace holds only the request's spans:\n{}", lines(&in_trace));
        Trace { root, children: kids }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request's spans: its SERVER span, and the CLIENT spans under it by start time.
struct Trace {
    root: Value,
    children: Vec<Value>,
}

/// The SERVER spans of request `id`.
fn roots(spans: &[Value], id: &str) -> Vec<Value> {
    spans.iter().filter(|s| s["kind"] == SERVER && s["attributes"]["tollgate.request_id"] == id).cloned().collect()
}

fn children(spans: &[Value], root: &Value) -> Vec<Value> {
    spans
        .iter()
        .filter(|s| s["trace_id"] == root["trace_id"] && s["parent_span_id"] == root["span_id"])
        .cloned()
        .collect()
}

fn lines(spans: &[Value]) -> String {
    spans.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------------------------------------
// The spans against the audit record

/// The GenAI conventions' `gen_ai.provider.name` of each configured provider, by name.
type Kinds<'a> = &'a [(&'a str, &'a str)];

fn genai_provider(kinds: Kinds<'_>, provider: &Value) -> Option<Value> {
    let name = provider.as_str()?;
    let kind = kinds.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no kind for provider {name}"));
    Some(json!(kind.1))
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// `key` = `value` in `attrs`, unless the value is null (the attribute is then absent).
fn put(attrs: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value.filter(|v| !v.is_null()) {
        attrs.insert(key.to_string(), v);
    }
}

/// The SERVER span's attributes for the request whose audit record is `rec`.
fn root_attributes(rec: &Value, kinds: Kinds<'_>) -> Value {
    let u = &rec["usage"];
    let n = |k: &str| u[k].as_u64().unwrap_or_else(|| panic!("usage.{k} in {rec}"));
    let Value::Object(mut a) = json!({
        "gen_ai.operation.name": "chat",
        // The conventions count cached input (read and written) in the input tokens.
        "gen_ai.usage.input_tokens": n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens"),
        "gen_ai.usage.output_tokens": n("output_tokens"),
        "gen_ai.usage.cache_read.input_tokens": n("cache_read_input_tokens"),
        "gen_ai.usage.cache_creation.input_tokens": n("cache_creation_input_tokens"),
        "tollgate.cost_nanos": rec["cost_nanos"],
        "tollgate.cost_usd": rec["cost_usd"],
        "tollgate.request_id": rec["request_id"],
        "tollgate.outcome": rec["outcome"],
        "tollgate.stream": rec["stream"],
        "http.request.method": rec["method"],
        "url.path": rec["path"],
        "http.response.status_code": rec["status"],
    }) else {
        unreachable!()
    };
    // The kind of the provider that answered, when one did: a request refused before it was
    // sent (a rate limit) names its route's provider in the record, but none answered it.
    if !rec["upstream_status"].is_null() {
        put(&mut a, "gen_ai.provider.name", genai_provider(kinds, &rec["provider"]));
    }
    put(&mut a, "gen_ai.request.model", Some(rec["requested_model"].clone()));
    put(&mut a, "gen_ai.response.model", Some(rec["provider_model"].clone()));
    for (attr, field) in [
        ("tollgate.key_id", "key_id"),
        ("tollgate.team", "team"),
        ("tollgate.user", "user"),
        ("tollgate.provider", "provider"),
        ("tollgate.usage_estimated", "usage_estimated"),
    ] {
        put(&mut a, attr, rec.get(field).cloned());
    }
    if rec["outcome"] != "complete" {
        a.insert("error.type".into(), rec["outcome"].clone());
    }
    Value::Object(a)
}

/// A CLIENT span's attributes for `attempt`, one of the record's `attempts`.
fn attempt_attributes(attempt: &Value, kinds: Kinds<'_>) -> Value {
    // The endpoint is `host:port`: the conventions want them apart.
    let (host, port) = attempt["endpoint"].as_str().unwrap().rsplit_once(':').unwrap();
    let Value::Object(mut a) = json!({
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": attempt["model"],
        "server.address": host,
        "server.port": port.parse::<u16>().unwrap(),
        "tollgate.provider": attempt["provider"],
    }) else {
        unreachable!()
    };
    put(&mut a, "gen_ai.provider.name", genai_provider(kinds, &attempt["provider"]));
    put(&mut a, "http.response.status_code", Some(attempt["status"].clone()));
    // A class, not the reason: the status the provider answered, or how the attempt failed.
    if let Some(why) = attempt["abandoned"].as_str() {
        let class = match attempt["status"].as_u64() {
            Some(status) => status.to_string(),
            None if why.contains("timed out") || why.contains("timeout") => "timeout".into(),
            None if why.contains("connect") => "connect_error".into(),
            None => "_OTHER".into(),
        };
        a.insert("error.type".into(), json!(class));
    }
    // Not in the spec's list: the record's own flag, kept on the span when set.
    if attempt["may_be_billed"] == true {
        a.insert("tollgate.may_be_billed".into(), json!(true));
    }
    Value::Object(a)
}

/// Checks `t` against `rec`, the audit record of its request, which was sent at or after
/// `sent` and whose record was read by `seen`: every attribute, name, kind, status, the
/// resource and scope, the ids, and the times.
fn check_trace(t: &Trace, rec: &Value, kinds: Kinds<'_>, sent: SystemTime, seen: SystemTime) {
    let root = &t.root;
    let id = rec["request_id"].as_str().unwrap();
    let ctx = format!("request {id}\nrecord: {rec}\nspans:\n{}\n{}", root, lines(&t.children));
    assert_eq!(root["attributes"], root_attributes(rec, kinds), "{ctx}");
    let name = match rec["requested_model"].as_str() {
        Some(m) => format!("chat {m}"),
        None => "chat".to_string(),
    };
    assert_eq!(root["name"], name, "{ctx}");
    assert_eq!(root["kind"], SERVER, "{ctx}");
    // A refusal (4xx) is the client's error, not the span's (the HTTP conventions for servers).
    let failed =
        rec["status"].as_u64().unwrap() >= 500 || ["failed", "incomplete"].contains(&rec["outcome"].as_str().unwrap());
    assert_eq!(root["status_code"], if failed { STATUS_ERROR } else { STATUS_UNSET }, "{ctx}");
    for span in std::iter::once(root).chain(&t.children) {
        assert_eq!(span["resource"], json!({"service.name": SERVICE, "service.version": env!("CARGO_PKG_VERSION")}));
        assert_eq!(span["scope"], "tollgate", "{ctx}");
        assert_eq!(span["trace_id"].as_str().unwrap().len(), 32, "{ctx}");
        assert_ne!(span["trace_id"], "0".repeat(32), "{ctx}");
        assert_ne!(span["span_id"], "0".repeat(16), "{ctx}");
    }

    // The root spans the request: from its start (the record's time, to the millisecond it is
    // written with) until it was accounted (its latency later), inside what the test saw.
    let (start, end) = (root["start_time_unix_nano"].as_u64().unwrap(), root["end_time_unix_nano"].as_u64().unwrap());
    assert!(unix_nanos(sent) <= start && start <= end && end <= unix_nanos(seen), "{ctx}");
    let time = humantime::parse_rfc3339(rec["time"].as_str().unwrap()).unwrap();
    assert!(start.abs_diff(unix_nanos(time)) < 1_000_000, "root start vs the record's time {}\n{ctx}", rec["time"]);
    let latency = (rec["latency_ms"].as_f64().unwrap() * 1e6) as u64;
    assert!((end - start).abs_diff(latency) < 1_000_000, "root duration vs latency_ms\n{ctx}");

    // One CLIENT span per attempt, in the record's order, one after the other, inside the root.
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(t.children.len(), attempts.len(), "{ctx}");
    let mut previous_end = start;
    for (span, attempt) in t.children.iter().zip(attempts) {
        assert_eq!(span["attributes"], attempt_attributes(attempt, kinds), "{ctx}");
        assert_eq!(span["name"], format!("chat {}", attempt["model"].as_str().unwrap()), "{ctx}");
        assert_eq!(span["kind"], CLIENT, "{ctx}");
        assert_eq!(span["trace_id"], root["trace_id"], "{ctx}");
        assert_eq!(span["parent_span_id"], root["span_id"], "{ctx}");
        assert_ne!(span["span_id"], root["span_id"], "{ctx}");
        let abandoned = attempt["abandoned"].is_string();
        assert_eq!(span["status_code"], if abandoned { STATUS_ERROR } else { STATUS_UNSET }, "{ctx}");
        let (a_start, a_end) =
            (span["start_time_unix_nano"].as_u64().unwrap(), span["end_time_unix_nano"].as_u64().unwrap());
        assert!(previous_end <= a_start && a_start <= a_end && a_end <= end, "attempt times\n{ctx}");
        let took = (attempt["latency_ms"].as_f64().unwrap() * 1e6) as u64;
        assert!((a_end - a_start).abs_diff(took) < 1_000_000, "attempt duration vs its latency_ms\n{ctx}");
        previous_end = a_end;
    }
}

// ---------------------------------------------------------------------------------------------
// Gateways

/// The `[telemetry]` table: exports every 100 ms to `endpoint`, with `extra` lines.
fn telemetry(endpoint: &str, extra: &str) -> String {
    format!(
        "[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"{SERVICE}\"\nexport_interval = \"100ms\"\n{extra}\n\n"
    )
}

/// Test prices (USD per million tokens) for the test model, whatever the shipped table says.
const PRICES: &str = r#"
[[price]]
match = "*claude-test-1*"
input = 3.0
output = 15.0
cache_read = 0.3
cache_write_5m = 3.75
cache_write_1h = 6.0
"#;

/// Each token class of its own size, so a sum of the wrong ones shows.
fn usage() -> MockUsage {
    MockUsage {
        input_tokens: 25,
        output_tokens: 15,
        cache_read_input_tokens: 4000,
        cache_creation_5m_input_tokens: 100,
        cache_creation_1h_input_tokens: 200,
        ..Default::default()
    }
}

/// [`usage`] at [`PRICES`] on the Anthropic API: 25*3 + 15*15 + 4000*0.3 + 100*3.75 + 200*6 USD
/// per million tokens, in nano-dollars.
const USAGE_COST_NANOS: u64 = 75_000 + 225_000 + 1_200_000 + 375_000 + 1_200_000;

/// One provider of each kind (see [`provider_sections`]) and a model on each.
const THREE_KINDS: Kinds<'static> =
    &[("anthropic", "anthropic"), ("bedrock", "aws.bedrock"), ("vertex", "gcp.vertex_ai")];

struct Setup {
    gw: Gateway,
    key: TestKey,
    receiver: Receiver,
    _mocks: (MockProvider, MockProvider, MockProvider),
}

/// A gateway exporting to a fresh receiver (with `telemetry_extra` lines in `[telemetry]`),
/// providers of the three kinds, models `test-anthropic`, `test-bedrock` and `test-vertex` on
/// them, and key `alice` (user and team set).
async fn setup(telemetry_extra: &str) -> Setup {
    let receiver = Receiver::start();
    let (a, b, v) = three_mocks(Behavior { usage: usage(), deltas: 4, ..Behavior::default() }).await;
    let key = new_key();
    let config = format!(
        "{telemetry}{providers}\
         [[model]]\nname = \"test-anthropic\"\ndeployments = [{{ provider = \"anthropic\", model = \"claude-test-1\" }}]\n\n\
         [[model]]\nname = \"test-bedrock\"\ndeployments = [{{ provider = \"bedrock\", model = \"anthropic.claude-test-1-v1:0\" }}]\n\n\
         [[model]]\nname = \"test-vertex\"\ndeployments = [{{ provider = \"vertex\", model = \"claude-test-1@20260101\" }}]\n\n\
         [[key]]\nid = \"alice\"\nhash = \"{hash}\"\nuser = \"alice@example.com\"\nteam = \"platform\"\n\n{PRICES}",
        telemetry = telemetry(&receiver.endpoint(), telemetry_extra),
        providers = provider_sections([&a.url(), &b.url(), &v.url()], ["", "", ""]),
        hash = key.hash,
    );
    let gw = start_gateway(&config);
    Setup { gw, key, receiver, _mocks: (a, b, v) }
}

/// Sends `body` to `/v1/messages` with `key` (none: no credential) and `headers`, and reads
/// the answer whole, so the request is accounted: its status and request id.
async fn send(gw: &Gateway, key: Option<&TestKey>, body: String, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = client().post(gw.url("/v1/messages")).body(body);
    if let Some(k) = key {
        req = req.header("x-api-key", &k.key);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let id = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    // A stream cut on purpose ends in an error here; it is accounted all the same.
    let _ = resp.bytes().await;
    (status, id)
}

/// `tollgate_otel_spans_total{result}` on `gw`'s /metrics; 0 while the series is absent.
async fn spans_counted(gw: &Gateway, result: &str) -> u64 {
    let text = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let prefix = format!("tollgate_otel_spans_total{{result=\"{result}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits until `tollgate_otel_spans_total{result}` reads `n`.
async fn wait_for_count(gw: &Gateway, result: &str, n: u64) {
    let deadline = Instant::now() + SPAN_DEADLINE;
    loop {
        let got = spans_counted(gw, result).await;
        if got == n {
            return;
        }
        assert!(Instant::now() < deadline, "tollgate_otel_spans_total{{result=\"{result}\"}} is {got}, not {n}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A random W3C trace id (32 hex) or span id (16 hex), never all zeros.
fn random_id(bytes: usize) -> String {
    let mut id: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    id[0] |= 1;
    hex::encode(id)
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Non-streamed and streamed answers from each provider kind, and a stream the provider cuts:
/// each request is one trace whose every attribute is its audit record's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_a_trace_carrying_its_audit_record() {
    let s = setup("").await;
    let cases = [
        ("test-anthropic", false, None),
        ("test-anthropic", true, None),
        ("test-bedrock", false, None),
        ("test-bedrock", true, None),
        ("test-vertex", false, None),
        ("test-vertex", true, None),
        // Cut after 4 events: incomplete, with estimated usage.
        ("test-anthropic", true, Some("4")),
    ];
    let mut ids = Vec::new();
    for (model, stream, cut) in cases {
        let sent = SystemTime::now();
        let headers: Vec<(&str, &str)> = cut.iter().map(|n| ("x-mock-cut-after", *n)).collect();
        let (status, id) = send(&s.gw, Some(&s.key), messages_body(model, stream, 10), &headers).await;
        assert_eq!(status, 200, "{model} stream={stream}");
        ids.push(id.clone());
        let rec = s.gw.record(&id);
        let seen = SystemTime::now();
        // The record itself is right, so a span that agrees with it is right too.
        assert_eq!(rec["stream"], stream);
        assert_eq!(rec["requested_model"], model);
        assert_eq!(rec["key_id"], "alice");
        assert_eq!(rec["attempts"].as_array().unwrap().len(), 1, "{rec}");
        if cut.is_none() {
            assert_eq!(rec["outcome"], "complete", "{rec}");
            let u = &rec["usage"];
            assert_eq!((&u["input_tokens"], &u["output_tokens"]), (&json!(25), &json!(15)), "{rec}");
            assert_eq!((&u["cache_read_input_tokens"], &u["cache_creation_input_tokens"]), (&json!(4000), &json!(300)));
        } else {
            assert_eq!(rec["outcome"], "incomplete", "{rec}");
            assert!(rec["usage_estimated"].is_string(), "{rec}");
        }
        if model == "test-anthropic" && cut.is_none() {
            assert_eq!(rec["cost_nanos"], USAGE_COST_NANOS);
        }
        let t = s.receiver.trace(&rec).await;
        check_trace(&t, &rec, THREE_KINDS, sent, seen);
        assert_eq!(t.root["parent_span_id"], Value::Null, "a request without traceparent starts a trace");
    }
    // Spot checks by hand, beside the record: the first request's tokens and cost.
    let first = roots(&s.receiver.spans(), &ids[0]).remove(0);
    let a = &first["attributes"];
    assert_eq!(a["gen_ai.usage.input_tokens"], 25 + 4000 + 300);
    assert_eq!(a["gen_ai.usage.cache_creation.input_tokens"], 300);
    assert_eq!(a["tollgate.cost_nanos"], USAGE_COST_NANOS);
    assert_eq!(a["tollgate.cost_usd"], 0.003075);
    assert_eq!(a["gen_ai.provider.name"], "anthropic");
    assert_eq!(a["gen_ai.response.model"], "claude-test-1");
    // Every span went out; none was dropped.
    wait_for_count(&s.gw, "exported", 2 * cases.len() as u64).await;
    assert_eq!(spans_counted(&s.gw, "dropped_queue").await, 0);
    assert_eq!(spans_counted(&s.gw, "dropped_export").await, 0);
}

/// A client's `traceparent`: sampled (`01`), its trace goes on under the client's span; not
/// sampled (`00`), the request leaves no span; malformed, it is ignored and a new trace begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_is_continued_and_its_sampled_flag_followed() {
    let s = setup("").await;
    let body = || messages_body("test-anthropic", false, 10);

    let (trace, parent) = (random_id(16), random_id(8));
    let sent = SystemTime::now();
    let traceparent = format!("00-{trace}-{parent}-01");
    let (status, id) = send(&s.gw, Some(&s.key), body(), &[("traceparent", traceparent.as_str())]).await;
    assert_eq!(status, 200);
    let rec = s.gw.record(&id);
    let t = s.receiver.trace(&rec).await;
    check_trace(&t, &rec, THREE_KINDS, sent, SystemTime::now());
    assert_eq!(t.root["trace_id"], trace);
    assert_eq!(t.root["parent_span_id"], parent);
    assert!(t.children.iter().all(|c| c["trace_id"] == trace));

    // Not sampled by the client: nothing. Its record is written after its spans would have been
    // queued; the next request's trace then shows the queue was sent past it.
    let unsampled = random_id(16);
    let unsampled_parent = format!("00-{unsampled}-{}-00", random_id(8));
    let (status, quiet) = send(&s.gw, Some(&s.key), body(), &[("traceparent", unsampled_parent.as_str())]).await;
    assert_eq!(status, 200);
    s.gw.record(&quiet);

    // Malformed: uppercase hex, a short trace id, an all-zero trace id, a version `ff`, no
    // dashes. Each request is traced (ratio 1) in a trace of its own, with no parent.
    let malformed = [
        format!("00-{}-{}-01", trace.to_uppercase(), parent),
        format!("00-{}-{}-01", &trace[..30], parent),
        format!("00-{}-{}-01", "0".repeat(32), parent),
        format!("ff-{trace}-{parent}-01"),
        format!("00{trace}{parent}01"),
    ];
    for bad in &malformed {
        let (status, id) = send(&s.gw, Some(&s.key), body(), &[("traceparent", bad.as_str())]).await;
        assert_eq!(status, 200);
        let t = s.receiver.trace(&s.gw.record(&id)).await;
        assert_ne!(t.root["trace_id"], trace, "{bad}");
        assert_eq!(t.root["parent_span_id"], Value::Null, "{bad}");
    }
    let spans = s.receiver.spans();
    assert!(roots(&spans, &quiet).is_empty(), "a traceparent with flags 00 must leave no span");
    assert!(
        spans.iter().all(|span| span["trace_id"] != unsampled),
        "no span of the unsampled trace:\n{}",
        lines(&spans)
    );
    // The sampled trace has its request's spans and no more.
    assert_eq!(spans.iter().filter(|span| span["trace_id"] == trace).count(), 2);
}

/// A first provider that refuses (429) or is not there: one trace, an ERROR span for the
/// abandoned attempt, then the attempt that answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_is_one_trace_with_a_span_per_attempt() {
    const PRIMARY: &str = "claude-test-1-primary";
    const SECONDARY: &str = "claude-test-1-secondary";
    let kinds: Kinds<'_> = &[("one", "anthropic"), ("two", "anthropic")];
    for refuse in [false, true] {
        let receiver = Receiver::start();
        let first = MockProvider::start(Behavior { status: Some(429), ..Behavior::default() }).await.unwrap();
        let second = MockProvider::start(Behavior { usage: usage(), ..Behavior::default() }).await.unwrap();
        let one = if refuse { format!("http://127.0.0.1:{}", free_port()) } else { first.url() };
        let key = new_key();
        let config = format!(
            "{telemetry}\
             [[provider]]\nname = \"one\"\nkind = \"anthropic\"\nbase_url = \"{one}\"\n\
             credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\" }}\n\n\
             [[provider]]\nname = \"two\"\nkind = \"anthropic\"\nbase_url = \"{two}\"\n\
             credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\" }}\n\n\
             [[model]]\nname = \"m\"\n\
             deployments = [{{ provider = \"one\", model = \"{PRIMARY}\" }}, {{ provider = \"two\", model = \"{SECONDARY}\" }}]\n\n\
             [[key]]\nid = \"a\"\nhash = \"{hash}\"\n\n{PRICES}",
            telemetry = telemetry(&receiver.endpoint(), ""),
            two = second.url(),
            hash = key.hash,
        );
        let gw = start_gateway(&config);
        let sent = SystemTime::now();
        let (status, id) = send(&gw, Some(&key), messages_body("m", true, 10), &[]).await;
        assert_eq!(status, 200, "refuse={refuse}");
        let rec = gw.record(&id);
        let seen = SystemTime::now();
        let attempts = rec["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{rec}");
        assert!(attempts[0]["abandoned"].is_string(), "{rec}");
        assert_eq!(attempts[0]["status"], if refuse { Value::Null } else { json!(429) }, "{rec}");
        assert_eq!((&attempts[1]["provider"], &attempts[1]["status"]), (&json!("two"), &json!(200)));

        let t = receiver.trace(&rec).await;
        check_trace(&t, &rec, kinds, sent, seen);
        let (tried, answered) = (&t.children[0], &t.children[1]);
        assert_eq!(tried["name"], format!("chat {PRIMARY}"));
        assert_eq!(tried["status_code"], STATUS_ERROR);
        assert_eq!(tried["attributes"]["error.type"], if refuse { "connect_error" } else { "429" });
        assert_eq!(tried["attributes"].get("http.response.status_code"), (!refuse).then(|| json!(429)).as_ref());
        assert_eq!(answered["name"], format!("chat {SECONDARY}"));
        assert_eq!(answered["status_code"], STATUS_UNSET);
        assert_eq!(answered["attributes"].get("error.type"), None);
        assert_eq!(t.root["status_code"], STATUS_UNSET, "the request itself succeeded");
        assert_eq!(t.root["attributes"]["gen_ai.response.model"], SECONDARY);
        assert_eq!(t.root["attributes"]["tollgate.provider"], "two");
    }
}

/// Requests the gateway refuses itself (a rate limit, no key, no model) are traced too: a
/// SERVER span with `error.type` and no attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_traced_without_attempts() {
    let receiver = Receiver::start();
    let mock = MockProvider::start(Behavior { usage: usage(), ..Behavior::default() }).await.unwrap();
    let (limited, free) = (new_key(), new_key());
    let config = format!(
        "{telemetry}\
         [[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\" }}\n\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"mock\", model = \"claude-test-1\" }}]\n\n\
         [[key]]\nid = \"limited\"\nhash = \"{limited}\"\nteam = \"web\"\nlimits = {{ rpm = 1 }}\n\n\
         [[key]]\nid = \"free\"\nhash = \"{free}\"\n\n{PRICES}",
        telemetry = telemetry(&receiver.endpoint(), ""),
        url = mock.url(),
        limited = limited.hash,
        free = free.hash,
    );
    let gw = start_gateway(&config);
    let kinds: Kinds<'_> = &[("mock", "anthropic")];
    let body = || messages_body("m", false, 10);
    // (key, body, the status expected): the first passes, the second is over the rpm limit.
    let requests: [(Option<&TestKey>, String, u16); 4] = [
        (Some(&limited), body(), 200),
        (Some(&limited), body(), 429),
        (None, body(), 401),
        (Some(&free), r#"{"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#.into(), 400),
    ];
    for (i, (key, body, expected)) in requests.into_iter().enumerate() {
        let sent = SystemTime::now();
        let (status, id) = send(&gw, key, body, &[]).await;
        assert_eq!(status, expected, "request {i}");
        let rec = gw.record(&id);
        let seen = SystemTime::now();
        let t = receiver.trace(&rec).await;
        check_trace(&t, &rec, kinds, sent, seen);
        let a = &t.root["attributes"];
        assert_eq!(a["http.response.status_code"], expected);
        if i == 0 {
            assert_eq!(t.children.len(), 1);
            continue;
        }
        assert_eq!(rec["outcome"], "rejected", "{rec}");
        assert!(t.children.is_empty(), "a refused request reached no provider");
        assert_eq!(t.root["status_code"], STATUS_UNSET, "a refusal is the client's error");
        assert_eq!(a["tollgate.outcome"], "rejected");
        assert_eq!(a["error.type"], "rejected");
        assert_eq!(a.get("gen_ai.provider.name"), None, "no provider answered");
        match i {
            1 => assert_eq!((&a["tollgate.key_id"], &a["tollgate.team"]), (&json!("limited"), &json!("web"))),
            2 => assert_eq!(a.get("tollgate.key_id"), None, "no key, no key attribute"),
            _ => {
                assert_eq!(rec["requested_model"], Value::Null, "{rec}");
                assert_eq!(t.root["name"], "chat", "a request that named no model");
                assert_eq!(a.get("gen_ai.request.model"), None);
            }
        }
    }
}

/// `sample_ratio` decides for requests without a `traceparent`: 0 records none of them (a
/// client's sampled `traceparent` still is), 0.5 about half, each trace whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_ratio_picks_the_traced_requests() {
    // A client's sampled request: recorded whatever the ratio, it shows the queue was sent.
    async fn marker(s: &Setup) -> String {
        let traceparent = format!("00-{}-{}-01", random_id(16), random_id(8));
        let (status, id) = send(
            &s.gw,
            Some(&s.key),
            messages_body("test-anthropic", false, 1),
            &[("traceparent", traceparent.as_str())],
        )
        .await;
        assert_eq!(status, 200);
        s.receiver.trace(&s.gw.record(&id)).await;
        id
    }

    let s = setup("sample_ratio = 0.0").await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (status, id) = send(&s.gw, Some(&s.key), messages_body("test-anthropic", false, 1), &[]).await;
        assert_eq!(status, 200);
        ids.push(id);
    }
    s.gw.wait_for_records(20);
    // Every record is written, so every sampling decision is made. The metric shows none was
    // exported yet; the marker below shows none was queued to be.
    assert_eq!(spans_counted(&s.gw, "exported").await, 0, "sample_ratio 0 exported spans");
    let mark = marker(&s).await;
    let spans = s.receiver.spans();
    assert!(ids.iter().all(|id| roots(&spans, id).is_empty()), "sample_ratio 0 traced a request:\n{}", lines(&spans));
    assert_eq!(spans.len(), 2, "only the client-sampled request (and its attempt):\n{}", lines(&spans));
    assert_eq!(roots(&spans, &mark).len(), 1);
    wait_for_count(&s.gw, "exported", 2).await;
    drop(s);

    // 0.5 over 200 requests: the traced count is Binomial(200, 1/2) when the gateway samples
    // on random trace ids; outside 60..=140 by chance about 6e-9 of the time.
    let s = setup("sample_ratio = 0.5").await;
    let mut ids = Vec::new();
    for _ in 0..200 {
        let (status, id) = send(&s.gw, Some(&s.key), messages_body("test-anthropic", false, 1), &[]).await;
        assert_eq!(status, 200);
        ids.push(id);
    }
    s.gw.wait_for_records(200);
    marker(&s).await;
    let spans = s.receiver.spans();
    let mut traced = 0;
    for id in &ids {
        let found = roots(&spans, id);
        assert!(found.len() <= 1, "one SERVER span per request: {id}");
        if let Some(root) = found.first() {
            traced += 1;
            assert_eq!(children(&spans, root).len(), 1, "a sampled trace is whole: {id}");
        }
    }
    assert!((60..=140).contains(&traced), "sample_ratio 0.5 traced {traced} of 200 requests");
    let traces: std::collections::BTreeSet<&str> =
        spans.iter().map(|span| span["trace_id"].as_str().unwrap()).collect();
    assert_eq!(traces.len(), traced + 1, "a trace per traced request, and the marker's");
    wait_for_count(&s.gw, "exported", spans.len() as u64).await;
}

/// A collector that is not there costs requests nothing: they all succeed, and their spans are
/// counted as `dropped_export`, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_drops_spans_and_counts_them() {
    let mock = MockProvider::start(Behavior { usage: usage(), ..Behavior::default() }).await.unwrap();
    let key = new_key();
    let closed = format!("http://127.0.0.1:{}/v1/traces", free_port());
    let config = format!("{}{}", telemetry(&closed, ""), one_provider_config(&mock.url(), &key));
    let gw = start_gateway(&config);
    for round in [10u64, 5] {
        for _ in 0..round {
            let (status, _) = send(&gw, Some(&key), messages_body("m", true, 10), &[]).await;
            assert_eq!(status, 200, "a request must not depend on the collector");
        }
    }
    gw.wait_for_records(15);
    // A SERVER and a CLIENT span each, none exported, none retried into a second count.
    wait_for_count(&gw, "dropped_export", 30).await;
    assert_eq!(spans_counted(&gw, "exported").await, 0);
    assert_eq!(spans_counted(&gw, "dropped_queue").await, 0);
    // More requests later: the exporter keeps going, and so does the count.
    for _ in 0..3 {
        let (status, _) = send(&gw, Some(&key), messages_body("m", false, 10), &[]).await;
        assert_eq!(status, 200);
    }
    wait_for_count(&gw, "dropped_export", 36).await;
}

/// Past `queue_capacity`, spans are dropped and counted as `dropped_queue`; what was queued
/// is still sent when the gateway stops. Each span is counted once, one way or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_spans_and_counts_them() {
    let receiver = Receiver::start();
    let mock = MockProvider::start(Behavior { usage: usage(), ..Behavior::default() }).await.unwrap();
    let key = new_key();
    // An export interval of an hour: the queue of 3 fills up and stays full until the stop.
    let telemetry = format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"{SERVICE}\"\nexport_interval = \"1h\"\nqueue_capacity = 3\n\n",
        receiver.endpoint()
    );
    let mut gw = start_gateway(&format!("{telemetry}{}", one_provider_config(&mock.url(), &key)));
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (status, id) = send(&gw, Some(&key), messages_body("m", false, 10), &[]).await;
        assert_eq!(status, 200);
        ids.push(id);
    }
    gw.wait_for_records(5);
    // Every record is written, so every span is queued or dropped by now. 10 spans into a
    // queue of 3 (the interval is "at least this often": an earlier export may make room).
    let dropped = spans_counted(&gw, "dropped_queue").await;
    assert!(dropped > 0, "5 requests of 2 spans into a queue of 3, none dropped");
    assert!(gw.stop().success());
    // The stop sent what was queued: with the dropped ones, that is every span, each once.
    let spans = receiver.spans();
    assert_eq!(spans.len() as u64 + dropped, 10, "{dropped} dropped, and received:\n{}", lines(&spans));
    for root in spans.iter().filter(|s| s["kind"] == SERVER) {
        assert!(ids.iter().any(|id| root["attributes"]["tollgate.request_id"] == id.as_str()), "{root}");
    }
}
