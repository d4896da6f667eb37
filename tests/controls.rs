//! Budgets and rate limits against the real gateway: they admit exactly what they should under
//! concurrency, give every slot back on every path, survive restarts and follow reloads.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Shipped price of this id: $6 per million 1-hour cache writes (the dearest prompt rate) and
/// $15 per million output tokens, in nano-dollars per token.
const MODEL_ID: &str = "claude-sonnet-4-5-20250929";
const PROMPT_RATE: u64 = 6000;
const OUTPUT_RATE: u64 = 15_000;
/// The gateway reserves this many prompt tokens beyond the body's size.
const OVERHEAD: u64 = 1024;
const MAX_TOKENS: u64 = 100;

fn body() -> String {
    json!({
        "model": "m",
        "max_tokens": MAX_TOKENS,
        "stream": true,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string()
}

/// What the gateway reserves for [`body`].
fn worst_case() -> u64 {
    (body().len() as u64 + OVERHEAD) * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE
}

/// Usage that costs exactly the worst case: every prompt token a 1-hour cache write and every
/// allowed output token used.
fn usage_at_worst_case() -> String {
    json!({
        "input_tokens": 0,
        "output_tokens": MAX_TOKENS,
        "cache_read_input_tokens": 0,
        "cache_creation_5m_input_tokens": 0,
        "cache_creation_1h_input_tokens": body().len() as u64 + OVERHEAD,
    })
    .to_string()
}

fn config(mock: &MockProvider, key: &TestKey, key_extra: &str, extra: &str) -> String {
    format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         first_byte_timeout = \"500ms\"\nhealth = {{ probe = \"none\", failures = 1000 }}\n\
         [[model]]\nname = \"m\"\nmax_attempts = 1\ndeployments = [{{ provider = \"mock\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\nteam = \"t\"\n{key_extra}\n{extra}\n",
        url = mock.url(),
        hash = key.hash,
    )
}

/// The gateway's error message in an Anthropic error body (the body itself otherwise).
fn message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.to_string())
}

/// Sends [`body`]; an error answer's text is its message.
async fn send(gw: &Gateway, key: &TestKey, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = messages_request(gw, key).body(body());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (status, h, if status == 200 { text } else { message(&text) })
}

/// The ledger's total for the key, read back from the audit log the same requests went to.
fn spent(gw: &Gateway) -> u64 {
    gw.records().iter().map(|r| r["cost_nanos"].as_u64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_under_200_concurrent_requests() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let budget = 50 * worst_case();
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", budget as f64 / 1e9);
    let gw = start_gateway(&config(&mock, &key, &key_extra, ""));
    let usage = usage_at_worst_case();

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let req = messages_request(&gw, &key)
                .body(body())
                .header("x-mock-usage", usage.clone())
                .header("x-mock-delay-ms", "5");
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap();
                (status, message(&text))
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        match status {
            200 => {
                assert!(text.contains("event: message_stop"), "a whole stream");
                admitted += 1;
            }
            429 => assert!(text.contains("held by requests in flight"), "{text}"),
            403 => assert!(text.contains("daily budget of key \"a\""), "{text}"),
            other => panic!("unexpected status {other}: {text}"),
        }
    }
    // Every admitted request costs exactly its reservation, so exactly 50 fit.
    assert_eq!(admitted, 50);
    assert_eq!(mock.received().len(), 50, "exactly the admitted requests reached the provider");
    gw.wait_for_records(200);
    assert_eq!(spent(&gw), budget);
    let (status, _, text) = send(&gw, &key, &[]).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("is spent"), "{text}");
    assert!(text.contains("it resets at "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_admits_exactly_the_limit() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&mock, &key, "limits = { rpm = 5 }", ""));
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..8 {
        let (status, headers, text) = send(&gw, &key, &[]).await;
        statuses.push(status);
        if status == 429 {
            last = Some((headers, text));
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(mock.received().len(), 5);
    let (headers, text) = last.unwrap();
    assert!(text.starts_with("rate limit of key \"a\": 5 requests per minute; retry in "), "{text}");
    let raw: Value = messages_request(&gw, &key).body(body()).send().await.unwrap().json().await.unwrap();
    assert_eq!((&raw["type"], &raw["error"]["type"]), (&json!("error"), &json!("rate_limit_error")));
    assert_eq!(headers["anthropic-ratelimit-requests-limit"], "5");
    assert_eq!(headers["anthropic-ratelimit-requests-remaining"], "0");
    // One request comes back every 12 s; the header rounds up to whole seconds.
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((11..=12).contains(&retry), "retry-after {retry}");
    assert!(headers.contains_key("anthropic-ratelimit-requests-reset"));

    // Token counting costs nothing but is a request like any other: no route gets around the limit.
    let resp = client()
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", &key.key)
        .body(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let metrics = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_refused_total{reason=\"rpm\"} 5"), "{metrics}");
}

/// Starts a slow stream and returns once its first bytes arrived (the request holds its slot).
async fn slow_stream(gw: &Gateway, key: &TestKey) -> reqwest::Response {
    let mut resp = messages_request(gw, key)
        .body(body())
        .header("x-mock-deltas", "20")
        .header("x-mock-delay-ms", "100")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.chunk().await.unwrap().expect("first bytes");
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_admits_exactly_the_limit() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&mock, &key, "limits = { concurrency = 2 }", ""));
    let a = slow_stream(&gw, &key).await;
    let b = slow_stream(&gw, &key).await;
    let (status, headers, text) = send(&gw, &key, &[]).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("concurrency limit of key \"a\": 2 requests at a time"), "{text}");
    assert_eq!(headers["anthropic-ratelimit-concurrency-limit"], "2");
    assert_eq!(headers["retry-after"], "1");
    let (a, b) = (a.text().await.unwrap(), b.text().await.unwrap());
    assert!(a.contains("message_stop") && b.contains("message_stop"));
    gw.wait_for_records(3);
    assert_eq!(send(&gw, &key, &[]).await.0, 200, "both slots came back");
    assert_eq!(mock.received().len(), 3);
}

