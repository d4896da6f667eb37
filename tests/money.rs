//! Money, to the nano-dollar: every client format (Anthropic, Bedrock, Vertex) on every provider
//! kind (Anthropic; Bedrock and Vertex, each regional and global), for complete answers, streams
//! the provider cuts, fast mode in the US with web search and fetch, and cache writes reported
//! without their TTL split; and, for the Anthropic client, streams the client cuts and streams an
//! idle timeout ends. Each record's cost must equal the cost worked out here by hand from the
//! test's own price row, estimated records must say so, and the ledger must add up to them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const VERTEX_BASE: &str = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models";
const ADMIN_TOKEN: &str = "money-test-admin-token-51d2";
const ADMIN_TOKEN_ENV: &str = "TG_TEST_ADMIN_TOKEN";

/// The test model's price: round but distinct rates (USD per million tokens), and modifiers
/// unlike the shipped defaults (fast 2, us 1.1, regional 1.1, $10 per 1000 searches), so a row
/// that was not applied shows.
const PRICES: &str = r#"
[[price]]
match = "*claude-test-1*"
input = 1.5
output = 7.5
cache_read = 0.123
cache_write_5m = 1.875
cache_write_1h = 3.333
fast = 4.0
geo = { us = 1.15 }
regional = 1.2
web_search_per_1k = 25.0
web_fetch_per_1k = 2.0
"#;

/// $25 per 1000 searches and $2 per 1000 fetches, in nano-dollars per use.
const SEARCH_NANOS: u64 = 25_000_000;
const FETCH_NANOS: u64 = 2_000_000;

/// The row's rates in nano-dollars per token ($/MTok × 1000), each scaled once by the multiplier
/// that applies and rounded to the nano-dollar, by hand:
/// [input, output, cache read, 5-minute write, 1-hour write].
fn rates(fast_us: bool, regional: bool) -> [u64; 5] {
    match (fast_us, regional) {
        // 1.5, 7.5, 0.123, 1.875, 3.333 $/MTok.
        (false, false) => [1_500, 7_500, 123, 1_875, 3_333],
        // × regional 1.2: 147.6 → 148, 3999.6 → 4000.
        (false, true) => [1_800, 9_000, 148, 2_250, 4_000],
        // × fast 4 × us 1.15 = 4.6: 565.8 → 566, 15331.8 → 15332.
        (true, false) => [6_900, 34_500, 566, 8_625, 15_332],
        // × 4 × 1.15 × 1.2 = 5.52: 678.96 → 679, 18398.16 → 18398.
        (true, true) => [8_280, 41_400, 679, 10_350, 18_398],
    }
}

/// What a request is billed for.
#[derive(Clone, Copy, Debug, Default)]
struct Billed {
    input: u64,
    output: u64,
    read: u64,
    write_5m: u64,
    write_1h: u64,
    searches: u64,
    fetches: u64,
}

/// Each token class at its scaled rate, plus the fee of each server-tool use (never scaled).
fn cost(b: Billed, [input, output, read, write_5m, write_1h]: [u64; 5]) -> u64 {
    b.input * input
        + b.output * output
        + b.read * read
        + b.write_5m * write_5m
        + b.write_1h * write_1h
        + b.searches * SEARCH_NANOS
        + b.fetches * FETCH_NANOS
}

/// The usage most scenarios report: every token class, with the cache-write split.
fn full_usage() -> MockUsage {
    MockUsage {
        input_tokens: 1000,
        output_tokens: 500,
        cache_read_input_tokens: 2000,
        cache_creation_5m_input_tokens: 300,
        cache_creation_1h_input_tokens: 400,
        ..Default::default()
    }
}

const FULL: Billed =
    Billed { input: 1000, output: 500, read: 2000, write_5m: 300, write_1h: 400, searches: 0, fetches: 0 };

/// `full_usage()` in fast mode, in the US, with 3 web searches and 2 fetches.
fn fast_usage() -> MockUsage {
    MockUsage {
        speed: Some("fast".into()),
        inference_geo: Some("us".into()),
        web_search_requests: 3,
        web_fetch_requests: 2,
        ..full_usage()
    }
}

