//! Pools, health and fallbacks: a model keeps answering when a provider does not.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const PRIMARY_MODEL: &str = "claude-sonnet-4-5-20250929";
const SECONDARY_MODEL: &str = "claude-sonnet-4-5@vertex-style";

struct Setup {
    first: MockProvider,
    second: MockProvider,
    gw: Gateway,
    key: TestKey,
}

/// Model `m` goes to provider `one` (the `first` mock, or `one_url` when given), then to `two`.
async fn two_providers(first: Behavior, one_url: Option<String>, provider_extra: &str, model_extra: &str) -> Setup {
    let first = MockProvider::start(first).await.unwrap();
    let second = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let config = format!(
        r#"
[[provider]]
name = "one"
kind = "anthropic"
base_url = "{one}"
credential = "env:TG_TEST_PROVIDER_KEY"
first_byte_timeout = "500ms"
{provider_extra}

[[provider]]
name = "two"
kind = "anthropic"
base_url = "{two}"
credential = "env:TG_TEST_PROVIDER_KEY"

[[model]]
name = "m"
deployments = [{{ provider = "one", model = "{PRIMARY_MODEL}" }}, {{ provider = "two", model = "{SECONDARY_MODEL}" }}]
{model_extra}

[[key]]
id = "alice"
hash = "{hash}"
"#,
        one = one_url.unwrap_or_else(|| first.url()),
        two = second.url(),
        hash = key.hash,
    );
    let gw = start_gateway(&config);
    Setup { first, second, gw, key }
}

/// One provider `pool` with the given `endpoints = [...]` line and `extra` provider lines,
/// model `m` on it, and the key.
fn pool_config(endpoints: &str, extra: &str, key: &TestKey) -> String {
    format!(
        "[[provider]]\nname = \"pool\"\nkind = \"anthropic\"\n{endpoints}\n{extra}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"pool\" }}]\n[[key]]\nid = \"a\"\nhash = \"{}\"\n",
        key.hash
    )
}

