//! Fleet mode: several gateways count one set of budgets and limits in Redis (the machine's own,
//! 127.0.0.1:6379), each test under a key prefix of its own, removed afterwards.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The shipped row of this id: $6 per million 1-hour cache writes (its dearest prompt rate),
/// $15 per million output tokens, a 200,000-token context window.
const MODEL_ID: &str = "claude-sonnet-4-5-20250929";
const PROMPT_RATE: u64 = 6000;
const OUTPUT_RATE: u64 = 15_000;
const CONTEXT_WINDOW: u64 = 200_000;
const MAX_TOKENS: u64 = 100;
const REDIS: &str = "redis://127.0.0.1:6379/";

/// A key prefix of this test's own, and its keys removed when dropped.
struct Prefix(String);

impl Prefix {
    fn new() -> Self {
        Prefix(format!("tg-test-{:016x}", rand::random::<u64>()))
    }
}

impl Prefix {
    /// A scope's hash as Redis holds it.
    fn scope(&self, kind: &str, id: &str) -> std::collections::HashMap<String, String> {
        let mut c = redis::Client::open(REDIS).unwrap().get_connection().unwrap();
        redis::cmd("HGETALL").arg(format!("{{{}}}:s:{kind}:{id}", self.0)).query(&mut c).unwrap()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(REDIS) {
            if let Ok(mut c) = client.get_connection() {
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{{{}}}:*", self.0)).query(&mut c).unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query(&mut c);
                }
            }
        }
    }
}

fn redis_up() {
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client
        .get_connection()
        .unwrap_or_else(|e| panic!("fleet tests need Redis at 127.0.0.1:6379 (as CI machines run it): {e}"));
    let pong: String = redis::cmd("PING").query(&mut c).unwrap();
    assert_eq!(pong, "PONG");
}

fn config(mock_url: &str, key: &TestKey, key_extra: &str, prefix: &Prefix) -> String {
    format!(
        "[limits]\nbackend = \"redis\"\nurl = \"env:TG_TEST_REDIS_URL\"\nprefix = \"{prefix}\"\n\
         [[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{mock_url}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\", failures = 1000 }}\n\
         [[model]]\nname = \"m\"\nmax_attempts = 1\ndeployments = [{{ provider = \"mock\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\n{key_extra}\n",
        prefix = prefix.0,
        hash = key.hash,
    )
}

/// A prompt whose image the provider fetches by URL: the budget reserves the whole window.
fn body() -> String {
    json!({
        "model": "m",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/big.png"}},
            {"type": "text", "text": "what is in it?"},
        ]}],
    })
    .to_string()
}

fn start(config: &str) -> Gateway {
    start_gateway_admin("", &[("TG_TEST_REDIS_URL", REDIS)], config)
}

/// Two gateways, one key whose budget holds exactly ten worst cases, 200 concurrent requests
/// spread over both, each really costing its worst case: exactly ten are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_budget_exactly() {
    redis_up();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let worst = CONTEXT_WINDOW * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE;
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", (10 * worst) as f64 / 1e9);
    let cfg = config(&mock.url(), &key, &key_extra, &prefix);
    let (a, b) = (start(&cfg), start(&cfg));
    let usage =
        json!({"input_tokens": 0, "output_tokens": MAX_TOKENS, "cache_creation_1h_input_tokens": CONTEXT_WINDOW})
            .to_string();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let gw = if i % 2 == 0 { &a } else { &b };
            let req = messages_request(gw, &key)
                .body(body())
                .header("x-mock-usage", usage.clone())
                .header("x-mock-delay-ms", "20");
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        let status = t.await.unwrap();
        assert!(matches!(status, 200 | 403 | 429), "status {status}");
        served += (status == 200) as usize;
    }
    // Reservations in flight refuse with 429 while they run, so fewer may be served at once;
    // later requests fill the rest.
    for gw in [&a, &b].iter().cycle().take(40) {
        let resp = messages_request(gw, &key).body(body()).header("x-mock-usage", usage.clone()).send().await.unwrap();
        served += (resp.status() == 200) as usize;
    }
    assert_eq!(served, 10, "a budget of ten worst cases serves exactly ten, whichever gateway is asked");
    assert_eq!(mock.received().len(), 10);
    a.wait_for_records(1);
    let spent: u64 = [&a, &b]
        .iter()
        .flat_map(|g| g.records())
        .filter(|r| r["status"] == 200)
        .map(|r| r["cost_nanos"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(spent, 10 * worst, "the ledgers of both gateways hold the ten, at their worst case");
    // Settlements reach Redis in the background: the shared spend equals the ledgers' sum.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let held = prefix.scope("key", "a");
        if held.get("spent").map(String::as_str) == Some(&*(10 * worst).to_string()) {
            assert_eq!(held.get("res").map(String::as_str), Some("0"), "{held:?}");
            assert_eq!(held.get("inf").map(String::as_str), Some("0"), "{held:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Redis holds {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