/// 700 cache-write tokens, reported as a total without the 5-minute / 1-hour split.
fn unsplit_usage() -> MockUsage {
    MockUsage {
        input_tokens: 1000,
        output_tokens: 500,
        cache_creation_1h_input_tokens: 700,
        no_cache_split: true,
        ..Default::default()
    }
}

/// The record's `usage` for `b`, with `extra` members (speed, geography, tools, unsplit).
fn usage_json(b: Billed, extra: Value) -> Value {
    let mut v = json!({
        "input_tokens": b.input,
        "output_tokens": b.output,
        "cache_read_input_tokens": b.read,
        "cache_creation_input_tokens": b.write_5m + b.write_1h,
        "cache_creation_5m_input_tokens": b.write_5m,
        "cache_creation_1h_input_tokens": b.write_1h,
    });
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    v
}

/// Where a public model runs.
struct Deployment {
    model: &'static str,
    provider: &'static str,
    provider_model: &'static str,
    /// A regional Bedrock or Vertex endpoint (priced × 1.2).
    regional: bool,
}

const DEPLOYMENTS: [Deployment; 5] = [
    Deployment { model: "m-anthropic", provider: "anthropic", provider_model: "claude-test-1", regional: false },
    Deployment {
        model: "m-bedrock",
        provider: "bedrock",
        provider_model: "anthropic.claude-test-1-v1:0",
        regional: true,
    },
    Deployment {
        model: "m-bedrock-global",
        provider: "bedrock",
        provider_model: "global.anthropic.claude-test-1-v1:0",
        regional: false,
    },
    Deployment { model: "m-vertex", provider: "vertex", provider_model: "claude-test-1@20260101", regional: true },
    Deployment {
        model: "m-vertex-global",
        provider: "vertex-global",
        provider_model: "claude-test-1@20260101",
        regional: false,
    },
];

/// The gateway's config: `key_extra` lines in the key's table, `extra` tables at the end.
fn config(a: &MockProvider, b: &MockProvider, v: &MockProvider, key: &TestKey, key_extra: &str, extra: &str) -> String {
    let models: String = DEPLOYMENTS
        .iter()
        .map(|d| {
            format!(
                "[[model]]\nname = \"{}\"\ndeployments = [{{ provider = \"{}\", model = \"{}\" }}]\n\n",
                d.model, d.provider, d.provider_model
            )
        })
        .collect();
    let idle = "idle_timeout = \"1s\"";
    let providers = provider_sections([&a.url(), &b.url(), &v.url()], [idle, idle, idle]);
    format!(
        r#"
{providers}
[[provider]]
name = "vertex-global"
kind = "vertex"
project = "p1"
region = "global"
base_url = "{v}"
credential = "env:TG_TEST_PROVIDER_KEY"
idle_timeout = "1s"
health = {{ probe = "none" }}

{models}
[[key]]
id = "k"
hash = "{hash}"
{key_extra}
{PRICES}
{extra}
"#,
        v = v.url(),
        hash = key.hash
    )
}

struct Setup {
    gw: Gateway,
    key: TestKey,
    _mocks: [MockProvider; 3],
}

async fn setup(key_extra: &str, extra: &str) -> Setup {
    let behavior = Behavior { usage: full_usage(), deltas: 4, ..Default::default() };
    let a = MockProvider::start(behavior.clone()).await.unwrap();
    let b = MockProvider::start(behavior.clone()).await.unwrap();
    let v = MockProvider::start(behavior).await.unwrap();
    let key = new_key();
    let gw = start_gateway_admin(
        &format!("token = \"env:{ADMIN_TOKEN_ENV}\""),
        &[(ADMIN_TOKEN_ENV, ADMIN_TOKEN)],
        &config(&a, &b, &v, &key, key_extra, extra),
    );
    Setup { gw, key, _mocks: [a, b, v] }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    Anthropic,
    Bedrock,
    Vertex,
}

