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
    config_with(mock_url, key, key_extra, prefix, "")
}

/// As [`config`], with `limits_extra` lines added to `[limits]` (`lease = "3s"`, say).
fn config_with(mock_url: &str, key: &TestKey, key_extra: &str, prefix: &Prefix, limits_extra: &str) -> String {
    format!(
        "[limits]\nbackend = \"redis\"\nurl = \"env:TG_TEST_REDIS_URL\"\nprefix = \"{prefix}\"\n{limits_extra}\n\
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

// ---------------------------------------------------------------------------------------------
// Helpers of the tests below.

/// What [`body`] reserves (its image may fill the whole window) and, with [`worst_usage`], costs.
const WORST: u64 = CONTEXT_WINDOW * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE;

/// Usage that costs exactly [`WORST`]: the whole window written to the 1-hour cache, every
/// allowed output token used.
fn worst_usage() -> String {
    json!({"input_tokens": 0, "output_tokens": MAX_TOKENS, "cache_creation_1h_input_tokens": CONTEXT_WINDOW})
        .to_string()
}

/// [`body`], streamed: its answer's head arrives at once, its end as slowly as
/// `x-mock-deltas` x `x-mock-delay-ms` say.
fn streamed_body() -> String {
    body().replacen('{', "{\"stream\":true,", 1)
}

/// A budget of `nanos` as the config writes it.
fn usd(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

impl Prefix {
    /// A scope's hash as the Redis at `url` holds it.
    fn scope_at(&self, url: &str, kind: &str, id: &str) -> std::collections::HashMap<String, String> {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("HGETALL").arg(format!("{{{}}}:s:{kind}:{id}", self.0)).query(&mut c).unwrap()
    }

    /// One field of a scope's hash as an integer (absent: 0).
    fn field_at(&self, url: &str, kind: &str, id: &str, field: &str) -> i64 {
        self.scope_at(url, kind, id).get(field).map_or(0, |v| v.parse::<f64>().unwrap() as i64)
    }

    /// The lease ids the Redis at `url` lists, with their expiry (Unix ms).
    fn leases_at(&self, url: &str) -> Vec<(String, i64)> {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("ZRANGE")
            .arg(format!("{{{}}}:leases", self.0))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut c)
            .unwrap()
    }
}

/// A gateway of the fleet on the Redis at `redis_url`, its log kept (see [`Gateway::log`]).
fn start_on(config: &str, redis_url: &str) -> Gateway {
    start_gateway_logged("", &[("TG_TEST_REDIS_URL", redis_url)], config)
}

/// The gateway's error message in an Anthropic error body (the body itself otherwise).
fn message(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.to_string())
}

/// Sends `body` with `key` and `headers`; the answer's status, headers and text.
async fn send(
    gw: &Gateway,
    key: &TestKey,
    body: String,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = messages_request(gw, key).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.text().await.unwrap_or_default())
}

/// The ledgers' total: every usage record of these gateways.
fn ledger(gws: &[&Gateway]) -> u64 {
    gws.iter().flat_map(|g| g.records()).map(|r| r["cost_nanos"].as_u64().unwrap_or(0)).sum()
}

/// Waits (up to `within`) until `done` holds, and returns how long it took.
async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

/// Nothing in these gateways' logs says a thread panicked.
fn no_panics(gws: &[&Gateway]) {
    for g in gws {
        let log = g.log();
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// The value of a counter on the gateway's /metrics page (0 when absent).
async fn metric(gw: &Gateway, series: &str) -> f64 {
    let text = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------

/// A team budget of six worst cases, spent by two keys of the team, each used on a gateway of
/// its own: exactly six requests are served fleet-wide, and Redis's team spend is the sum of the
/// two gateways' ledgers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_budget_is_shared_by_keys_on_different_gateways() {
    redis_up();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let (ka, kb) = (new_key(), new_key());
    let team = format!(
        "team = \"t\"\n[[key]]\nid = \"b\"\nhash = \"{}\"\nteam = \"t\"\n\
         [[team]]\nid = \"t\"\nbudget = {{ usd = {}, period = \"monthly\" }}\n",
        kb.hash,
        usd(6 * WORST)
    );
    let cfg = config(&mock.url(), &ka, &team, &prefix);
    let (a, b) = (start_on(&cfg, REDIS), start_on(&cfg, REDIS));
    let usage = worst_usage();
    let worst = [("x-mock-usage", usage.as_str())];

    // One each first: both keys, on both gateways, spend from the team.
    assert_eq!(send(&a, &ka, body(), &worst).await.0, 200);
    assert_eq!(send(&b, &kb, body(), &worst).await.0, 200);
    // Then a burst: key a on gateway a, key b on gateway b.
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let req = if i % 2 == 0 { messages_request(&a, &ka) } else { messages_request(&b, &kb) };
            let req = req.body(body()).header("x-mock-usage", usage.clone()).header("x-mock-header-delay-ms", "20");
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                (resp.status().as_u16(), message(&resp.text().await.unwrap()))
            })
        })
        .collect();
    let mut served = 2;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        match status {
            200 => served += 1,
            429 => assert!(
                text.contains("monthly budget of team \"t\"") && text.contains("held by requests in flight"),
                "{text}"
            ),
            403 => assert!(text.contains("monthly budget of team \"t\""), "{text}"),
            other => panic!("unexpected {other}: {text}"),
        }
    }
    // Refusals by reservations in flight leave room that later requests fill.
    for i in 0..20 {
        let (gw, key) = if i % 2 == 0 { (&a, &ka) } else { (&b, &kb) };
        served += (send(gw, key, body(), &worst).await.0 == 200) as usize;
    }
    assert_eq!(served, 6, "a team budget of six worst cases serves six, whichever key and gateway");
    assert_eq!(mock.received().len(), 6);

    // Redis's team spend is the sum of both ledgers (settlements arrive in the background).
    let books = || ledger(&[&a, &b]);
    eventually(Duration::from_secs(5), "both ledgers hold the six", || books() == 6 * WORST).await;
    let per_gateway: Vec<u64> = [&a, &b].iter().map(|g| ledger(&[g])).collect();
    assert!(per_gateway.iter().all(|&n| n >= WORST), "both gateways served: {per_gateway:?}");
    eventually(Duration::from_secs(5), "Redis's team spend equals the ledgers", || {
        prefix.field_at(REDIS, "team", "t", "spent") == books() as i64
    })
    .await;
    let t = prefix.scope("team", "t");
    assert_eq!((t["res"].as_str(), t["inf"].as_str()), ("0", "0"), "{t:?}");
    let (status, _, text) = send(&b, &kb, body(), &[]).await;
    assert_eq!(status, 403, "{text}");
    assert!(message(&text).contains("monthly budget of team \"t\"") && text.contains("is spent"), "{text}");
    no_panics(&[&a, &b]);
}

