//! The gateway core end to end: the real binary, the mock provider, a real HTTP client.

mod common;

use common::*;
use serde_json::Value;

struct Setup {
    mock: MockProvider,
    gw: Gateway,
    alice: TestKey,
    bob: TestKey,
    disabled: TestKey,
    expired: TestKey,
}

/// Prices for the test models, so costs are exact whatever the shipped table says.
const TEST_PRICES: &str = r#"
[[price]]
match = "claude-sonnet-4-5-20250929"
input = 3.0
output = 15.0
cache_read = 0.3
cache_write_5m = 3.75
cache_write_1h = 6.0
"#;

async fn setup_with(behavior: Behavior, extra: &str) -> Setup {
    let mock = MockProvider::start(behavior).await.unwrap();
    let (alice, bob, disabled, expired) = (new_key(), new_key(), new_key(), new_key());
    let config = format!(
        r#"
[[provider]]
name = "mock"
kind = "anthropic"
base_url = "{mock}"
credential = "env:TG_TEST_PROVIDER_KEY"
first_byte_timeout = "5s"
idle_timeout = "5s"

[[provider]]
name = "keyless"
kind = "anthropic"
base_url = "{mock}"
credential = "env:TG_TEST_UNSET_VARIABLE"

[[model]]
name = "claude-sonnet-4-5"
aliases = ["sonnet"]
patterns = ["claude-sonnet-4-5-*"]
deployments = [{{ provider = "mock", model = "claude-sonnet-4-5-20250929" }}]

[[model]]
name = "claude-haiku-4-5"
deployments = [{{ provider = "mock", model = "claude-haiku-4-5-20251001" }}]

[[model]]
name = "claude-keyless"
deployments = [{{ provider = "keyless" }}]

[[key]]
id = "alice"
hash = "{alice}"
user = "alice@example.com"
team = "platform"

[[key]]
id = "bob"
hash = "{bob}"
user = "bob"
team = "web"
models = ["claude-haiku-*"]

[[key]]
id = "old"
hash = "{disabled}"
disabled = true

[[key]]
id = "expired"
hash = "{expired}"
expires = 2020-01-01T00:00:00Z
{TEST_PRICES}
{extra}
"#,
        mock = mock.url(),
        alice = alice.hash,
        bob = bob.hash,
        disabled = disabled.hash,
        expired = expired.hash,
    );
    let gw = start_gateway(&config);
    Setup { mock, gw, alice, bob, disabled, expired }
}

async fn setup() -> Setup {
    setup_with(Behavior::default(), "").await
}

fn cache_usage() -> MockUsage {
    MockUsage {
        input_tokens: 25,
        output_tokens: 15,
        cache_read_input_tokens: 4000,
        cache_creation_5m_input_tokens: 100,
        cache_creation_1h_input_tokens: 200,
        ..Default::default()
    }
}