/// The path and body of a request in `client`'s format for `model`, with `system` (cache-control)
/// blocks if any.
fn path_and_body(client: Client, model: &str, stream: bool, system: Option<Value>) -> (String, String) {
    let messages = json!([{"role": "user", "content": "hi"}]);
    let (path, mut body) = match client {
        Client::Anthropic => (
            "/v1/messages".to_string(),
            json!({"model": model, "max_tokens": 1000, "stream": stream, "messages": messages}),
        ),
        Client::Bedrock => (
            format!("/model/{model}/{}", if stream { "invoke-with-response-stream" } else { "invoke" }),
            json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1000, "messages": messages}),
        ),
        Client::Vertex => (
            format!("{VERTEX_BASE}/{model}:{}", if stream { "streamRawPredict" } else { "rawPredict" }),
            json!({"anthropic_version": "vertex-2023-10-16", "stream": stream, "max_tokens": 1000, "messages": messages}),
        ),
    };
    if let Some(system) = system {
        body["system"] = system;
    }
    (path, body.to_string())
}

/// A request in `client`'s format (see [`path_and_body`]), with `headers` for the mock.
fn request(
    s: &Setup,
    client: Client,
    model: &str,
    stream: bool,
    system: Option<Value>,
    headers: &[(&str, String)],
) -> reqwest::RequestBuilder {
    let (path, body) = path_and_body(client, model, stream, system);
    let mut req = common::client().post(s.gw.url(&path)).body(body);
    req = match client {
        Client::Anthropic => req.header("x-api-key", &s.key.key).header("anthropic-version", "2023-06-01"),
        _ => req.header("authorization", format!("Bearer {}", s.key.key)),
    };
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    req
}

fn usage_header(u: &MockUsage) -> (&'static str, String) {
    ("x-mock-usage", serde_json::to_string(u).unwrap())
}

/// A system prompt whose cache control asks for `ttl` (none: the API's default, 5 minutes).
fn cached_system(ttl: Option<&str>) -> Value {
    let mut cache_control = json!({"type": "ephemeral"});
    if let Some(ttl) = ttl {
        cache_control["ttl"] = ttl.into();
    }
    json!([{"type": "text", "text": "You are terse.", "cache_control": cache_control}])
}

/// Sends `req`; returns the request id and whether the body arrived whole.
async fn send(req: reqwest::RequestBuilder) -> (String, bool) {
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    (rid, resp.bytes().await.is_ok())
}

/// The output bound of a stream that ended after `events`: the output count `message_start`
/// reported, plus, for each `content_block_delta`, the bytes of its data line after `data:`
/// beyond the 80 bytes of an empty delta's JSON
/// (`{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""}}`).
fn output_bound(events: &[impl AsRef<[u8]>]) -> u64 {
    let mut bound = 0;
    for e in events {
        let text = std::str::from_utf8(e.as_ref()).unwrap();
        let line = text.lines().find(|l| l.starts_with("data:")).unwrap();
        if text.starts_with("event: message_start\n") {
            let v: Value = serde_json::from_str(&line["data:".len()..]).unwrap();
            bound += v["message"]["usage"]["output_tokens"].as_u64().unwrap();
        } else if text.starts_with("event: content_block_delta\n") {
            bound += line.len() as u64 - "data:".len() as u64 - 80;
        }
    }
    bound
}

/// Checks a record: who served it, how it ended, its usage, its flag and its cost.
#[track_caller]
fn check(r: &Value, case: &str, outcome: &str, estimated: Option<&str>, usage: Value, cost_nanos: u64) {
    assert_eq!(r["outcome"], outcome, "{case}: {r}");
    assert_eq!(r["usage_estimated"].as_str(), estimated, "{case}: {r}");
    assert_eq!(r["usage"], usage, "{case}");
    assert_eq!(r["priced"], true, "{case}");
    assert_eq!(r["cost_nanos"].as_u64(), Some(cost_nanos), "{case}: {r}");
}