async fn post(s: &Setup, body: String, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = client().post(s.gw.url("/v1/messages")).header("x-api-key", &s.key.key).body(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn id(r: &reqwest::Response) -> String {
    r.headers()["x-tollgate-request-id"].to_str().unwrap().to_string()
}

/// Each failure mode of the first provider: the client still sees one clean 200 stream, and a
/// 2 MB body reaches the second provider byte-exact with only `model` changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_before_the_answer_falls_back_to_the_next_provider() {
    let modes: Vec<(&str, Behavior, bool)> = vec![
        ("529", Behavior { status: Some(529), ..Behavior::default() }, false),
        ("429", Behavior { status: Some(429), ..Behavior::default() }, false),
        ("500", Behavior { status: Some(500), ..Behavior::default() }, false),
        ("refused", Behavior::default(), true),
        ("stall", Behavior { header_delay: Duration::from_secs(3), ..Behavior::default() }, false),
    ];
    for (name, behavior, refuse) in modes {
        let closed = refuse.then(|| format!("http://127.0.0.1:{}", free_port()));
        let s = two_providers(behavior, closed, "health = { probe = \"none\" }", "").await;
        let body = messages_body("m", true, 2 << 20);
        let resp = post(&s, body.clone(), &[]).await;
        assert_eq!(resp.status(), 200, "{name}");
        let rid = id(&resp);
        let bytes = resp.bytes().await.unwrap();
        assert!(bytes.starts_with(b"event: message_start"), "{name}");
        assert!(bytes.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"), "{name}");
        let got = s.second.received();
        assert_eq!(got.len(), 1, "{name}");
        let expected = body.replacen("\"model\":\"m\"", &format!("\"model\":\"{SECONDARY_MODEL}\""), 1);
        assert!(got[0].body == expected.as_bytes(), "{name}: the 2 MB body must arrive byte-exact");
        if !refuse {
            assert_eq!(s.first.received().len(), 1, "{name}: one try at the first provider");
        }
        let rec = s.gw.record(&rid);
        assert_eq!(rec["outcome"], "complete", "{name}");
        assert_eq!(rec["provider"], "two", "{name}");
        assert_eq!(rec["provider_model"], SECONDARY_MODEL, "{name}");
        let attempts = rec["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{name}: {attempts:?}");
        assert_eq!(attempts[0]["provider"], "one");
        assert!(attempts[0]["abandoned"].is_string(), "{name}");
        assert_eq!(attempts[1]["provider"], "two");
        assert_eq!(attempts[1]["status"], 200);
        assert!(attempts[1]["abandoned"].is_null());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_are_not_retried_and_streams_are_never_replayed() {
    let s = two_providers(Behavior { status: Some(400), ..Behavior::default() }, None, "", "").await;
    let resp = post(&s, messages_body("m", false, 10), &[]).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(s.second.received().is_empty(), "a 400 is the client's to see");

    // A stream cut mid-way: the client gets a truncated stream, nobody gets a second request.
    let s = two_providers(Behavior { cut_after: Some(4), ..Behavior::default() }, None, "", "").await;
    let resp = post(&s, messages_body("m", true, 10), &[]).await;
    assert_eq!(resp.status(), 200);
    let rid = id(&resp);
    assert!(resp.bytes().await.is_err());
    assert_eq!(s.first.received().len(), 1);
    assert!(s.second.received().is_empty(), "no retry once the answer started");
    let rec = s.gw.record(&rid);
    assert_eq!(rec["outcome"], "incomplete");
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_everything_fails_the_last_provider_error_comes_back() {
    let s = two_providers(Behavior { status: Some(529), ..Behavior::default() }, None, "", "").await;
    s.second.set_behavior(Behavior { status: Some(429), ..Behavior::default() });
    let resp = post(&s, messages_body("m", true, 10), &[]).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let rid = id(&resp);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let rec = s.gw.record(&rid);
    assert_eq!(rec["outcome"], "upstream_error");
    assert_eq!(rec["attempts"].as_array().unwrap().len(), 2);

    // A provider error beats a later gateway error: 429 from the first, then nobody listening.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let s = two_providers(Behavior { status: Some(429), ..Behavior::default() }, None, "", "").await;
    let config = std::fs::read_to_string(&s.gw.config_path).unwrap().replace(&s.second.url(), &closed);
    let gw = start_gateway_raw(&config);
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &s.key.key)
        .body(messages_body("m", false, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429, "the client must see the 429 and its retry-after");
    assert_eq!(resp.headers()["retry-after"], "1");

    // Nothing listening anywhere: the gateway's own 502, not a hang.
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&one_provider_config(&format!("http://127.0.0.1:{}", free_port()), &key));
    let resp = messages_request(&gw, &key).body(messages_body("m", false, 1)).send().await.unwrap();
    assert!(resp.status() == 502 || resp.status() == 503, "{}", resp.status());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    drop(mock);
}

/// One provider, two endpoints: the failing one leaves rotation after N failures, gets no
/// traffic during its cool-down, and comes back once it has recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoint_leaves_rotation_and_comes_back() {
    let bad = MockProvider::start(Behavior { status: Some(500), ..Behavior::default() }).await.unwrap();
    let good = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let endpoints = format!("endpoints = [{{ url = \"{}\" }}, {{ url = \"{}\" }}]", bad.url(), good.url());
    let gw = start_gateway(&pool_config(
        &endpoints,
        "credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = { probe = \"none\", failures = 2, cooldown = \"2s\" }",
        &key,
    ));
    let c = client();
    let send = || messages_request(&gw, &key).body(messages_body("m", false, 1)).send();
    for _ in 0..10 {
        assert_eq!(send().await.unwrap().status(), 200);
    }
    assert_eq!(bad.received().len(), 2, "two failures, then out of rotation");
    assert_eq!(good.received().len(), 10);
    let status: Value = c.get(gw.admin_url("/status")).send().await.unwrap().json().await.unwrap();
    let eps = &status["providers"][0]["endpoints"];
    assert_eq!(eps[0]["in_rotation"], false, "{status}");
    assert_eq!(eps[1]["in_rotation"], true);
    let metrics = c.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .contains(&format!("tollgate_endpoint_cooldowns_total{{endpoint=\"{}\",provider=\"pool\"}} 1", bad.addr)),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("tollgate_endpoint_up{{endpoint=\"{}\",provider=\"pool\"}} 0", bad.addr)));
    assert!(metrics.contains("tollgate_upstream_attempts_total{outcome=\"retried\",provider=\"pool\"} 2"));

    // Recovered; after the cool-down it gets traffic again.
    bad.set_behavior(Behavior::default());
    tokio::time::sleep(Duration::from_millis(2600)).await;
    for _ in 0..4 {
        assert_eq!(send().await.unwrap().status(), 200);
    }
    assert!(bad.received().len() > 2, "back in rotation after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_keeps_a_session_on_one_endpoint() {
    let mocks = [
        MockProvider::start(Behavior::default()).await.unwrap(),
        MockProvider::start(Behavior::default()).await.unwrap(),
        MockProvider::start(Behavior::default()).await.unwrap(),
    ];
    let key = new_key();
    let urls: Vec<String> = mocks.iter().map(|m| format!("{{ url = \"{}\" }}", m.url())).collect();
    let config = format!(
        "[[provider]]\nname = \"pool\"\nkind = \"anthropic\"\nendpoints = [{}]\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         selection = \"session_affinity\"\n[[model]]\nname = \"m\"\ndeployments = [{{ provider = \"pool\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{}\"\n",
        urls.join(", "),
        key.hash
    );
    let gw = start_gateway(&config);
    let in_session = |session: &'static str| {
        messages_request(&gw, &key)
            .header("x-claude-code-session-id", session)
            .body(messages_body("m", false, 1))
            .send()
    };
    for session in ["session-a", "session-b", "session-c", "session-d"] {
        let before: Vec<usize> = mocks.iter().map(|m| m.received().len()).collect();
        for _ in 0..6 {
            assert_eq!(in_session(session).await.unwrap().status(), 200);
        }
        let grew: Vec<usize> = mocks.iter().zip(before).map(|(m, b)| m.received().len() - b).collect();
        assert_eq!(grew.iter().filter(|n| **n > 0).count(), 1, "{session} spread over {grew:?}");
        assert_eq!(grew.iter().sum::<usize>(), 6);
    }
    // Sessions as a whole are spread over the endpoints (the key is really used), and so are
    // requests that carry no session at all.
    let used = mocks.iter().filter(|m| !m.received().is_empty()).count();
    assert!(used >= 2, "four sessions all on one endpoint");
    let before: Vec<usize> = mocks.iter().map(|m| m.received().len()).collect();
    for _ in 0..9 {
        let r = messages_request(&gw, &key).body(r#"{"model":"m","max_tokens":1}"#).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let grew = mocks.iter().zip(&before).filter(|(m, b)| m.received().len() > **b).count();
    assert!(grew >= 2, "requests without a session key must not all go to one endpoint");

    // When a session's endpoint fails, the session moves to another one, and stays there.
    let session = "session-a";
    let home = mocks
        .iter()
        .position(|m| {
            m.received().iter().any(|r| r.headers.get("x-claude-code-session-id").is_some_and(|v| v == session))
        })
        .unwrap();
    mocks[home].set_behavior(Behavior { status: Some(529), ..Behavior::default() });
    let counts: Vec<usize> = mocks.iter().map(|m| m.received().len()).collect();
    for _ in 0..4 {
        assert_eq!(in_session(session).await.unwrap().status(), 200);
    }
    let moved: Vec<usize> = mocks.iter().zip(counts).map(|(m, b)| m.received().len() - b).collect();
    let others: Vec<usize> = moved.iter().enumerate().filter(|(i, _)| *i != home).map(|(_, n)| *n).collect();
    assert_eq!(others.iter().filter(|n| **n > 0).count(), 1, "the session settles on one other endpoint: {moved:?}");
    assert_eq!(others.iter().sum::<usize>(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_never_send_a_messages_request() {
    let s = two_providers(Behavior::default(), None, "health = { probe = \"http\", interval = \"100ms\" }", "").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = s.first.received();
    assert!(!got.is_empty(), "the probe ran");
    for r in &got {
        assert_eq!((r.method.as_str(), r.uri.as_str()), ("GET", "/"), "a probe must cost no tokens");
        assert!(r.headers.get("x-api-key").is_none(), "a probe carries no credential");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_too_long_moves_to_the_larger_context_model() {
    let small = Behavior {
        status: Some(400),
        error_message: Some("prompt is too long: 250000 tokens > 200000 maximum".into()),
        ..Behavior::default()
    };
    let s = two_providers(
        small,
        None,
        "",
        "context_fallback = \"m-1m\"\n\n[[model]]\nname = \"m-1m\"\ndeployments = [{ provider = \"two\", model = \"claude-sonnet-4-5-1m\" }]",
    )
    .await;
    let resp = post(&s, messages_body("m", false, 10), &[]).await;
    assert_eq!(resp.status(), 200);
    let rid = id(&resp);
    let sent = &s.second.received()[0];
    let peek = tollgate::protocol::json_peek::peek_request(&sent.body).unwrap();
    assert_eq!(peek.model.unwrap().0, "claude-sonnet-4-5-1m");
    let rec = s.gw.record(&rid);
    assert_eq!(rec["model"], "m-1m");
    assert!(rec["attempts"][0]["abandoned"].as_str().unwrap().contains("prompt too long"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_and_credentials_spread_the_load() {
    let heavy = MockProvider::start(Behavior::default()).await.unwrap();
    let light = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let second_secret = dir.path().join("second-key");
    std::fs::write(&second_secret, "sk-ant-second-credential\n").unwrap();
    let endpoints = format!(
        "endpoints = [{{ url = \"{}\", weight = 3 }}, {{ url = \"{}\", weight = 1 }}]",
        heavy.url(),
        light.url()
    );
    let extra = format!(
        "credentials = [\"env:TG_TEST_PROVIDER_KEY\", \"file:{}\"]\nselection = \"weighted\"",
        second_secret.display()
    );
    let gw = start_gateway(&pool_config(&endpoints, &extra, &key));
    for _ in 0..40 {
        let r = messages_request(&gw, &key).body(messages_body("m", false, 1)).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let (h, l) = (heavy.received(), light.received());
    assert_eq!(h.len() + l.len(), 40);
    assert_eq!((h.len(), l.len()), (30, 10), "weights 3:1");
    let keys: Vec<String> =
        h.iter().chain(l.iter()).map(|r| r.headers["x-api-key"].to_str().unwrap().to_string()).collect();
    let first = keys.iter().filter(|k| *k == PROVIDER_SECRET).count();
    let second = keys.iter().filter(|k| *k == "sk-ant-second-credential").count();
    assert_eq!((first, second), (20, 20), "credentials are used in turn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_and_the_deadline_are_bounded() {
    // Three failing deployments, max_attempts = 2: the third provider is never asked.
    let mocks = [
        MockProvider::start(Behavior { status: Some(503), ..Behavior::default() }).await.unwrap(),
        MockProvider::start(Behavior { status: Some(503), ..Behavior::default() }).await.unwrap(),
        MockProvider::start(Behavior::default()).await.unwrap(),
    ];
    let key = new_key();
    let mut config = String::new();
    for (i, m) in mocks.iter().enumerate() {
        config += &format!(
            "[[provider]]\nname = \"p{i}\"\nkind = \"anthropic\"\nbase_url = \"{}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
             first_byte_timeout = \"10s\"\n",
            m.url()
        );
    }
    config += &format!(
        "[[model]]\nname = \"m\"\nmax_attempts = 2\ndeployments = [{{ provider = \"p0\" }}, {{ provider = \"p1\" }}, {{ provider = \"p2\" }}]\n\
         [[model]]\nname = \"slow\"\ndeadline = \"1s\"\ndeployments = [{{ provider = \"p0\" }}, {{ provider = \"p2\" }}]\n\
         [[model]]\nname = \"ok\"\ndeployments = [{{ provider = \"p2\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{}\"\n",
        key.hash
    );
    let gw = start_gateway(&config);
    let resp = messages_request(&gw, &key).body(messages_body("m", false, 1)).send().await.unwrap();
    assert_eq!(resp.status(), 503, "the last provider error comes back");
    assert_eq!((mocks[0].received().len(), mocks[1].received().len(), mocks[2].received().len()), (1, 1, 0));

    // The first provider stalls far past the model's deadline: the client gets a 504 in about
    // a second, not after the provider's ten-second first-byte timeout.
    mocks[0].set_behavior(Behavior { header_delay: Duration::from_secs(5), ..Behavior::default() });
    let started = std::time::Instant::now();
    let slow = messages_request(&gw, &key).body(messages_body("slow", false, 1)).send();
    let normal = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at = std::time::Instant::now();
        let r = messages_request(&gw, &key).body(messages_body("ok", false, 1)).send().await.unwrap();
        (r.status(), at.elapsed())
    };
    let (resp, (normal_status, normal_took)) = tokio::join!(slow, normal);
    let resp = resp.unwrap();
    let took = started.elapsed();
    // Meanwhile a request for another model is answered at once.
    assert_eq!(normal_status, 200);
    assert!(normal_took < Duration::from_secs(1), "{normal_took:?}");
    assert_eq!(resp.status(), 504);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
}
