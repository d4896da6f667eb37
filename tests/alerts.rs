//! Spend alerts against the real gateway: a team budget spent under load crosses 80 % and
//! 100 % while the webhook receiver is down; once it is back, each alert arrives exactly once
//! at each webhook (JSON and Slack), and a restart sends nothing again.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL_ID: &str = "claude-sonnet-4-5-20250929";
/// Shipped prices of [`MODEL_ID`], nano-dollars per token: 1-hour cache writes, output.
const PROMPT_RATE: u64 = 6000;
const OUTPUT_RATE: u64 = 15_000;
const OVERHEAD: u64 = 1024;
const MAX_TOKENS: u64 = 100;

fn body() -> String {
    json!({"model": "m", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hello"}]}).to_string()
}

/// What admission reserves for [`body`], and what [`usage_at_worst_case`] costs: every request
/// spends exactly its reservation, so the budget is spent to the nano-dollar.
fn worst_case() -> u64 {
    (body().len() as u64 + OVERHEAD) * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE
}

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

/// A webhook receiver on loopback. While `down`, it takes each connection and drops it
/// unanswered, as a receiver that is restarting does.
struct Receiver {
    port: u16,
    down: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<(String, Value)>>>,
    refused: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(true));
        let received = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let (d, r, n) = (down.clone(), received.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                if d.load(Ordering::Acquire) {
                    n.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                    continue;
                }
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (path, body) = loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else { continue };
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            let path = text.split_whitespace().nth(1).unwrap().to_string();
                            break (path, serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap());
                        }
                    };
                    r.lock().unwrap().push((path, body));
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                });
            }
        });
        Receiver { port, down, received, refused }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn received(&self) -> Vec<(String, Value)> {
        self.received.lock().unwrap().clone()
    }
}