/// rpm = 30 on a key, a burst of 60 requests spread over two gateways: the full bucket serves
/// exactly 30 (the burst ends long before a 31st token drips in, one every 2 s); the other 30
/// get 429 with the `anthropic-ratelimit-requests-*` headers and retry-after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_wide_rpm_serves_exactly_the_limit_in_a_burst() {
    redis_up();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let cfg = config(&mock.url(), &key, "limits = { rpm = 30 }", &prefix);
    let (a, b) = (start_on(&cfg, REDIS), start_on(&cfg, REDIS));
    let small = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();

    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let req = messages_request(if i % 2 == 0 { &a } else { &b }, &key).body(small.clone());
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
                (i % 2, status, headers, resp.text().await.unwrap())
            })
        })
        .collect();
    let mut served = [0usize; 2];
    let mut refused = Vec::new();
    for t in tasks {
        let (gw, status, headers, text) = t.await.unwrap();
        match status {
            200 => served[gw] += 1,
            429 => refused.push((headers, text)),
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let burst = started.elapsed();
    println!("rpm burst: {burst:?}, served by gateway a/b: {served:?}");
    assert!(burst < Duration::from_millis(1900), "the burst took {burst:?}: a 31st token may have dripped in");
    assert_eq!(served[0] + served[1], 30, "served {served:?}");
    assert_eq!(refused.len(), 30);
    assert_eq!(mock.received().len(), 30);
    for (headers, text) in &refused {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!((&v["type"], &v["error"]["type"]), (&json!("error"), &json!("rate_limit_error")), "{text}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.starts_with("rate limit of key \"a\": 30 requests per minute; retry in "), "{m}");
        assert_eq!(headers["anthropic-ratelimit-requests-limit"], "30");
        assert_eq!(headers["anthropic-ratelimit-requests-remaining"], "0");
        assert!(headers.contains_key("anthropic-ratelimit-requests-reset"), "{headers:?}");
        // One request comes back every 2 s; the header rounds up to whole seconds.
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "retry-after {retry}");
    }
    let level: f64 = prefix.scope("key", "a")["rq"].parse().unwrap();
    assert!(level < 1.0, "the shared bucket is empty: {level}");
    no_panics(&[&a, &b]);
}