/// Every money scenario for one client format on one deployment. Returns how many requests it
/// sent and how many of them must be flagged as estimates.
async fn cell(s: &Setup, client: Client, d: &Deployment) -> (usize, usize) {
    let case = |what: &str| format!("{client:?} client, {} ({}): {what}", d.model, d.provider);
    let standard = rates(false, d.regional);
    let record = |rid: &str, case: &str| {
        let r = s.gw.record(rid);
        assert_eq!(r["provider"], d.provider, "{case}");
        assert_eq!(r["provider_model"], d.provider_model, "{case}");
        assert_eq!(r["format"], format!("{client:?}").to_lowercase(), "{case}");
        r
    };

    // A complete stream, then a complete JSON answer: the provider's count, exact.
    for stream in [true, false] {
        let c = case(&format!("complete, stream {stream}"));
        let (rid, whole) = send(request(s, client, d.model, stream, None, &[])).await;
        assert!(whole, "{c}");
        let r = record(&rid, &c);
        assert_eq!(r["stream"], stream, "{c}");
        check(&r, &c, "complete", None, usage_json(FULL, json!({})), cost(FULL, standard));
    }

    // The provider cuts the stream after 5 events: message_start, content_block_start, ping and
    // two of the four deltas. Output is bounded by the content streamed.
    let c = case("provider cut after 5 events");
    let (rid, whole) = send(request(s, client, d.model, true, None, &[("x-mock-cut-after", "5".into())])).await;
    assert!(!whole, "{c}: the client must see the cut");
    let sent = &tollgate::mock::sse_events(d.provider_model, &full_usage(), 4)[..5];
    let bound = output_bound(sent);
    // 1 from message_start, plus per delta the space after `data:` and the 30 bytes of
    // "chunk {i} of the mock's answer. ".
    assert_eq!(bound, 1 + 31 + 31);
    let billed = Billed { output: bound, ..FULL };
    let r = record(&rid, &c);
    check(&r, &c, "incomplete", Some("streamed_content"), usage_json(billed, json!({})), cost(billed, standard));
    assert!(r["error"].as_str().unwrap().contains("broke off"), "{c}: {r}");

    // Cut after 9 events (the four deltas, content_block_stop and message_delta went, message_stop
    // did not): incomplete, but the count is the provider's own.
    let c = case("provider cut after the final usage");
    let (rid, whole) = send(request(s, client, d.model, true, None, &[("x-mock-cut-after", "9".into())])).await;
    assert!(!whole, "{c}");
    check(&record(&rid, &c), &c, "incomplete", None, usage_json(FULL, json!({})), cost(FULL, standard));

    // Fast mode in the US with server tools: every rate × 4 × 1.15 (× 1.2 regional), once, plus
    // the fees.
    let c = case("fast, us, web search and fetch");
    let (rid, whole) = send(request(s, client, d.model, true, None, &[usage_header(&fast_usage())])).await;
    assert!(whole, "{c}");
    let billed = Billed { searches: 3, fetches: 2, ..FULL };
    let extra = json!({"speed": "fast", "inference_geo": "us", "web_search_requests": 3, "web_fetch_requests": 2});
    check(&record(&rid, &c), &c, "complete", None, usage_json(billed, extra), cost(billed, rates(true, d.regional)));

    // Cache writes without the split, for a request that asked for 1-hour caching: all of them
    // are priced as 1-hour writes, and the record says why.
    let c = case("unsplit cache writes, 1h asked");
    let req = request(s, client, d.model, true, Some(cached_system(Some("1h"))), &[usage_header(&unsplit_usage())]);
    let (rid, whole) = send(req).await;
    assert!(whole, "{c}");
    let billed = Billed { input: 1000, output: 500, write_1h: 700, ..Default::default() };
    check(
        &record(&rid, &c),
        &c,
        "complete",
        Some("cache_ttl_from_request"),
        usage_json(billed, json!({})),
        cost(billed, standard),
    );

    // The same answer for a request with 5-minute caching: 5-minute writes, the API's default.
    let c = case("unsplit cache writes, 5m asked");
    let req = request(s, client, d.model, true, Some(cached_system(None)), &[usage_header(&unsplit_usage())]);
    let (rid, whole) = send(req).await;
    assert!(whole, "{c}");
    let billed = Billed { input: 1000, output: 500, write_5m: 700, ..Default::default() };
    check(
        &record(&rid, &c),
        &c,
        "complete",
        None,
        usage_json(billed, json!({"cache_writes_unsplit": 700})),
        cost(billed, standard),
    );

    (7, 2)
}