fn config(mock: &MockProvider, key: &TestKey, budget: u64) -> String {
    format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"mock\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\nteam = \"platform\"\n\
         [[team]]\nid = \"platform\"\nbudget = {{ usd = {usd}, period = \"monthly\" }}\n\
         [alerts]\nthresholds = [80, 100]\nprojected = false\ncheck_every = \"200ms\"\n\
         [[alerts.webhook]]\nurl = \"env:TG_HOOK_JSON\"\n\
         [[alerts.webhook]]\nurl = \"env:TG_HOOK_SLACK\"\nformat = \"slack\"\n",
        url = mock.url(),
        hash = key.hash,
        usd = budget as f64 / 1e9,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_is_one_webhook_even_across_an_outage_and_a_restart() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let receiver = Receiver::start().await;
    let budget = 20 * worst_case();
    let (json_url, slack_url) = (receiver.url("/json"), receiver.url("/slack"));
    let envs = [("TG_HOOK_JSON", json_url.as_str()), ("TG_HOOK_SLACK", slack_url.as_str())];
    let mut gw = start_gateway_admin("", &envs, &config(&mock, &key, budget));

    // Four clients spend the whole budget while the receiver is down.
    let usage = usage_at_worst_case();
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, key, usage, served) = (gw.url("/v1/messages"), key.key.clone(), usage.clone(), served.clone());
            tokio::spawn(async move {
                let http = client();
                loop {
                    let resp = http
                        .post(&url)
                        .header("x-api-key", &key)
                        .header("x-mock-usage", &usage)
                        .body(body())
                        .send()
                        .await
                        .unwrap();
                    match resp.status().as_u16() {
                        200 => served.fetch_add(1, Ordering::Relaxed),
                        // The rest of the budget is held by requests in flight: wait for them.
                        429 => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            0
                        }
                        403 => return,
                        other => panic!("{other}: {}", resp.text().await.unwrap()),
                    };
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(served.load(Ordering::Relaxed), 20, "the budget holds exactly 20 requests");
    // Both alerts are due; the gateway keeps trying the dead receiver.
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.refused.load(Ordering::Relaxed) < 6 {
        assert!(Instant::now() < deadline, "no delivery attempts while down\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(receiver.received().is_empty());

    receiver.down.store(false, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(70);
    while receiver.received().len() < 4 {
        assert!(Instant::now() < deadline, "got {:?}", receiver.received());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Longer than a few passes: nothing more comes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 4, "{got:?}");

    let mut json_alerts: Vec<&Value> = got.iter().filter(|(p, _)| p == "/json").map(|(_, v)| v).collect();
    json_alerts.sort_by_key(|v| v["threshold_percent"].as_u64());
    assert_eq!(json_alerts.len(), 2);
    let limit = format!("{}", budget as f64 / 1e9);
    for (doc, threshold) in json_alerts.iter().zip([80, 100]) {
        assert_eq!(doc["type"], "tollgate.spend_alert");
        assert_eq!(doc["alert"], format!("{threshold}%"));
        assert_eq!(doc["threshold_percent"], threshold);
        assert_eq!((&doc["scope"], &doc["id"]), (&json!("team"), &json!("platform")));
        assert_eq!(doc["limit_usd"], limit.as_str());
        assert_eq!(doc["period"], "monthly");
        assert!(doc["spent_percent"].as_f64().unwrap() >= f64::from(threshold), "{doc}");
    }
    // Seen after the whole budget was spent: at the 100 % mark the spend is the limit exactly.
    assert_eq!(json_alerts[1]["spent_usd"], limit.as_str());
    let slack: Vec<String> =
        got.iter().filter(|(p, _)| p == "/slack").map(|(_, v)| v["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(slack.len(), 2);
    for t in ["80%", "100%"] {
        let text =
            slack.iter().find(|s| s.contains(&format!("past the {t} alert"))).unwrap_or_else(|| panic!("{slack:?}"));
        assert!(text.starts_with("Tollgate: team platform has spent $"), "{text}");
        assert!(text.contains(&format!("of its ${limit} monthly budget")), "{text}");
    }
    let metrics = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_alert_webhooks_total{result=\"sent\"} 4"), "{metrics}");

    // A restart on the same store: the alerts of this period are already sent.
    assert!(gw.stop().success());
    let _again = respawn(&gw, &envs);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.received().len(), 4, "{:?}", receiver.received());
}

/// An alert claimed while every webhook was down, then the gateway stopped: the next start
/// sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_not_delivered_before_a_stop_is_sent_after_the_start() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let receiver = Receiver::start().await;
    let budget = 2 * worst_case();
    let (json_url, slack_url) = (receiver.url("/json"), receiver.url("/slack"));
    let envs = [("TG_HOOK_JSON", json_url.as_str()), ("TG_HOOK_SLACK", slack_url.as_str())];
    let mut gw = start_gateway_admin("", &envs, &config(&mock, &key, budget));
    let usage = usage_at_worst_case();
    let send = || messages_request(&gw, &key).header("x-mock-usage", &usage).body(body()).send();
    assert_eq!(send().await.unwrap().status(), 200);
    // 50 %: nothing yet. 100 %: both alerts (80 and 100) claimed, not delivered.
    assert_eq!(send().await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.refused.load(Ordering::Relaxed) < 4 {
        assert!(Instant::now() < deadline, "no delivery attempts\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.stop().success());
    receiver.down.store(false, Ordering::Release);
    let _again = respawn(&gw, &envs);
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.received().len() < 4 {
        assert!(Instant::now() < deadline, "got {:?}", receiver.received());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 4, "{got:?}");
    let mut alerts: Vec<String> =
        got.iter().filter(|(p, _)| p == "/json").map(|(_, v)| v["alert"].as_str().unwrap().to_string()).collect();
    alerts.sort();
    assert_eq!(alerts, ["100%", "80%"]);
}

/// Two gateways sharing a budget in Redis and alerts in PostgreSQL: both see each threshold
/// crossed, and the database lets exactly one of them send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_sends_each_alert_once() {
    let admin = tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/test", tokio_postgres::NoTls).await;
    let (admin, conn) =
        admin.expect("these tests need PostgreSQL at 127.0.0.1:5432 (user postgres, trust, database test)");
    tokio::spawn(conn);
    let name = format!("tg_{:016x}", rand::random::<u64>());
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    let db_url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let prefix = format!("tg-alerts-{:016x}", rand::random::<u64>());

    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let receiver = Receiver::start().await;
    receiver.down.store(false, Ordering::Release);
    let budget = 10 * worst_case();
    let cfg = format!(
        "[limits]\nbackend = \"redis\"\nurl = \"env:TG_TEST_REDIS_URL\"\nprefix = \"{prefix}\"\n{}",
        config(&mock, &key, budget)
    );
    let (json_url, slack_url) = (receiver.url("/json"), receiver.url("/slack"));
    let envs = [
        ("TG_HOOK_JSON", json_url.as_str()),
        ("TG_HOOK_SLACK", slack_url.as_str()),
        ("TG_TEST_PG_URL", db_url.as_str()),
        ("TG_TEST_REDIS_URL", "redis://127.0.0.1:6379/"),
    ];
    let store = "backend = \"postgres\"\nurl = \"env:TG_TEST_PG_URL\"\n";
    let (g1, g2) = (start_gateway_store(store, "", &envs, &cfg), start_gateway_store(store, "", &envs, &cfg));
    let usage = usage_at_worst_case();
    let mut served = 0;
    for i in 0.. {
        let gw = if i % 2 == 0 { &g1 } else { &g2 };
        let resp = messages_request(gw, &key).header("x-mock-usage", &usage).body(body()).send().await.unwrap();
        match resp.status().as_u16() {
            200 => served += 1,
            403 => break,
            // The other gateway's last request not settled yet: the budget is only held.
            429 => {
                let text = resp.text().await.unwrap();
                assert!(text.contains("held by requests in flight"), "{text}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other}: {}", resp.text().await.unwrap()),
        }
    }
    assert_eq!(served, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.received().len() < 4 {
        assert!(Instant::now() < deadline, "got {:?}\n{}\n{}", receiver.received(), g1.log(), g2.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several passes of both gateways later: still one each.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = receiver.received();
    let mut alerts: Vec<(String, String)> = got
        .iter()
        .map(|(p, v)| (p.clone(), v["alert"].as_str().map_or_else(|| v["text"].to_string(), str::to_string)))
        .collect();
    alerts.sort();
    assert_eq!(got.len(), 4, "{alerts:?}");
    assert_eq!(
        alerts.iter().filter(|(p, _)| p == "/json").map(|(_, a)| a.as_str()).collect::<Vec<_>>(),
        ["100%", "80%"]
    );
    drop((g1, g2));
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
}