/// Concurrency = 2 on a key used through two gateways, with answers that take a while: the
/// provider never has more than two of its requests at once (counted by a proxy in front of
/// it), the others get 429, and once all are done Redis counts none in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_wide_concurrency_never_exceeds_the_limit() {
    redis_up();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let proxy = InFlightProxy::start(&mock.url()).await;
    let key = new_key();
    let cfg = config(&proxy.url(), &key, "limits = { concurrency = 2 }", &prefix);
    let (a, b) = (start_on(&cfg, REDIS), start_on(&cfg, REDIS));

    // A wave of ten at once, each answer 1 s away: two are served, eight refused.
    let wave: Vec<_> = (0..10)
        .map(|i| {
            let req = messages_request(if i % 2 == 0 { &a } else { &b }, &key)
                .body(body())
                .header("x-mock-header-delay-ms", "1000");
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
                (status, headers, message(&resp.text().await.unwrap()))
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in wave {
        let (status, headers, text) = t.await.unwrap();
        if status == 429 {
            assert!(text.contains("concurrency limit of key \"a\": 2 requests at a time"), "{text}");
            assert_eq!(headers["anthropic-ratelimit-concurrency-limit"], "2");
            assert_eq!(headers["anthropic-ratelimit-concurrency-remaining"], "0");
            assert_eq!(headers["retry-after"], "1");
        }
        statuses.push(status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429, 429, 429, 429, 429]);

    // Then eight clients hammer both gateways for 2.5 s with answers 200 ms long.
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let url = if i % 2 == 0 { a.url("/v1/messages") } else { b.url("/v1/messages") };
            let key = key.key.clone();
            tokio::spawn(async move {
                let c = client();
                let (mut ok, mut refused) = (0usize, 0usize);
                while std::time::Instant::now() < until {
                    let resp = c
                        .post(&url)
                        .header("x-api-key", &key)
                        .header("x-mock-header-delay-ms", "200")
                        .body(body())
                        .send()
                        .await
                        .unwrap();
                    match resp.status().as_u16() {
                        200 => ok += 1,
                        429 => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for c in clients {
        let (o, r) = c.await.unwrap();
        ok += o;
        refused += r;
    }
    println!(
        "concurrency: hammer phase served {ok}, refused {refused}; provider saw {} requests, at most {} at once",
        proxy.total(),
        proxy.max_in_flight()
    );
    assert_eq!(proxy.max_in_flight(), 2, "never more than two at the provider, and two reached");
    assert_eq!(proxy.total(), 2 + ok);
    assert!(ok >= 10, "the slots were used: {ok}");
    assert!(refused > 0);
    eventually(Duration::from_secs(5), "Redis counts none in flight", || {
        prefix.field_at(REDIS, "key", "a", "inf") == 0 && prefix.leases_at(REDIS).is_empty()
    })
    .await;
    no_panics(&[&a, &b]);
}

/// A gateway killed with kill -9 while two of its requests hold most of a budget: the other
/// gateway's requests are refused (429, reserved) until the dead one's leases (3 s) expire,
/// then admitted; Redis's reservations come back to what the survivor holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_reservations_come_back_after_the_lease() {
    redis_up();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // Two worst cases in flight leave less than a third.
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", usd(5 * WORST / 2));
    let cfg = config_with(&mock.url(), &key, &key_extra, &prefix, "lease = \"3s\"");
    let (victim, survivor) = (start_on(&cfg, REDIS), start_on(&cfg, REDIS));

    // Two requests whose answers never come in time hold two worst cases on the victim.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let req = messages_request(&victim, &key).body(body()).header("x-mock-header-delay-ms", "60000");
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    eventually(Duration::from_secs(5), "both are reserved and at the provider", || {
        prefix.field_at(REDIS, "key", "a", "res") == 2 * WORST as i64 && mock.received().len() == 2
    })
    .await;
    let (status, _, text) = send(&survivor, &key, body(), &[]).await;
    assert_eq!(status, 429, "{text}");
    assert!(message(&text).contains("is held by requests in flight"), "{text}");

    // Let the victim renew its leases (every second) before it dies.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    victim.signal("KILL");
    let killed = std::time::Instant::now();
    let killed_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    for h in held {
        assert!(h.await.unwrap().is_err(), "the victim's clients lost their connections");
    }
    // The victim is gone, so its leases' expiry (Redis's clock, this machine's) is final: when
    // its reservations are due back, however late its last renewal came.
    let expires_ms = prefix.leases_at(REDIS).iter().map(|(_, at)| *at).max().expect("the victim's leases");
    let due = Duration::from_millis(u64::try_from(expires_ms - killed_ms).expect("a lease live at the kill"));
    assert!(due <= Duration::from_millis(3100), "a lease of 3 s ends {due:?} after the kill");
    // The survivor asks again and again; each refusal says why.
    let streamed = [("x-mock-deltas", "10"), ("x-mock-delay-ms", "150")];
    let (mut refusals, mut last_refusal) = (0, Duration::ZERO);
    let resp = loop {
        let mut req = messages_request(&survivor, &key).body(streamed_body());
        for (k, v) in streamed {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        if resp.status() == 200 {
            break resp;
        }
        let (status, text) = (resp.status().as_u16(), resp.text().await.unwrap());
        assert_eq!(status, 429, "{text}");
        assert!(message(&text).contains("is held by requests in flight"), "{text}");
        refusals += 1;
        last_refusal = killed.elapsed();
        assert!(killed.elapsed() < Duration::from_secs(8), "the dead gateway's reservations never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recovery = killed.elapsed();
    println!(
        "kill -9: {refusals} refusals, the last at {last_refusal:?}; leases due back {due:?} after the kill, \
         admitted again {recovery:?} after it"
    );
    // Not before the leases end (the milliseconds of the two clocks' readings aside), and soon
    // after: the survivor asks every 50 ms or so.
    assert!(recovery + Duration::from_millis(50) >= due, "admitted after {recovery:?}: before the leases ended");
    assert!(recovery <= due + Duration::from_millis(1000), "admitted only after {recovery:?}");
    assert!(refusals > 0);
    // Redis now holds what the survivor holds: one worst case, one request in flight.
    let s = prefix.scope("key", "a");
    assert_eq!(s["res"], WORST.to_string(), "{s:?}");
    assert_eq!(s["inf"], "1", "{s:?}");
    assert_eq!(prefix.leases_at(REDIS).len(), 1);
    let id = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let text = resp.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    let spent = survivor.record(&id)["cost_nanos"].as_u64().unwrap();
    assert!(spent > 0);
    assert_eq!(ledger(&[&survivor]), spent, "the refusals cost nothing");
    eventually(Duration::from_secs(5), "the survivor's request settles", || {
        let s = prefix.scope("key", "a");
        s["res"] == "0" && s["inf"] == "0" && s["spent"] == spent.to_string()
    })
    .await;
    assert!(prefix.leases_at(REDIS).is_empty());
    no_panics(&[&victim, &survivor]);
}

/// A gateway on a private Redis that is stopped: budgeted requests get a 503 in the Anthropic
/// error shape within about `timeout`, requests of a key without budget or limits are served,
/// nothing panics. Redis restarted (empty) on the same port: the gateway reconnects by itself,
/// refuses the first admissions with 503 `limits_reseed` while it seeds the budget again from
/// its ledger, and then grants only what was left before the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_refuses_budgeted_requests_and_recovers_from_the_ledger() {
    let mut private = RedisServer::start();
    let url = private.url();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let (key, free) = (new_key(), new_key());
    let key_extra = format!(
        "budget = {{ usd = {}, period = \"daily\" }}\n[[key]]\nid = \"free\"\nhash = \"{}\"\n",
        usd(3 * WORST),
        free.hash
    );
    let cfg = config_with(&mock.url(), &key, &key_extra, &prefix, "timeout = \"300ms\"");
    let gw = start_on(&cfg, &url);
    let usage = worst_usage();
    let worst = [("x-mock-usage", usage.as_str())];

    // Two of three worst cases spent before the outage.
    for _ in 0..2 {
        assert_eq!(send(&gw, &key, body(), &worst).await.0, 200);
    }
    eventually(Duration::from_secs(5), "Redis holds the spend", || {
        prefix.field_at(&url, "key", "a", "spent") == 2 * WORST as i64
    })
    .await;
    gw.wait_for_records(2);
    tokio::time::sleep(Duration::from_millis(200)).await; // the ledger's flush interval is 50 ms

    private.stop();
    let mut latencies = Vec::new();
    for _ in 0..6 {
        let asked = std::time::Instant::now();
        let (status, headers, text) = send(&gw, &key, body(), &worst).await;
        latencies.push(asked.elapsed());
        assert_eq!(status, 503, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!((&v["type"], &v["error"]["type"]), (&json!("error"), &json!("api_error")), "{text}");
        assert_eq!(v["error"]["message"], "the gateway's shared limiter (Redis) is unavailable; retry shortly");
        assert_eq!(headers["retry-after"], "1");
        // A key without budget or limits does not need Redis.
        assert_eq!(send(&gw, &free, body(), &[]).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("Redis down: budgeted requests refused in {latencies:?} (timeout 300 ms)");
    for l in &latencies {
        assert!(*l < Duration::from_millis(800), "a refusal took {l:?}: longer than about the timeout");
    }
    assert_eq!(metric(&gw, "tollgate_refused_total{reason=\"limits_unavailable\"}").await, 6.0);

    // Redis comes back empty on the same port; the gateway is not restarted.
    private.restart();
    let restarted = std::time::Instant::now();
    let mut seen = Vec::new();
    let mut reconnected = None;
    loop {
        let (status, headers, text) = send(&gw, &key, body(), &worst).await;
        let m = message(&text);
        if status == 503 {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!((&v["type"], &v["error"]["type"]), (&json!("error"), &json!("api_error")), "{text}");
            assert!(headers.contains_key("retry-after"), "{headers:?}");
        }
        let reason = match status {
            200 => "ok",
            503 if m.contains("unavailable") => "unavailable",
            503 if m.contains("lost its counters") => "reseed",
            _ => panic!("unexpected {status}: {text}"),
        };
        if reason != "unavailable" && reconnected.is_none() {
            reconnected = Some(restarted.elapsed());
        }
        if seen.last().map(|(r, _)| *r) != Some(reason) {
            seen.push((reason, restarted.elapsed()));
        }
        if status == 200 {
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(15), "no recovery: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = restarted.elapsed();
    println!("Redis back: reconnected after {reconnected:?}, admitting after {recovered:?}; answers {seen:?}");
    assert!(seen.iter().any(|(r, _)| *r == "reseed"), "the first admissions are refused while reseeding: {seen:?}");
    assert!(metric(&gw, "tollgate_refused_total{reason=\"limits_reseed\"}").await >= 1.0);
    // The spend before the outage still counts: the one worst case left was granted, and no more.
    eventually(Duration::from_secs(5), "the third settles", || {
        prefix.field_at(&url, "key", "a", "spent") == 3 * WORST as i64
    })
    .await;
    let (status, _, text) = send(&gw, &key, body(), &worst).await;
    assert_eq!(status, 403, "{text}");
    assert!(message(&text).contains("is spent"), "{text}");
    assert_eq!(mock.received().len(), 3 + 6, "three budgeted requests and the six free ones");
    let budgeted =
        || gw.records().iter().filter(|r| r["key_id"] == "a").map(|r| r["cost_nanos"].as_u64().unwrap()).sum::<u64>();
    eventually(Duration::from_secs(5), "the ledger agrees: three worst cases", || budgeted() == 3 * WORST).await;
    no_panics(&[&gw]);
}

/// Redis frozen twice (SIGSTOP: connections open, nothing answered) under two gateways that
/// count on their share while it is away (`on_unavailable = "local"`), with a key whose budget
/// holds 20 worst cases.
/// - Before: 3 spent (gateway A saw 2 in Redis, B saw 3).
/// - First freeze: A may spend (20 - 2) / 2 = 9, B (20 - 3) / 2 = 8; each spends 3; a key's
///   rpm of 10 gives each gateway 5. Thawed: both return to Redis once their spend is in it (9).
/// - One admission on each (11 spent; A saw 10, B 11).
/// - Second freeze: A's share is (20 - 10) / 2 = 5, B's (20 - 11) / 2 = 4: no fresh share for
///   what the first outage spent. The fleet spends exactly its budget, and Redis holds it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_leaves_each_gateway_its_share_and_gets_the_spend_back() {
    let private = RedisServer::start();
    let url = private.url();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let (key, limited) = (new_key(), new_key());
    let key_extra = format!(
        "budget = {{ usd = {}, period = \"daily\" }}\n[[key]]\nid = \"r\"\nhash = \"{}\"\nlimits = {{ rpm = 10 }}\n",
        usd(20 * WORST),
        limited.hash
    );
    let limits = "timeout = \"300ms\"\nlease = \"3s\"\non_unavailable = \"local\"";
    let cfg = config_with(&mock.url(), &key, &key_extra, &prefix, limits);
    let (a, b) = (start_on(&cfg, &url), start_on(&cfg, &url));
    let usage = worst_usage();
    let worst = [("x-mock-usage", usage.as_str())];
    let small = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let spent = || prefix.field_at(&url, "key", "a", "spent");
    let admit_in_redis = |gw: &'static str, total: i64| {
        let (gw, key, worst) = (if gw == "a" { &a } else { &b }, &key, &worst);
        let spent = &spent;
        async move {
            assert_eq!(send(gw, key, body(), worst).await.0, 200);
            eventually(Duration::from_secs(5), "Redis holds the spend", || spent() == total * WORST as i64).await;
        }
    };
    // Sends `n` budgeted requests through `gw` while Redis is frozen: how many were served.
    let spend_locally = |gw: &'static str, n: usize| {
        let (gw, key, worst) = (if gw == "a" { &a } else { &b }, &key, &worst);
        async move {
            let mut ok = 0;
            for i in 0..n {
                let asked = std::time::Instant::now();
                let (status, headers, text) = send(gw, key, body(), worst).await;
                match status {
                    200 => ok += 1,
                    503 => {
                        assert!(message(&text).contains("this gateway's share of the budget is used"), "{text}");
                        assert_eq!(headers["retry-after"], "5");
                    }
                    _ => panic!("request {i}: {status} {text}"),
                }
                if i > 0 {
                    assert!(asked.elapsed() < Duration::from_millis(250), "counted locally, no wait for Redis");
                }
            }
            ok
        }
    };
    let back_on_redis = |gw: &'static str| {
        let gw = if gw == "a" { &a } else { &b };
        async move {
            for _ in 0..100 {
                if metric(gw, "tollgate_limits_local_fallback").await == 0.0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the gateway still counts locally 5 s after Redis answers");
        }
    };

    admit_in_redis("a", 1).await;
    admit_in_redis("a", 2).await;
    admit_in_redis("b", 3).await;
    // Both gateways know the fleet is two (a heartbeat every lease / 3 = 1 s).
    let nodes = || -> i64 {
        let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        redis::cmd("ZCARD").arg(format!("{{{}}}:nodes", prefix.0)).query(&mut c).unwrap()
    };
    eventually(Duration::from_secs(5), "two heartbeats", || nodes() == 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // First outage.
    private.freeze();
    assert_eq!((spend_locally("a", 3).await, spend_locally("b", 3).await), (3, 3));
    let mut rpm = Vec::new();
    for gw in [&a, &b] {
        let mut served = 0;
        for _ in 0..8 {
            let (status, _, text) = send(gw, &limited, small.clone(), &[]).await;
            assert!(status == 200 || status == 429, "{status} {text}");
            served += usize::from(status == 200);
        }
        rpm.push(served);
        assert_eq!(metric(gw, "tollgate_limits_local_fallback").await, 1.0);
    }
    assert_eq!(rpm, [5, 5], "rpm 10 / 2 gateways");
    private.thaw();
    let thawed = std::time::Instant::now();
    back_on_redis("a").await;
    back_on_redis("b").await;
    println!("first thaw: both gateways back on Redis {:?} after", thawed.elapsed());
    assert_eq!(spent(), 9 * WORST as i64, "the outage's spend is in Redis before the gateways return to it");

    admit_in_redis("a", 10).await;
    admit_in_redis("b", 11).await;

    // Second outage.
    private.freeze();
    let served = (spend_locally("a", 8).await, spend_locally("b", 8).await);
    println!("second freeze: A served {}, B {}", served.0, served.1);
    assert_eq!(served, (5, 4), "A: (20 - 10) / 2, B: (20 - 11) / 2");
    assert_eq!(metric(&a, "tollgate_refused_total{reason=\"budget_share\"}").await, 3.0);
    private.thaw();
    back_on_redis("a").await;
    back_on_redis("b").await;
    assert_eq!(spent(), 20 * WORST as i64, "Redis holds the fleet's whole spend: the budget, exactly");
    eventually(Duration::from_secs(5), "nothing reserved or in flight", || {
        prefix.field_at(&url, "key", "a", "res") == 0 && prefix.field_at(&url, "key", "a", "inf") == 0
    })
    .await;
    // The budget is spent fleet-wide: refused on either gateway, as spent.
    for gw in [&a, &b] {
        let (status, _, text) = send(gw, &key, body(), &worst).await;
        assert_eq!(status, 403, "{text}");
    }
    let budgeted = || {
        [&a, &b]
            .iter()
            .flat_map(|g| g.records())
            .filter(|r| r["key_id"] == "a")
            .map(|r| r["cost_nanos"].as_u64().unwrap())
            .sum::<u64>()
    };
    eventually(Duration::from_secs(5), "the ledgers agree: twenty worst cases", || budgeted() == 20 * WORST).await;

    // A Redis that answers with an error (here out of memory) is no outage: no share is handed
    // out, the request is refused.
    let mut c = private.connection();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut c).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").query(&mut c).unwrap();
    let (status, _, text) = send(&a, &limited, small.clone(), &[]).await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(message(&text), "the gateway's shared limiter (Redis) is unavailable; retry shortly");
    assert_eq!(metric(&a, "tollgate_limits_local_fallback").await, 0.0);
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query(&mut c).unwrap();
    assert_eq!(send(&a, &limited, small.clone(), &[]).await.0, 200);
    no_panics(&[&a, &b]);
}

/// Two gateways on a Redis Cluster of three primaries, each told of a node that does *not* own
/// the limiter's slot (a client that ignored the cluster would get MOVED on every call): a key
/// budget of ten worst cases, 60 concurrent requests over both gateways, exactly ten served, and
/// the spend held by the node that owns the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shares_one_budget_exactly() {
    let cluster = RedisCluster::start();
    let prefix = Prefix::new();
    let owner = cluster.owner(&format!("{{{}}}", prefix.0));
    let others: Vec<u16> = cluster.ports.iter().copied().filter(|p| *p != owner).collect();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", usd(10 * WORST));
    let cfg = config_with(&mock.url(), &key, &key_extra, &prefix, "cluster = true");
    let (a, b) = (
        start_on(&cfg, &format!("redis://127.0.0.1:{}/", others[0])),
        start_on(&cfg, &format!("redis://127.0.0.1:{}/,redis://127.0.0.1:{}/", others[1], others[0])),
    );
    let usage = worst_usage();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let req = messages_request(if i % 2 == 0 { &a } else { &b }, &key)
                .header("x-mock-usage", usage.clone())
                .body(body());
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(served, 10, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 403 || *s == 429), "{statuses:?}");
    let mut on_owner = cluster.node(owner);
    let spent = || -> i64 {
        let h: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg(format!("{{{}}}:s:key:a", prefix.0)).query(&mut cluster.node(owner)).unwrap();
        h.get("spent").map_or(0, |v| v.parse().unwrap())
    };
    eventually(Duration::from_secs(5), "the owner holds the spend", || spent() == 10 * WORST as i64).await;
    let exists: i64 = redis::cmd("EXISTS").arg(format!("{{{}}}:epoch", prefix.0)).query(&mut on_owner).unwrap();
    assert_eq!(exists, 1);
    eventually(Duration::from_secs(5), "the ledgers agree", || ledger(&[&a, &b]) == 10 * WORST).await;
    no_panics(&[&a, &b]);
}

/// Redis over TLS with a password (`rediss://:password@localhost:PORT/`), its certificate signed
/// by a private CA given as `limits.ca_file`: budgets are counted there exactly; `tollgate check`
/// connects; with a wrong password or without the CA it fails (as a gateway's start would, on
/// the same first connection), saying why and never showing the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_password_and_a_private_ca() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key_pem) = ca.leaf(&["localhost"]);
    let (ca_file, cert_file, key_file) =
        (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&ca_file, &ca.pem).unwrap();
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key_pem).unwrap();
    let port = free_port();
    let password = "tls-redis-secret-7c1e";
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-auth-clients", "no", "--requirepass", password])
        .arg("--tls-cert-file")
        .arg(&cert_file)
        .arg("--tls-key-file")
        .arg(&key_file)
        .arg("--tls-ca-cert-file")
        .arg(&ca_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "redis-server with TLS did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", usd(3 * WORST));
    let limits = format!("ca_file = \"{}\"", ca_file.display());
    let cfg = config_with(&mock.url(), &key, &key_extra, &prefix, &limits);
    let url = format!("rediss://:{password}@localhost:{port}/");
    let gw = start_on(&cfg, &url);
    let usage = worst_usage();
    let worst = [("x-mock-usage", usage.as_str())];
    let mut statuses = Vec::new();
    while statuses.len() < 5 {
        let (status, _, text) = send(&gw, &key, body(), &worst).await;
        // A reservation settles in Redis after the answer is sent: until it has, the next
        // request is told the budget is held by requests in flight. Ask again.
        if status == 429 && text.contains("held by requests in flight") {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 403, 403], "three worst cases fit the budget");

    // `tollgate check` over TLS, the gateway's own config.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", gw.config_path.to_str().unwrap()])
        .env("TG_TEST_REDIS_URL", &url)
        .env("TG_TEST_PROVIDER_KEY", "x")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("limits: Redis at rediss://…@localhost:"), "{text}");
    assert!(!text.contains(password), "{text}");

    // A wrong password, or no CA: the gateway does not start, and says why.
    for (url, limits, why) in [
        (format!("rediss://:wrong@localhost:{port}/"), limits.clone(), "Password authentication failed"),
        (url.clone(), String::new(), "UnknownIssuer"),
    ] {
        let cfg = config_with(&mock.url(), &key, &key_extra, &prefix, &limits);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check", &write_config(&dir, &cfg)])
            .env("TG_TEST_REDIS_URL", &url)
            .env("TG_TEST_PROVIDER_KEY", "x")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{text}");
        assert!(text.contains(why), "{why}: {text}");
        assert!(!text.contains(password) && !text.contains(":wrong@"), "{text}");
    }
    no_panics(&[&gw]);
    let _ = server.kill();
    let _ = server.wait();
}

/// `config` with a listener, in a file of `dir`: its path.
fn write_config(dir: &tempfile::TempDir, config: &str) -> String {
    let path = dir.path().join(format!("t{:x}.toml", rand::random::<u32>()));
    std::fs::write(&path, format!("[[listener]]\naddress = \"127.0.0.1:{}\"\n{config}", free_port())).unwrap();
    path.to_str().unwrap().to_string()
}

/// A request longer than the lease keeps its reservation: renewed, it still refuses a request
/// that would need the rest of the budget at 5 s (lease 3 s), and settles correctly at its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_keeps_its_reservation_past_the_lease() {
    redis_up();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", usd(3 * WORST / 2));
    let cfg = config_with(&mock.url(), &key, &key_extra, &prefix, "lease = \"3s\"");
    let (a, b) = (start_on(&cfg, REDIS), start_on(&cfg, REDIS));

    // About 8 s of stream; default usage, far below the reservation.
    let resp = messages_request(&a, &key)
        .body(streamed_body())
        .header("x-mock-deltas", "8")
        .header("x-mock-delay-ms", "800")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let admitted = std::time::Instant::now();
    let long = tokio::spawn(async move { resp.text().await.unwrap() });

    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, _, text) = send(&b, &key, body(), &[]).await;
    assert_eq!(status, 429, "at {:?}: {text}", admitted.elapsed());
    assert!(message(&text).contains("is held by requests in flight"), "{text}");
    assert_eq!(prefix.field_at(REDIS, "key", "a", "res"), WORST as i64);
    let leases = prefix.leases_at(REDIS);
    let now = tollgate::limits::now_ms();
    assert_eq!(leases.len(), 1);
    assert!(leases[0].1 > now + 1000, "renewed: it expires {} ms from now", leases[0].1 - now);

    let text = long.await.unwrap();
    let took = admitted.elapsed();
    println!("long request: {took:?} with a 3 s lease");
    assert!(took > Duration::from_secs(7), "{took:?}");
    assert!(text.contains("event: message_stop"), "{text}");
    a.wait_for_records(1);
    let cost = ledger(&[&a]);
    assert!(cost > 0 && cost < WORST / 2);
    eventually(Duration::from_secs(5), "the long request settles", || {
        let s = prefix.scope("key", "a");
        s["res"] == "0" && s["inf"] == "0" && s["spent"] == cost.to_string()
    })
    .await;
    // What it did not use is free again.
    assert_eq!(send(&b, &key, body(), &[]).await.0, 200);
    no_panics(&[&a, &b]);
}

/// Redis stalls for 2 s (CLIENT PAUSE on a private instance, which keeps its data) while four
/// requests are in flight: they complete, a request arriving meanwhile gets 503 within the
/// timeout, and when Redis answers again the settlements arrive: Redis's spend equals the
/// ledgers' and nothing is left reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_arrive_after_a_brief_redis_stall() {
    let private = RedisServer::start();
    let url = private.url();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", usd(100 * WORST));
    let cfg = config(&mock.url(), &key, &key_extra, &prefix);
    let (a, b) = (start_on(&cfg, &url), start_on(&cfg, &url));

    let mut streams = Vec::new();
    for i in 0..4 {
        let resp = messages_request(if i % 2 == 0 { &a } else { &b }, &key)
            .body(streamed_body())
            .header("x-mock-usage", worst_usage())
            .header("x-mock-deltas", "2")
            .header("x-mock-delay-ms", "100")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(tokio::spawn(async move { resp.text().await.unwrap() }));
    }
    assert_eq!(prefix.field_at(&url, "key", "a", "res"), 4 * WORST as i64);
    let mut c = private.connection();
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(2000).arg("ALL").query(&mut c).unwrap();
    let paused = std::time::Instant::now();

    // A new admission meanwhile gets no answer in time.
    let (status, _, text) = send(&a, &key, body(), &[]).await;
    let refused_in = paused.elapsed();
    assert_eq!(status, 503, "{text}");
    assert!(message(&text).contains("unavailable"), "{text}");
    assert!(refused_in < Duration::from_millis(800), "{refused_in:?}");
    for s in streams {
        assert!(s.await.unwrap().contains("event: message_stop"));
    }
    let done = paused.elapsed();
    assert!(done < Duration::from_millis(2000), "the streams ended while Redis was stalled ({done:?})");

    a.wait_for_records(3);
    b.wait_for_records(2);
    let books = ledger(&[&a, &b]);
    assert_eq!(books, 4 * WORST);
    eventually(Duration::from_secs(15), "the settlements arrive", || {
        let s = prefix.scope_at(&url, "key", "a");
        s.get("res").map(String::as_str) == Some("0")
            && s.get("spent").map(|v| v.parse::<u64>().unwrap()) >= Some(books)
    })
    .await;
    let settled = paused.elapsed();
    // Settlements retried meanwhile must not be counted twice: give late ones time to land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = prefix.scope_at(&url, "key", "a");
    println!("stall: streams done {done:?} and settled {settled:?} after the pause began; Redis holds {s:?}, the ledgers {books}");
    let retried =
        [&a, &b].iter().map(|g| g.log().matches("did not take a settlement; retrying").count()).sum::<usize>();
    println!("stall: settlement attempts that got no answer and were sent again: {retried}");
    assert_eq!(
        s["spent"],
        books.to_string(),
        "Redis's spend equals the ledgers' (4 worst cases = {books}); {retried} settlements were retried: {s:?}"
    );
    assert_eq!((s["res"].as_str(), s["inf"].as_str()), ("0", "0"), "{s:?}");
    assert!(prefix.leases_at(&url).is_empty());
    no_panics(&[&a, &b]);
}