/// Retries `send` until it is admitted: the slot must come back, within a few seconds.
async fn admitted_again(gw: &Gateway, key: &TestKey) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, text) = send(gw, key, &[]).await;
        if status == 200 {
            return;
        }
        assert_eq!(status, 429, "{text}");
        assert!(Instant::now() < deadline, "the concurrency slot never came back: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_comes_back_after_upstream_error_disconnect_and_timeout() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&mock, &key, "limits = { concurrency = 1 }", ""));

    // An upstream error.
    let (status, _, _) = send(&gw, &key, &[("x-mock-status", "500")]).await;
    assert_eq!(status, 500);
    admitted_again(&gw, &key).await;

    // A client that leaves in the middle of a stream.
    let stream = slow_stream(&gw, &key).await;
    drop(stream);
    admitted_again(&gw, &key).await;

    // A provider that never answers (first-byte timeout is 500 ms).
    let (status, _, text) = send(&gw, &key, &[("x-mock-header-delay-ms", "3000")]).await;
    assert_eq!(status, 504, "{text}");
    admitted_again(&gw, &key).await;

    let outcomes: Vec<String> = gw.records().iter().map(|r| r["outcome"].as_str().unwrap().to_string()).collect();
    assert!(outcomes.contains(&"incomplete".to_string()), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_budget_is_shared_and_unpriced_models_are_refused() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let other = new_key();
    let budget = 2 * worst_case();
    let extra = format!(
        "[[key]]\nid = \"b\"\nhash = \"{}\"\nteam = \"t\"\n\
         [[team]]\nid = \"t\"\nbudget = {{ usd = {}, period = \"monthly\" }}\n\
         [[model]]\nname = \"unpriced\"\ndeployments = [{{ provider = \"mock\", model = \"no-such-model\" }}]\n",
        other.hash,
        budget as f64 / 1e9
    );
    let gw = start_gateway(&config(&mock, &key, "", &extra));
    let usage = usage_at_worst_case();
    assert_eq!(send(&gw, &key, &[("x-mock-usage", &usage)]).await.0, 200);
    assert_eq!(send(&gw, &other, &[("x-mock-usage", &usage)]).await.0, 200);
    // Both settled (a request's record is written after it settles): until then the next one
    // would be told the budget is held by requests in flight (429), not spent.
    gw.wait_for_records(2);
    let (status, _, text) = send(&gw, &key, &[]).await;
    assert_eq!(status, 403);
    assert!(text.contains("monthly budget of team \"t\""), "{text}");

    let resp = messages_request(&gw, &key).body(body().replace("\"m\"", "\"unpriced\"")).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let text = message(&resp.text().await.unwrap());
    assert!(text.contains("model no-such-model has no price"), "{text}");
    assert_eq!(mock.received().len(), 2);
    let metrics = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_budget_remaining_usd{id=\"t\",scope=\"team\"} 0\n"), "{metrics}");
    assert!(metrics.contains("tollgate_refused_total{reason=\"budget\"} 1\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_survives_graceful_stop_and_kill_9() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let budget = 3 * worst_case();
    let key_extra = format!("budget = {{ usd = {}, period = \"none\" }}", budget as f64 / 1e9);
    let mut gw = start_gateway(&config(&mock, &key, &key_extra, ""));
    let usage = usage_at_worst_case();
    let worst = [("x-mock-usage", usage.as_str())];

    // One request, then a graceful stop.
    assert_eq!(send(&gw, &key, &worst).await.0, 200);
    assert!(gw.stop().success());

    // After the restart the first request's spend is there; a second one, then kill -9 once
    // the flush interval (50 ms in the tests' config) has passed.
    let child = respawn(&gw, &[]);
    assert_eq!(send(&gw, &key, &worst).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill_9();

    // Two of three spent: one more fits, then the budget is spent.
    let child = respawn(&gw, &[]);
    assert_eq!(send(&gw, &key, &worst).await.0, 200);
    let (status, _, text) = send(&gw, &key, &worst).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("lifetime budget of key \"a\""), "{text}");
    assert!(text.contains("does not reset"), "{text}");
    assert_eq!(mock.received().len(), 3);
    child.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_limits_without_dropping_a_stream() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&mock, &key, "limits = { concurrency = 1 }", ""));
    let stream = slow_stream(&gw, &key).await;
    assert_eq!(send(&gw, &key, &[]).await.0, 429);

    // An invalid config is refused and the running one stays.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, text.replace("concurrency = 1", "concurrency = 0")).unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&gw, &key, &[]).await.0, 429, "the old limit still applies");

    std::fs::write(&gw.config_path, text.replace("concurrency = 1", "concurrency = 3")).unwrap();
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = send(&gw, &key, &[]).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the new limit never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stream that started before both reloads ends whole.
    let text = stream.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    assert_eq!(text.matches("event: content_block_delta").count(), 20);
}