/// An admin API GET with the token.
async fn admin_get(gw: &Gateway, path: &str) -> Value {
    let resp = client()
        .get(gw.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:?}"));
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The ledger holds one row per record, its total is the records' costs summed, and its
/// estimated count is the number of flagged records, which must be `flagged`.
async fn assert_ledger_adds_up(gw: &Gateway, requests: usize, flagged: usize) {
    let records = gw.records();
    assert_eq!(records.len(), requests, "one record per request");
    let total: u64 = records.iter().map(|r| r["cost_nanos"].as_u64().unwrap()).sum();
    let estimated = records.iter().filter(|r| r["usage_estimated"].is_string()).count();
    assert_eq!(estimated, flagged, "flagged records");
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let v = admin_get(gw, "/admin/usage").await;
        if v["rows"][0]["requests"] == requests {
            break v;
        }
        assert!(Instant::now() < deadline, "the ledger never held {requests} requests: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(report["rows"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["rows"][0]["cost_nanos"].as_u64(), Some(total), "{report}");
    assert_eq!(report["total_cost_nanos"].as_u64(), Some(total), "{report}");
    assert_eq!(report["total_cost_usd"], tollgate::metering::usd(total), "{report}");
    assert_eq!(report["rows"][0]["estimated"].as_u64(), Some(flagged as u64), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_format_on_every_provider_costs_what_the_price_row_says() {
    let s = setup("", "").await;
    let mut cells = Vec::new();
    for client in [Client::Anthropic, Client::Bedrock, Client::Vertex] {
        for d in &DEPLOYMENTS {
            cells.push(cell(&s, client, d));
        }
    }
    let done = futures_util::future::join_all(cells).await;
    let requests = done.iter().map(|(n, _)| n).sum();
    let flagged = done.iter().map(|(_, f)| f).sum();
    assert_eq!((requests, flagged), (3 * 5 * 7, 3 * 5 * 2));
    assert_ledger_adds_up(&s.gw, requests, flagged).await;
}

/// The Anthropic client hangs up after the first delta, and the provider goes silent past its
/// idle timeout after message_start: both are charged the output bound of what was streamed.
async fn interrupted(s: &Setup, d: &Deployment) {
    let standard = rates(false, d.regional);

    // Client cut: 20 deltas, 100 ms apart; the gateway notices on a write some deltas later.
    let c = format!("client cut on {}", d.model);
    let headers = [("x-mock-deltas", "20".to_string()), ("x-mock-delay-ms", "100".to_string())];
    let mut resp = request(s, Client::Anthropic, d.model, true, None, &headers).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let mut seen = String::new();
    while !seen.contains("event: content_block_delta") {
        seen.push_str(std::str::from_utf8(&resp.chunk().await.unwrap().unwrap()).unwrap());
    }
    drop(resp);
    let r = s.gw.record(&rid);
    assert_eq!(r["provider"], d.provider, "{c}");
    assert_eq!(r["error"], "client disconnected", "{c}");
    // The gateway read some number j of the 20 deltas before it noticed: the output is the bound
    // after exactly j of them.
    let events = tollgate::mock::sse_events(d.provider_model, &full_usage(), 20);
    let output = r["usage"]["output_tokens"].as_u64().unwrap();
    let j = (1..20).find(|&j| output_bound(&events[..3 + j]) == output);
    assert!(j.is_some(), "{c}: output {output} is not the bound after 1 to 19 deltas: {r}");
    let billed = Billed { output, ..FULL };
    check(&r, &c, "incomplete", Some("streamed_content"), usage_json(billed, json!({})), cost(billed, standard));

    // Idle timeout: message_start, then 3 s of silence against a 1 s idle timeout.
    let c = format!("idle timeout on {}", d.model);
    let started = Instant::now();
    let (rid, whole) =
        send(request(s, Client::Anthropic, d.model, true, None, &[("x-mock-delay-ms", "3000".into())])).await;
    assert!(!whole, "{c}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_millis(2900), "{c}: took {took:?}");
    let r = s.gw.record(&rid);
    assert_eq!(r["provider"], d.provider, "{c}");
    // Only message_start came: its output count is the bound.
    let bound = output_bound(&tollgate::mock::sse_events(d.provider_model, &full_usage(), 4)[..1]);
    assert_eq!(bound, 1);
    let billed = Billed { output: bound, ..FULL };
    check(&r, &c, "incomplete", Some("streamed_content"), usage_json(billed, json!({})), cost(billed, standard));
    assert!(r["error"].as_str().unwrap().contains("broke off"), "{c}: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_cut_and_idle_timeout_are_charged_their_bound() {
    let s = setup("", "").await;
    futures_util::future::join_all(DEPLOYMENTS.iter().map(|d| interrupted(&s, d))).await;
    let metrics =
        client().get(s.gw.admin_url("/metrics")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
    for (provider, n) in [("anthropic", 1), ("bedrock", 2), ("vertex", 1), ("vertex-global", 1)] {
        let line = format!("tollgate_upstream_errors_total{{kind=\"idle_timeout\",provider=\"{provider}\"}} {n}");
        assert!(metrics.lines().any(|l| l == line), "missing {line} in\n{metrics}");
    }
    assert_ledger_adds_up(&s.gw, 2 * DEPLOYMENTS.len(), 2 * DEPLOYMENTS.len()).await;
}

/// Under `controls.interrupted = "reservation"` and a budget, a cut stream is charged its
/// reservation's worst case (when above the streamed estimate) and flagged `reservation`; a
/// complete one is still charged its exact cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_policy_charges_a_cut_stream_its_worst_case() {
    let s = setup("budget = { usd = 100, period = \"daily\" }", "[controls]\ninterrupted = \"reservation\"").await;
    for d in [&DEPLOYMENTS[0], &DEPLOYMENTS[1]] {
        let [input, output, read, write_5m, write_1h] = rates(false, d.regional);
        let c = format!("reservation, cut on {}", d.model);
        let (rid, whole) =
            send(request(&s, Client::Anthropic, d.model, true, None, &[("x-mock-cut-after", "5".into())])).await;
        assert!(!whole, "{c}");
        let bound = output_bound(&tollgate::mock::sse_events(d.provider_model, &full_usage(), 4)[..5]);
        let billed = Billed { output: bound, ..FULL };
        // The worst case: every prompt token (the body's bytes plus 1024) at the dearest prompt
        // rate (the 1-hour write: 3333, regional 4000), and all 1000 max_tokens at the output
        // rate (7500, regional 9000).
        let body_len = path_and_body(Client::Anthropic, d.model, true, None).1.len() as u64;
        let worst = (body_len + 1024) * input.max(read).max(write_5m).max(write_1h) + 1000 * output;
        assert!(worst > cost(billed, rates(false, d.regional)), "{c}: the worst case must be the larger");
        check(&s.gw.record(&rid), &c, "incomplete", Some("reservation"), usage_json(billed, json!({})), worst);

        let c = format!("reservation, complete on {}", d.model);
        let (rid, whole) = send(request(&s, Client::Anthropic, d.model, true, None, &[])).await;
        assert!(whole, "{c}");
        check(
            &s.gw.record(&rid),
            &c,
            "complete",
            None,
            usage_json(FULL, json!({})),
            cost(FULL, rates(false, d.regional)),
        );
    }
    assert_ledger_adds_up(&s.gw, 4, 2).await;
}