/// Not a check: what a budgeted request costs in time with Redis on loopback (one admission
/// round trip; the settlement is off the path), next to a key that needs no round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_latency_on_loopback() {
    redis_up();
    let prefix = Prefix::new();
    let mock = MockProvider::start(Behavior { record: false, ..Behavior::default() }).await.unwrap();
    let (key, free) = (new_key(), new_key());
    let key_extra =
        format!("budget = {{ usd = 1000000, period = \"daily\" }}\n[[key]]\nid = \"free\"\nhash = \"{}\"\n", free.hash);
    let gw = start_on(&config(&mock.url(), &key, &key_extra, &prefix), REDIS);
    let small = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let c = client();
    let run = |k: &TestKey| {
        let (c, url, k, small) = (c.clone(), gw.url("/v1/messages"), k.key.clone(), small.clone());
        async move {
            let mut times = Vec::with_capacity(500);
            for i in 0..550 {
                let t = std::time::Instant::now();
                let resp = c.post(&url).header("x-api-key", &k).body(small.clone()).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let _ = resp.bytes().await.unwrap();
                if i >= 50 {
                    times.push(t.elapsed());
                }
            }
            times
        }
    };
    let budgeted = run(&key).await;
    let unbudgeted = run(&free).await;
    // Settled requests leave nothing behind in Redis: their leases are deleted (a settlement
    // retried after a lost answer finds none and books nothing twice).
    let mut c = redis::Client::open(REDIS).unwrap().get_connection().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{{{}}}:*", prefix.0)).query(&mut c).unwrap();
        let leases = keys.iter().filter(|k| k.contains("}:l:")).count();
        if leases == 0 {
            // The epoch mark and the key's scope; the lease set is gone once empty.
            assert!(keys.len() <= 3, "keys left after 550 settled requests: {keys:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{leases} leases left after settlement");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (p50, p99) = (percentile(&budgeted, 50.0), percentile(&budgeted, 99.0));
    let (f50, f99) = (percentile(&unbudgeted, 50.0), percentile(&unbudgeted, 99.0));
    println!(
        "request latency over 500 sequential requests: budgeted (Redis admission) p50 {p50:?} p99 {p99:?}; \
         no budget (no round trip) p50 {f50:?} p99 {f99:?}; admission adds about {:?} at p50",
        p50.saturating_sub(f50)
    );
}