/// 25*3 + 15*15 + 4000*0.3 + 100*3.75 + 200*6 USD per million tokens, in nano-dollars.
const CACHE_USAGE_COST_NANOS: u64 = 75_000 + 225_000 + 1_200_000 + 375_000 + 1_200_000;

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_passes_byte_exact_with_headers_and_is_metered() {
    let s = setup_with(Behavior { usage: cache_usage(), deltas: 5, ..Behavior::default() }, "").await;
    let beta = "claude-code-20250219,context-1m-2025-08-07,interleaved-thinking-2025-05-14";
    let resp = client()
        .post(s.gw.url("/v1/messages?beta=true"))
        .header("x-api-key", &s.alice.key)
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", beta)
        .header("x-claude-code-session-id", "3f1c-session")
        .header("user-agent", "claude-cli/2.1.0 (external, cli)")
        .header("content-type", "application/json")
        .body(messages_body("claude-sonnet-4-5-20250929", true, 100))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let id = request_id(&resp);
    let got = resp.bytes().await.unwrap();
    let expected: Vec<u8> = tollgate::mock::sse_events("claude-sonnet-4-5-20250929", &cache_usage(), 5).concat();
    assert_eq!(got, expected, "the SSE stream must arrive unchanged");

    let received = s.mock.received();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.uri, "/v1/messages?beta=true");
    assert_eq!(r.headers["anthropic-beta"], beta);
    assert_eq!(r.headers["anthropic-version"], "2023-06-01");
    assert_eq!(r.headers["x-api-key"], PROVIDER_SECRET);
    assert!(r.headers.get("authorization").is_none());
    assert_eq!(r.headers["host"], s.mock.addr.to_string());
    assert_eq!(r.headers["x-claude-code-session-id"], "3f1c-session");
    assert_eq!(r.body, messages_body("claude-sonnet-4-5-20250929", true, 100).as_bytes());

    let rec = s.gw.record(&id);
    assert_eq!(rec["key_id"], "alice");
    assert_eq!(rec["user"], "alice@example.com");
    assert_eq!(rec["team"], "platform");
    assert_eq!(rec["session_id"], "3f1c-session");
    assert_eq!(rec["user_agent"], "claude-cli/2.1.0 (external, cli)");
    assert_eq!(rec["client_ip"], "127.0.0.1");
    assert_eq!(rec["model"], "claude-sonnet-4-5");
    assert_eq!(rec["requested_model"], "claude-sonnet-4-5-20250929");
    assert_eq!(rec["provider"], "mock");
    assert_eq!(rec["provider_model"], "claude-sonnet-4-5-20250929");
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["upstream_status"], 200);
    assert_eq!(rec["outcome"], "complete");
    let u = &rec["usage"];
    assert_eq!(u["input_tokens"], 25);
    assert_eq!(u["output_tokens"], 15);
    assert_eq!(u["cache_read_input_tokens"], 4000);
    assert_eq!(u["cache_creation_input_tokens"], 300);
    assert_eq!(u["cache_creation_5m_input_tokens"], 100);
    assert_eq!(u["cache_creation_1h_input_tokens"], 200);
    assert_eq!(rec["cost_nanos"], CACHE_USAGE_COST_NANOS);
    assert_eq!(rec["priced"], true);
    assert!(rec["ttfb_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_round_trip_with_bearer_key() {
    let s = setup_with(Behavior { usage: cache_usage(), ..Behavior::default() }, "").await;
    let resp = client()
        .post(s.gw.url("/v1/messages"))
        .bearer_auth(&s.alice.key)
        .header("anthropic-version", "2026-10-21")
        .body(messages_body("claude-sonnet-4-5", false, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["model"], "claude-sonnet-4-5-20250929", "the public name was rewritten to the provider id");
    assert_eq!(v["usage"]["cache_read_input_tokens"], 4000);
    let r = &s.mock.received()[0];
    assert_eq!(r.headers["x-api-key"], PROVIDER_SECRET);
    assert_eq!(r.headers["anthropic-version"], "2026-10-21");
    assert!(r.headers.get("authorization").is_none(), "the client's bearer key must not reach the provider");
    let rec = s.gw.record(&id);
    assert_eq!(rec["stream"], false);
    assert_eq!(rec["outcome"], "complete");
    assert_eq!(rec["usage"]["input_tokens"], 25);
    assert_eq!(rec["usage"]["output_tokens"], 15);
    assert_eq!(rec["cost_nanos"], CACHE_USAGE_COST_NANOS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_megabyte_body_is_forwarded_with_only_model_rewritten() {
    let s = setup().await;
    let original = messages_body("sonnet", false, 1 << 20);
    let received = forwarded_with_model_rewritten(&s, &original, 0).await;
    assert!(received > 1 << 20);
}

/// A large body goes upstream as pieces of the client's bytes around the new `model` value;
/// wherever the value sits (first, between two large members, last), the provider must get
/// exactly the body with that value changed, and a `content-length` that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_with_model_anywhere_arrive_exact() {
    let s = setup().await;
    let pad = "p".repeat(40_000);
    let message = format!(r#"[{{"role":"user","content":"{pad}"}}]"#);
    let short_message = format!(r#"[{{"role":"user","content":"{}"}}]"#, "q".repeat(8_500));
    let bodies = [
        format!(r#"{{"model":"sonnet","max_tokens":64,"messages":{message}}}"#),
        format!(r#"{{"max_tokens":64,"messages":{message},"model":"sonnet","system":"{pad}"}}"#),
        format!(r#"{{"max_tokens":64,"messages":{message},"model":"sonnet"}}"#),
        // Just over the size from which the body goes in pieces, the value in the middle.
        format!(r#"{{"system":"{}","model":"sonnet","max_tokens":64,"messages":{short_message}}}"#, "s".repeat(8_000)),
    ];
    for (i, original) in bodies.iter().enumerate() {
        forwarded_with_model_rewritten(&s, original, i).await;
    }
}

/// Sends `original` (model `sonnet`) and checks that the provider got it with only the model's
/// value changed, as its `index`-th request; returns the length it got.
async fn forwarded_with_model_rewritten(s: &Setup, original: &str, index: usize) -> usize {
    let resp = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.alice.key)
        .header("anthropic-version", "2023-06-01")
        .body(original.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "body {index}");
    let received = &s.mock.received()[index];
    let expected = original.replacen("\"model\":\"sonnet\"", "\"model\":\"claude-sonnet-4-5-20250929\"", 1);
    assert_ne!(expected, original);
    assert_eq!(received.body.len(), expected.len(), "body {index}");
    assert!(received.body == expected.as_bytes(), "body {index}: only the model value may change");
    assert_eq!(received.headers["content-length"], expected.len().to_string(), "body {index}");
    received.body.len()
}

/// Sends a request and checks the gateway's own error: status, Anthropic shape, request id.
async fn expect_error(req: reqwest::RequestBuilder, status: u16, kind: &str, message_has: &str) -> String {
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), status);
    let id = request_id(&resp);
    assert_eq!(resp.headers()["request-id"].to_str().unwrap(), id);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(message_has), "{msg:?} should mention {message_has:?}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_have_status_and_anthropic_shape() {
    let s = setup().await;
    let c = client();
    let post = |key: Option<&str>, body: String| {
        let mut r = c.post(s.gw.url("/v1/messages")).body(body);
        if let Some(k) = key {
            r = r.header("x-api-key", k);
        }
        r
    };
    let ok_body = || messages_body("claude-sonnet-4-5", false, 10);
    expect_error(post(None, ok_body()), 401, "authentication_error", "no API key").await;
    expect_error(post(Some("tg-not-a-key"), ok_body()), 401, "authentication_error", "invalid API key").await;
    expect_error(post(Some(&s.disabled.key), ok_body()), 401, "authentication_error", "disabled").await;
    let id = expect_error(post(Some(&s.expired.key), ok_body()), 401, "authentication_error", "expired").await;
    expect_error(post(Some(&s.bob.key), ok_body()), 403, "permission_error", "claude-sonnet-4-5").await;
    expect_error(
        post(Some(&s.alice.key), messages_body("claude-nope-9", false, 1)),
        404,
        "not_found_error",
        "model: claude-nope-9",
    )
    .await;
    expect_error(
        post(Some(&s.alice.key), "{\"model\": \"claude-sonnet-4-5\",".into()),
        400,
        "invalid_request_error",
        "not valid JSON",
    )
    .await;
    expect_error(
        post(Some(&s.alice.key), "{\"max_tokens\": 10}".into()),
        400,
        "invalid_request_error",
        "model: field required",
    )
    .await;
    expect_error(
        post(Some(&s.alice.key), "{\"model\":\"a\",\"model\":\"b\"}".into()),
        400,
        "invalid_request_error",
        "duplicate",
    )
    .await;
    expect_error(
        c.get(s.gw.url("/v1/nothing")).header("x-api-key", &s.alice.key),
        404,
        "not_found_error",
        "/v1/nothing",
    )
    .await;
    expect_error(c.get(s.gw.url("/v1/messages")), 405, "invalid_request_error", "POST").await;
    expect_error(
        post(Some(&s.alice.key), messages_body("claude-keyless", false, 1)),
        503,
        "api_error",
        "TG_TEST_UNSET_VARIABLE",
    )
    .await;
    assert!(s.mock.received().is_empty(), "no refused request may reach the provider");
    let rec = s.gw.record(&id);
    assert_eq!(rec["status"], 401);
    assert_eq!(rec["outcome"], "rejected");
    assert_eq!(rec["key_id"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_stream_still_leaves_an_incomplete_record() {
    let s = setup().await;
    let resp = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.alice.key)
        .header("x-mock-cut-after", "4")
        .header("x-mock-usage", r#"{"input_tokens":900,"output_tokens":40,"cache_read_input_tokens":10,"cache_creation_5m_input_tokens":0,"cache_creation_1h_input_tokens":0}"#)
        .body(messages_body("claude-sonnet-4-5", true, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    assert!(resp.bytes().await.is_err(), "the client must see the stream cut short, not a clean end");
    let rec = s.gw.record(&id);
    assert_eq!(rec["outcome"], "incomplete");
    assert_eq!(rec["usage"]["input_tokens"], 900);
    assert_eq!(rec["usage"]["cache_read_input_tokens"], 10);
    // No message_delta came: the output is bounded by what streamed, message_start's 1 token
    // plus the bytes of the one delta after `data:` (" {…}\n" is 111 bytes) beyond its 80-byte
    // wrapper, and the record says it is an estimate.
    assert_eq!(rec["usage"]["output_tokens"], 1 + (111 - 80));
    assert_eq!(rec["usage_estimated"], "streamed_content");
    assert_eq!(rec["cost_nanos"], 900 * 3000 + 10 * 300 + 32 * 15_000);
    assert!(rec["error"].as_str().unwrap().contains("broke off"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_and_are_recorded() {
    let s = setup().await;
    let resp = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.alice.key)
        .header("x-mock-status", "529")
        .body(messages_body("claude-sonnet-4-5", true, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 529);
    let id = request_id(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    let rec = s.gw.record(&id);
    assert_eq!(rec["outcome"], "upstream_error");
    assert_eq!(rec["error"], "overloaded_error");
    assert_eq!(rec["upstream_status"], 529);
    assert_eq!(rec["cost_nanos"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_and_probes() {
    let s = setup().await;
    let c = client();
    let resp = c
        .post(s.gw.url("/v1/messages/count_tokens?beta=true"))
        .header("x-api-key", &s.alice.key)
        .header("anthropic-beta", "token-counting-2024-11-01")
        .body(r#"{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["input_tokens"], 25);
    let r = &s.mock.received()[0];
    assert_eq!(r.uri, "/v1/messages/count_tokens?beta=true");
    assert_eq!(
        r.body,
        r#"{"model":"claude-haiku-4-5-20251001","messages":[{"role":"user","content":"hi"}]}"#.as_bytes()
    );

    // Claude Code's reachability probe needs no key.
    let head = c.head(s.gw.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let get = c.get(s.gw.url("/")).send().await.unwrap();
    assert_eq!(get.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_reflect_requests() {
    let s = setup_with(Behavior { usage: cache_usage(), ..Behavior::default() }, "").await;
    let c = client();
    for stream in [true, false] {
        let resp = c
            .post(s.gw.url("/v1/messages"))
            .header("x-api-key", &s.alice.key)
            .body(messages_body("claude-sonnet-4-5", stream, 10))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let resp = c.post(s.gw.url("/v1/messages")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // The last request leaves the in-flight gauge just after its answer: give it a moment.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = c.get(s.gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.contains("tollgate_in_flight_requests 0") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let has = |line: &str| assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    has(r#"tollgate_requests_total{model="claude-sonnet-4-5",provider="mock",status_class="2xx",team="platform"} 2"#);
    has(r#"tollgate_requests_total{model="none",provider="none",status_class="4xx",team="none"} 1"#);
    has(r#"tollgate_tokens_total{class="cache_read",model="claude-sonnet-4-5",provider="mock",team="platform"} 8000"#);
    has(r#"tollgate_tokens_total{class="output",model="claude-sonnet-4-5",provider="mock",team="platform"} 30"#);
    has(
        r#"tollgate_tokens_total{class="cache_write_1h",model="claude-sonnet-4-5",provider="mock",team="platform"} 400"#,
    );
    has("tollgate_in_flight_requests 0");
    assert!(metrics
        .contains("tollgate_cost_usd_total{model=\"claude-sonnet-4-5\",provider=\"mock\",team=\"platform\"} 0.00615"));
    assert!(metrics.contains(
        "tollgate_time_to_first_byte_seconds_count{model=\"claude-sonnet-4-5\",provider=\"mock\",stream=\"true\"} 1"
    ));
    assert!(!metrics.contains(&s.alice.key));

    assert_eq!(c.get(s.gw.admin_url("/healthz")).send().await.unwrap().status(), 200);
    // The `keyless` provider has no credential, so the gateway is not ready, and says why.
    let ready = c.get(s.gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let v: Value = ready.json().await.unwrap();
    assert!(v["problems"][0].as_str().unwrap().contains("keyless"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_flushes_every_record() {
    let mut s = setup().await;
    let c = client();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let resp = c
            .post(s.gw.url("/v1/messages"))
            .header("x-api-key", &s.alice.key)
            .body(messages_body("claude-sonnet-4-5", true, 10))
            .send()
            .await
            .unwrap();
        ids.push(request_id(&resp));
        resp.bytes().await.unwrap();
    }
    let status = s.gw.stop();
    assert!(status.success(), "{status:?}");
    let records = s.gw.records();
    for id in &ids {
        assert_eq!(records.iter().filter(|r| r["request_id"] == id.as_str()).count(), 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_is_enforced_with_and_without_content_length() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let config = format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         [[model]]\nname = \"claude-sonnet-4-5\"\ndeployments = [{{ provider = \"mock\" }}]\n\
         [[key]]\nid = \"alice\"\nhash = \"{}\"\n",
        mock.url(),
        key.hash
    );
    let gw = start_gateway_with("max_body_bytes = 4096", &config);
    let c = client();
    // Declared too large: refused before the body is read.
    let id = expect_error(
        c.post(gw.url("/v1/messages")).header("x-api-key", &key.key).body(messages_body(
            "claude-sonnet-4-5",
            false,
            5000,
        )),
        413,
        "request_too_large",
        "4096 bytes",
    )
    .await;
    assert_eq!(gw.record(&id)["outcome"], "rejected");
    // Chunked, no Content-Length: refused once the limit is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(vec![b' '; 3000]), Ok(vec![b' '; 3000])];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    expect_error(
        c.post(gw.url("/v1/messages")).header("x-api-key", &key.key).body(body),
        413,
        "request_too_large",
        "4096",
    )
    .await;
    // Within the limit: served.
    let ok = c
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &key.key)
        .body(messages_body("claude-sonnet-4-5", false, 100))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(mock.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_client_keys_never_reach_the_provider() {
    let s = setup().await;
    let resp = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.alice.key)
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "must-not-pass")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-custom-end-to-end", "kept")
        .body(messages_body("claude-sonnet-4-5", false, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for h in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
        assert!(resp.headers().get(h).is_none() || h == "connection", "{h} reached the client");
    }
    let r = &s.mock.received()[0];
    for h in ["x-hop-secret", "keep-alive", "te", "proxy-authorization", "authorization"] {
        assert!(r.headers.get(h).is_none(), "{h} reached the provider");
    }
    assert_eq!(r.headers["x-custom-end-to-end"], "kept");
    for (name, value) in &r.headers {
        assert!(
            !value.as_bytes().windows(s.alice.key.len()).any(|w| w == s.alice.key.as_bytes()),
            "client key in {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_relayed_as_it_arrives_and_a_client_cut_is_recorded() {
    let s = setup().await;
    let started = std::time::Instant::now();
    let mut resp = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.alice.key)
        .header("x-mock-delay-ms", "300")
        .header("x-mock-deltas", "10")
        .body(messages_body("claude-sonnet-4-5", true, 10))
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let first = resp.chunk().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(first.starts_with(b"event: message_start"));
    // The whole answer takes 15 pauses of 300 ms; the first event must not wait for them.
    assert!(first_at < std::time::Duration::from_millis(2000), "first event after {first_at:?}: buffered?");
    // While it streams, others are served at once.
    let normal_started = std::time::Instant::now();
    let normal = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.alice.key)
        .body(messages_body("claude-sonnet-4-5", false, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(normal.status(), 200);
    assert!(normal_started.elapsed() < std::time::Duration::from_secs(1), "{:?}", normal_started.elapsed());
    // Read one more event, then hang up.
    resp.chunk().await.unwrap().unwrap();
    drop(resp);
    let rec = s.gw.record(&id);
    assert_eq!(rec["outcome"], "incomplete");
    assert_eq!(rec["error"], "client disconnected");
    assert_eq!(rec["usage"]["input_tokens"], 25);
    // The provider's stream was abandoned too (no generation left running for nobody).
    for _ in 0..100 {
        if s.mock.abandoned_streams() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(s.mock.abandoned_streams(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_applies_to_the_model_that_will_run() {
    // bob may use claude-haiku-*; the catch-all route passes names through unchanged.
    let extra = "[[model]]\nname = \"sonnet-anywhere\"\npatterns = [\"*claude-sonnet-4-5*\"]\n\
                 deployments = [{ provider = \"mock\", model = \"claude-sonnet-4-5-20250929\" }]\n\
                 [[model]]\nname = \"any-claude\"\npatterns = [\"*claude*\"]\ndeployments = [{ provider = \"mock\" }]\n";
    let s = setup_with(Behavior::default(), extra).await;
    let c = client();
    let send = |model: &str| {
        c.post(s.gw.url("/v1/messages")).header("x-api-key", &s.bob.key).body(messages_body(model, false, 1)).send()
    };
    assert_eq!(send("claude-haiku-4-5").await.unwrap().status(), 200);
    assert_eq!(send("claude-haiku-9-via-catch-all").await.unwrap().status(), 200);
    // A name crafted to match bob's glob and a Sonnet route's pattern is refused: Sonnet would run.
    assert_eq!(send("claude-haiku-x-claude-sonnet-4-5-20250929").await.unwrap().status(), 403);
    assert_eq!(send("claude-opus-4-8").await.unwrap().status(), 403);
    let sent: Vec<String> = s
        .mock
        .received()
        .iter()
        .map(|r| tollgate::protocol::json_peek::peek_request(&r.body).unwrap().model.unwrap().0)
        .collect();
    assert_eq!(sent, ["claude-haiku-4-5-20251001", "claude-haiku-9-via-catch-all"]);
}
