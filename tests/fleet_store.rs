//! Fleet mode's ledger and key store on PostgreSQL (`[store] backend = "postgres"`): gateways
//! sharing one database, keys changed on one applied on the others, a database out of reach
//! (the spool), `tollgate migrate` and `tollgate check`, and reports at scale.
//!
//! PostgreSQL runs at 127.0.0.1:5432 with trust authentication (user `postgres`, database
//! `test`), as on CI machines. Each test creates a database of its own, `tg_<random>`, and drops
//! it at the end.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio_postgres::NoTls;

const TOKEN: &str = "fleet-store-admin-token-3f9a";
const TOKEN_ENV: &str = "TG_TEST_ADMIN_TOKEN";
const PG_ENV: &str = "TG_TEST_PG_URL";
const PG_PORT: u16 = 5432;
/// The shipped price row of this id: $3 per million input tokens, $15 per million output.
const MODEL_ID: &str = "claude-sonnet-4-5-20250929";

// ---------------------------------------------------------------------------------------------
// A database of the test's own.

fn pg_url(database: &str, port: u16) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{database}")
}

async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "these tests need PostgreSQL at 127.0.0.1:{PG_PORT} (user postgres, trust authentication, \
             database test), as CI machines run it; connecting to {url} failed: {e}"
        )
    });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// `tg_<random>`, created on the server through database `test`, dropped (connections and all)
/// when this is dropped.
struct Db {
    name: String,
    client: tokio_postgres::Client,
}

impl Db {
    async fn create() -> Db {
        let admin = pg_connect(&pg_url("test", PG_PORT)).await;
        let name = format!("tg_{:016x}", rand::random::<u64>());
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let client = pg_connect(&pg_url(&name, PG_PORT)).await;
        Db { name, client }
    }

    fn url(&self) -> String {
        pg_url(&self.name, PG_PORT)
    }

    /// The URL of this database through a proxy listening on `port`.
    fn url_via(&self, port: u16) -> String {
        pg_url(&self.name, port)
    }

    /// Rows in the ledger and the sum of their costs.
    async fn totals(&self) -> (i64, i64) {
        let row = self
            .client
            .query_one("SELECT COUNT(*)::BIGINT, COALESCE(SUM(cost_nanos), 0)::BIGINT FROM tollgate_ledger", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Every ledger row's request id and cost, in the order the rows were inserted (the heap's:
    /// the table is only ever inserted into).
    async fn ledger_in_order(&self) -> Vec<(String, u64)> {
        self.client
            .query("SELECT request_id, cost_nanos FROM tollgate_ledger ORDER BY ctid", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect()
    }

    async fn ledger(&self) -> BTreeMap<String, u64> {
        self.ledger_in_order().await.into_iter().collect()
    }

    /// Waits (up to `within`) until the ledger holds `n` rows.
    async fn wait_rows(&self, n: i64, within: Duration) {
        let start = Instant::now();
        loop {
            let (count, _) = self.totals().await;
            if count == n {
                return;
            }
            assert!(start.elapsed() < within, "the ledger holds {count} rows, not {n}, after {within:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own thread and runtime: this may run on one of the test's runtime threads.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&pg_url("test", PG_PORT), NoTls).await {
                    tokio::spawn(conn);
                    let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------
// Gateways on it.

/// Provider `mock`, model `m` (priced by the shipped table), and key `a` of user `alice`, team
/// `t1`.
fn config(mock_url: &str, key: &TestKey) -> String {
    format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{mock_url}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\", failures = 1000 }}\n\
         [[model]]\nname = \"m\"\nmax_attempts = 1\ndeployments = [{{ provider = \"mock\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{}\"\nuser = \"alice\"\nteam = \"t1\"\n",
        key.hash
    )
}

/// `[store]` lines: PostgreSQL at the URL in `$TG_TEST_PG_URL`, keys polled every `key_poll`.
fn store_lines(key_poll: &str, extra: &str) -> String {
    format!("backend = \"postgres\"\nurl = \"env:{PG_ENV}\"\nkey_poll = \"{key_poll}\"\n{extra}")
}

const KEY_POLL: Duration = Duration::from_millis(500);

/// A gateway whose ledger and keys are in the database at `url`, keys polled every 500 ms.
fn start(url: &str, cfg: &str) -> Gateway {
    start_with(url, cfg, "")
}

/// [`start`], with `store_extra` lines added to `[store]`.
fn start_with(url: &str, cfg: &str, store_extra: &str) -> Gateway {
    start_gateway_store(
        &store_lines("500ms", store_extra),
        &format!("token = \"env:{TOKEN_ENV}\""),
        &[(PG_ENV, url), (TOKEN_ENV, TOKEN)],
        cfg,
    )
}

fn body(stream: bool) -> String {
    json!({"model": "m", "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

/// Usage that makes request `i` cost something of its own.
fn usage(i: u64) -> String {
    json!({"input_tokens": 10 + i % 7, "output_tokens": 1 + i % 50}).to_string()
}

/// Request `i` through `gw` with `secret`, its answer read whole: the status and the request id
/// the gateway gave it.
async fn call(gw: &Gateway, secret: &str, i: u64, stream: bool) -> (u16, String) {
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", secret)
        .header("x-mock-usage", usage(i))
        .body(body(stream))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let id = resp.headers().get("x-tollgate-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let _ = resp.bytes().await;
    (status, id)
}

/// The ledger rows these gateways' usage records say there must be (records with a key):
/// request id to cost.
fn ledger_of(gws: &[&Gateway]) -> BTreeMap<String, u64> {
    gws.iter()
        .flat_map(|g| g.records())
        .filter(|r| r["key_id"].is_string())
        .map(|r| (r["request_id"].as_str().unwrap().to_string(), r["cost_nanos"].as_u64().unwrap()))
        .collect()
}

/// The request ids of these gateways' usage records, in the order they were written.
fn record_ids(gw: &Gateway) -> Vec<String> {
    gw.records()
        .iter()
        .filter(|r| r["key_id"].is_string())
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect()
}

/// An admin call with the token; the status and JSON answer.
async fn admin(gw: &Gateway, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, gw.admin_url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("admin answer {status} is not JSON ({e}): {text}")))
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    // With the admin token: the reasons in full.
    let resp = client().get(gw.admin_url("/readyz")).bearer_auth(TOKEN).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// Waits (up to `within`) until `/readyz` answers `status`; its answer.
async fn wait_readyz(gw: &Gateway, status: u16, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let (s, v) = readyz(gw).await;
        if s == status {
            return v;
        }
        assert!(start.elapsed() < within, "/readyz still answers {s} after {within:?}: {v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (up to `within`) until the gateway's spool is empty (replayed files are emptied, not
/// removed: another process may hold them open).
async fn wait_spool_gone(gw: &Gateway, within: Duration) {
    let start = Instant::now();
    while std::fs::metadata(gw.spool_path()).is_ok_and(|m| m.len() > 0) {
        assert!(start.elapsed() < within, "the spool {} is still there after {within:?}", gw.spool_path().display());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The request ids in a spool file, in its order (a line that is not JSON: `None`).
fn spool_ids(path: &std::path::Path) -> Vec<Option<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).ok().and_then(|v| v["request_id"].as_str().map(str::to_string)))
        .collect()
}

/// Nothing in the gateway's log says a thread panicked.
fn no_panics(gw: &Gateway) {
    let log = gw.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// `tollgate ARGS` with `envs`; the admin variables of the test's environment removed.
fn tollgate(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env_remove("TOLLGATE_ADMIN_URL")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

fn pg_address() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], PG_PORT))
}

// ---------------------------------------------------------------------------------------------
// 1. Two gateways, one ledger.

/// Two gateways on one database, requests through both (streamed and not): each gateway's rows
/// are in `tollgate_ledger` exactly once (the same request ids and costs as the usage records
/// its clients' requests produced), and the usage report, asked of either gateway (API or CLI),
/// is the fleet's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_write_one_ledger_and_either_reports_the_fleet() {
    let db = Db::create().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let cfg = config(&mock.url(), &key);
    let (ga, gb) = (Arc::new(start(&db.url(), &cfg)), Arc::new(start(&db.url(), &cfg)));

    let tasks: Vec<_> = (0..40u64)
        .map(|i| {
            let gw = if i % 2 == 0 { ga.clone() } else { gb.clone() };
            let secret = key.key.clone();
            tokio::spawn(async move { (i % 2, call(&gw, &secret, i, i % 4 == 1).await) })
        })
        .collect();
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for t in tasks {
        let (gw, (status, id)) = t.await.unwrap();
        assert_eq!(status, 200);
        seen[gw as usize].push(id);
    }
    let (a, b): (&Gateway, &Gateway) = (&ga, &gb);
    a.wait_for_records(20);
    b.wait_for_records(20);
    let (of_a, of_b) = (ledger_of(&[a]), ledger_of(&[b]));
    let mut seen_a = seen[0].clone();
    seen_a.sort();
    let mut seen_b = seen[1].clone();
    seen_b.sort();
    assert_eq!(of_a.keys().cloned().collect::<Vec<_>>(), seen_a, "gateway a's records are its clients' requests");
    assert_eq!(of_b.keys().cloned().collect::<Vec<_>>(), seen_b, "gateway b's records are its clients' requests");
    let mut expected = of_a.clone();
    expected.extend(of_b.clone());
    assert_eq!(expected.len(), 40);
    let sum: u64 = expected.values().sum();
    assert!(expected.values().all(|&c| c > 0), "every request is priced: {expected:?}");

    db.wait_rows(40, Duration::from_secs(10)).await;
    let (count, total) = db.totals().await;
    assert_eq!((count, total as u64), (40, sum), "each row once, costs as the records say");
    assert_eq!(db.ledger().await, expected, "the ledger is both gateways' records, each once");

    // The other columns, as the records have them.
    let records: BTreeMap<String, Value> =
        [a, b].iter().flat_map(|g| g.records()).map(|r| (r["request_id"].as_str().unwrap().to_string(), r)).collect();
    let rows = db
        .client
        .query(
            "SELECT request_id, key_id, user_id, team, model, provider, provider_model, status, outcome, stream, \
             input_tokens, output_tokens, priced FROM tollgate_ledger",
            &[],
        )
        .await
        .unwrap();
    for row in &rows {
        let id: String = row.get(0);
        let r = &records[&id];
        let got = json!([
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<String>>(2),
            row.get::<_, Option<String>>(3),
            row.get::<_, Option<String>>(4),
            row.get::<_, Option<String>>(5),
            row.get::<_, Option<String>>(6),
            row.get::<_, i32>(7),
            row.get::<_, String>(8),
            row.get::<_, bool>(9),
            row.get::<_, i64>(10),
            row.get::<_, i64>(11),
            row.get::<_, bool>(12),
        ]);
        let want = json!([
            "a",
            "alice",
            "t1",
            "m",
            "mock",
            MODEL_ID,
            200,
            r["outcome"],
            r["stream"],
            r["usage"]["input_tokens"],
            r["usage"]["output_tokens"],
            true
        ]);
        assert_eq!(got, want, "row {id}");
    }
    assert_eq!(rows.iter().filter(|r| r.get::<_, bool>(9)).count(), 10, "ten were streamed");
    let (input, output): (u64, u64) = records
        .values()
        .map(|r| (r["usage"]["input_tokens"].as_u64().unwrap(), r["usage"]["output_tokens"].as_u64().unwrap()))
        .fold((0, 0), |(i, o), (a, b)| (i + a, o + b));

    // Either gateway reports the fleet.
    for gw in [a, b] {
        let (status, v) = admin(gw, reqwest::Method::GET, "/admin/usage?group_by=key,team", None).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["total_cost_nanos"], json!(sum), "{v}");
        let lines = v["rows"].as_array().unwrap();
        assert_eq!(lines.len(), 1, "{v}");
        assert_eq!(lines[0]["group"], json!({"key": "a", "team": "t1"}), "{v}");
        assert_eq!(
            (&lines[0]["requests"], &lines[0]["cost_nanos"], &lines[0]["input_tokens"], &lines[0]["output_tokens"]),
            (&json!(40), &json!(sum), &json!(input), &json!(output)),
            "{v}"
        );
    }
    // And so does `tollgate usage`, with either gateway's config.
    for gw in [a, b] {
        let config = gw.config_path.to_str().unwrap();
        let out = tollgate(&["usage", "--config", config, "--group-by", "team", "--json"], &[(TOKEN_ENV, TOKEN)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["total_cost_nanos"], json!(sum), "{v}");
        assert_eq!(v["rows"][0]["requests"], json!(40), "{v}");
        let table = tollgate(&["usage", "--config", config, "--group-by", "team"], &[(TOKEN_ENV, TOKEN)]).stdout;
        let table = String::from_utf8_lossy(&table);
        assert!(table.contains("t1"), "{table}");
    }
    no_panics(a);
    no_panics(b);
}

// ---------------------------------------------------------------------------------------------
// 2. Keys, fleet-wide.

/// How long until `done` holds for requests through `gw` with `secret` (polled every 10 ms,
/// for at most 5 s).
async fn time_until(gw: &Gateway, secret: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let resp =
            client().post(gw.url("/v1/messages")).header("x-api-key", secret).body(body(false)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        if done(status, &text) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: not after 5 s ({status} {text})");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn refused(status: u16, text: &str, message_has: &str) -> bool {
    status == 401 && text.contains(message_has)
}

/// The most a change may take to reach another gateway: one poll, and a little for the poll's
/// own queries and the rebuild on a loaded two-core machine.
const KEY_BOUND: Duration = Duration::from_millis(500 + 300);

/// A key created through gateway A works on gateway B within `store.key_poll` (500 ms);
/// disabled through B, it is refused on A within the same bound; enabled, rotated and deleted,
/// likewise. Every delay is measured and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_on_one_gateway_apply_on_the_other_within_key_poll() {
    let db = Db::create().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let cfg = config(&mock.url(), &key);
    let (a, b) = (start(&db.url(), &cfg), start(&db.url(), &cfg));
    let mut timings = Vec::new();
    let mut first_secret = String::new();

    for round in 0..3 {
        let id = format!("k{round}");
        let (status, v) = admin(&a, reqwest::Method::POST, "/admin/keys", Some(json!({"id": id, "team": "t1"}))).await;
        assert_eq!(status, 201, "{v}");
        let secret = v["secret"].as_str().unwrap().to_string();
        if round == 0 {
            first_secret = secret.clone();
        }
        // At once on the gateway that created it.
        assert_eq!(call(&a, &secret, 0, false).await.0, 200);
        let t = time_until(&b, &secret, "created on a, works on b", |s, _| s == 200).await;
        timings.push((format!("create {id} on a -> works on b"), t));
        assert_eq!(admin(&b, reqwest::Method::GET, &format!("/admin/keys/{id}"), None).await.0, 200);
    }
    let secret_of_k0 = {
        let (status, v) = admin(&a, reqwest::Method::POST, "/admin/keys/k0/rotate", None).await;
        assert_eq!(status, 200, "{v}");
        v["secret"].as_str().unwrap().to_string()
    };
    // The old secret refused on b, the new one working there.
    assert_eq!(call(&a, &first_secret, 0, false).await.0, 401);
    let t = time_until(&b, &first_secret, "rotated on a, old secret refused on b", |s, _| s == 401).await;
    timings.push(("rotate k0 on a -> old secret refused on b".into(), t));
    assert_eq!(call(&b, &secret_of_k0, 0, false).await.0, 200);

    let (status, v) = admin(&b, reqwest::Method::POST, "/admin/keys/k0/disable", None).await;
    assert_eq!(status, 200, "{v}");
    assert!(refused(call(&b, &secret_of_k0, 0, false).await.0, "", ""));
    let t = time_until(&a, &secret_of_k0, "disabled on b, refused on a", |s, text| {
        refused(s, text, "API key \\\"k0\\\" is disabled")
    })
    .await;
    timings.push(("disable k0 on b -> refused on a".into(), t));

    let (status, v) = admin(&a, reqwest::Method::POST, "/admin/keys/k0/enable", None).await;
    assert_eq!(status, 200, "{v}");
    let t = time_until(&b, &secret_of_k0, "enabled on a, works on b", |s, _| s == 200).await;
    timings.push(("enable k0 on a -> works on b".into(), t));

    let (status, v) = admin(&b, reqwest::Method::DELETE, "/admin/keys/k0", None).await;
    assert_eq!(status, 200, "{v}");
    let t = time_until(&a, &secret_of_k0, "deleted on b, refused on a", |s, text| {
        refused(s, text, "authentication_error") && !text.contains("disabled")
    })
    .await;
    timings.push(("delete k0 on b -> refused on a".into(), t));
    assert_eq!(admin(&a, reqwest::Method::GET, "/admin/keys/k0", None).await.0, 404);

    for (what, t) in &timings {
        println!("key change: {what}: {t:?}");
    }
    for (what, t) in &timings {
        assert!(*t <= KEY_BOUND, "{what} took {t:?}, more than key_poll ({KEY_POLL:?}) allows");
    }
    no_panics(&a);
    no_panics(&b);
}

/// Keys changed through a gateway whose clock is behind another's are never applied on the
/// rest of the fleet: each gateway stamps `updated_ms` from its own clock and the fleet polls
/// `COUNT(*)` and `MAX(updated_ms)`, so a change stamped below the maximum changes neither.
///
/// The gateway whose clock runs ten minutes ahead is played by an `UPDATE` writing what its
/// `PATCH /admin/keys/k2` would have written (`updated_ms` = its clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_disabled_on_one_gateway_is_refused_on_the_others_whatever_their_clocks() {
    let db = Db::create().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let cfg = config(&mock.url(), &key);
    let (a, b) = (start(&db.url(), &cfg), start(&db.url(), &cfg));
    let mut secrets = Vec::new();
    for id in ["k1", "k2"] {
        let (status, v) = admin(&a, reqwest::Method::POST, "/admin/keys", Some(json!({"id": id}))).await;
        assert_eq!(status, 201, "{v}");
        secrets.push(v["secret"].as_str().unwrap().to_string());
    }
    time_until(&b, &secrets[1], "k2 works on b", |s, _| s == 200).await;
    // Gateway c, its clock ten minutes ahead, changes k2's metadata.
    let ahead = 10 * 60 * 1000i64;
    let n = db
        .client
        .execute(
            "UPDATE tollgate_keys SET metadata = '{\"owner\":\"c\"}', updated_ms = $1 WHERE id = 'k2'",
            &[&(chrono::Utc::now().timestamp_millis() + ahead)],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Two polls: b has seen that change (and applied it) before the next.
    tokio::time::sleep(KEY_POLL * 2).await;
    // Now k1 is disabled through a, whose clock is right.
    let (status, v) = admin(&a, reqwest::Method::POST, "/admin/keys/k1/disable", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(call(&a, &secrets[0], 0, false).await.0, 401);
    tokio::time::sleep(KEY_POLL * 4).await;
    let (status, text) = {
        let resp = client()
            .post(b.url("/v1/messages"))
            .header("x-api-key", &secrets[0])
            .body(body(false))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(status, 401, "k1, disabled through a {:?} ago, still works on b: {text}", KEY_POLL * 4);
}

// ---------------------------------------------------------------------------------------------
// 3. The database out of reach under load.

/// What the load saw of one request.
struct Seen {
    status: u16,
    id: String,
    sent: Instant,
    latency: Duration,
}

/// `workers` clients sending requests through `gw` one after another (`pause` apart) until
/// `stop` is set.
fn load(
    gw: &Arc<Gateway>,
    secret: &str,
    workers: usize,
    pause: Duration,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Seen>>> {
    let counter = Arc::new(AtomicU64::new(0));
    (0..workers)
        .map(|_| {
            let (gw, secret, stop, counter) = (gw.clone(), secret.to_string(), stop.clone(), counter.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let i = counter.fetch_add(1, Ordering::SeqCst);
                    let sent = Instant::now();
                    let (status, id) = call(&gw, &secret, i, i % 5 == 0).await;
                    seen.push(Seen { status, id, sent, latency: sent.elapsed() });
                    tokio::time::sleep(pause).await;
                }
                seen
            })
        })
        .collect()
}

/// PostgreSQL out of reach for 30 s under load (a proxy of the test's own between the gateway
/// and the server, cut: connections closed, new ones closed at once): `/readyz` answers 503
/// naming the ledger database and the spool, requests keep being served as fast as before (the
/// ledger is not on the request path); restored, every row arrives exactly once (count, ids and
/// costs as the clients and the usage records saw them), the spool is gone, `/readyz` is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30s_database_outage_under_load_loses_and_repeats_no_row() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let db = Db::create().await;
    let proxy = TcpProxy::start(pg_address());
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = Arc::new(start(&db.url_via(proxy.port), &config(&mock.url(), &key)));
    assert_eq!(readyz(&gw).await.0, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&gw, &key.key, 3, Duration::from_millis(20), &stop);
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.cut();
    let cut_at = Instant::now();
    let v = wait_readyz(&gw, 503, Duration::from_secs(3)).await;
    let detected = cut_at.elapsed();
    let problems = v["problems"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(problems.len(), 1, "{v}");
    let problem = problems[0].as_str().unwrap();
    let spool = gw.spool_path().display().to_string();
    assert!(
        problem.contains("the ledger database cannot be written") && problem.contains(&format!("the spool {spool}")),
        "{problem}"
    );
    assert!(!problem.contains("postgres://"), "the URL is not shown: {problem}");
    // The report cannot be made without the database, and says so at once.
    let asked = Instant::now();
    let (status, v) = admin(&gw, reqwest::Method::GET, "/admin/usage", None).await;
    assert_eq!(status, 500, "{v}");
    assert!(asked.elapsed() < Duration::from_secs(6), "the report took {:?} to fail", asked.elapsed());
    assert_eq!(client().get(gw.admin_url("/healthz")).send().await.unwrap().status(), 200);

    tokio::time::sleep(OUTAGE.saturating_sub(Duration::from_secs(1)).saturating_sub(cut_at.elapsed())).await;
    let (status, v) = readyz(&gw).await;
    assert_eq!(status, 503, "still out of reach near the outage's end: {v}");
    let spooled = spool_ids(&gw.spool_path());
    assert!(spooled.len() > 100 && spooled.iter().all(Option::is_some), "{} rows spooled", spooled.len());
    tokio::time::sleep(OUTAGE.saturating_sub(cut_at.elapsed())).await;
    proxy.restore();
    let restored_at = Instant::now();
    // Ready again once the spool is written, while the load goes on.
    assert_eq!(wait_readyz(&gw, 200, Duration::from_secs(10)).await, json!({"status": "ready"}));
    let ready_after = restored_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(restored_at.elapsed())).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for w in workers {
        seen.extend(w.await.unwrap());
    }

    // Every request was served, during the outage as before it, and as fast.
    let bad: Vec<u16> = seen.iter().map(|s| s.status).filter(|&s| s != 200).collect();
    assert!(bad.is_empty(), "{} of {} requests failed: {bad:?}", bad.len(), seen.len());
    let during: Vec<Duration> =
        seen.iter().filter(|s| s.sent >= cut_at && s.sent + s.latency <= restored_at).map(|s| s.latency).collect();
    let before: Vec<Duration> = seen.iter().filter(|s| s.sent + s.latency < cut_at).map(|s| s.latency).collect();
    println!(
        "outage: {} requests in all, {} before the cut (p50 {:?}, p99 {:?}), {} during it (p50 {:?}, p99 {:?}); \
         /readyz said 503 {detected:?} after the cut; {} rows spooled 1 s before the end",
        seen.len(),
        before.len(),
        percentile(&before, 50.0),
        percentile(&before, 99.0),
        during.len(),
        percentile(&during, 50.0),
        percentile(&during, 99.0),
        spooled.len()
    );
    assert!(during.len() > 500, "requests kept coming during the outage: {}", during.len());
    assert!(percentile(&during, 99.0) < Duration::from_millis(500), "p99 during the outage");

    // Restored: every row once.
    let v = wait_readyz(&gw, 200, Duration::from_secs(10)).await;
    assert_eq!(v, json!({"status": "ready"}));
    wait_spool_gone(&gw, Duration::from_secs(10)).await;
    gw.wait_for_records(seen.len());
    let expected = ledger_of(&[&*gw]);
    let mut ids: Vec<String> = seen.iter().map(|s| s.id.clone()).collect();
    ids.sort();
    assert_eq!(expected.keys().cloned().collect::<Vec<_>>(), ids, "the records are the clients' requests");
    db.wait_rows(seen.len() as i64, Duration::from_secs(10)).await;
    let (count, sum) = db.totals().await;
    assert_eq!((count as usize, sum as u64), (seen.len(), expected.values().sum::<u64>()));
    assert_eq!(db.ledger().await, expected);
    println!(
        "outage: restored; /readyz 200 again {ready_after:?} later; {count} rows in the ledger, {sum} nano-dollars, \
         the spool gone"
    );
    no_panics(&gw);
}

// ---------------------------------------------------------------------------------------------
// 4. Stopped while the database is out of reach.

/// `n` requests through `gw`, one after another; their request ids in order.
async fn sequential(gw: &Gateway, secret: &str, from: u64, n: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in from..from + n {
        let (status, id) = call(gw, secret, i, i % 3 == 0).await;
        assert_eq!(status, 200);
        // Its record is written after its ledger row is queued, both once the answer is sent:
        // waiting for it fixes the rows' order by cause (a new connection's request could
        // otherwise be logged first).
        gw.record(&id);
        ids.push(id);
    }
    ids
}

/// A gateway stopped (SIGTERM) while PostgreSQL is out of reach leaves the rows it could not
/// write in its spool, in order; started while the database is still out of reach, it exits
/// naming it and leaves the spool alone; started with the database back, it replays the spool
/// first, in order, exactly once, then writes what it serves since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_spooled_at_shutdown_are_replayed_in_order_at_the_next_start() {
    let db = Db::create().await;
    let proxy = TcpProxy::start(pg_address());
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let mut gw = start(&db.url_via(proxy.port), &config(&mock.url(), &key));

    let mut order = sequential(&gw, &key.key, 0, 10).await;
    db.wait_rows(10, Duration::from_secs(10)).await;
    proxy.cut();
    let unwritten = sequential(&gw, &key.key, 10, 15).await;
    order.extend(unwritten.clone());
    let status = gw.stop();
    assert!(status.success(), "the gateway stopped with {status}\n{}", gw.log());
    assert_eq!(record_ids(&gw), order, "the usage records are the requests, in order");
    let spooled: Vec<String> = spool_ids(&gw.spool_path()).into_iter().map(Option::unwrap).collect();
    assert_eq!(spooled, unwritten, "the spool holds exactly the rows not written, in order");
    assert_eq!(db.totals().await.0, 10);
    let spool_before = std::fs::read(gw.spool_path()).unwrap();

    // The database still out of reach: the gateway does not start, and says why.
    let status = gw.restart_expecting_exit();
    assert!(!status.success());
    let log = gw.log();
    let said = log.lines().rev().find(|l| l.contains("the ledger database (store.url)"));
    assert!(said.is_some(), "{log}");
    println!("started while the database is out of reach: {}", said.unwrap());
    assert_eq!(std::fs::read(gw.spool_path()).unwrap(), spool_before, "the spool is left as it was");

    proxy.restore();
    gw.restart();
    wait_spool_gone(&gw, Duration::from_secs(10)).await;
    db.wait_rows(25, Duration::from_secs(10)).await;
    order.extend(sequential(&gw, &key.key, 25, 5).await);
    db.wait_rows(30, Duration::from_secs(10)).await;
    gw.wait_for_records(30);
    let rows = db.ledger_in_order().await;
    assert_eq!(rows.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), order, "written once each, in order");
    assert_eq!(rows.into_iter().collect::<BTreeMap<_, _>>(), ledger_of(&[&gw]), "costs as the records say");
    assert_eq!(wait_readyz(&gw, 200, Duration::from_secs(5)).await, json!({"status": "ready"}));
    no_panics(&gw);
}

// ---------------------------------------------------------------------------------------------
// 5. Migrations and `tollgate check`.

/// A config file for the CLI: PostgreSQL at `$TG_TEST_PG_URL`.
fn cli_config(dir: &std::path::Path) -> std::path::PathBuf {
    let (port, admin) = (free_port(), free_port());
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"127.0.0.1:{admin}\"\n\
         [store]\n{}\n{}",
        store_lines("500ms", ""),
        config("http://127.0.0.1:9", &new_key())
    );
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The versions in `tollgate_schema`, with when each was applied.
async fn schema(db: &Db) -> Vec<(i32, i64)> {
    db.client
        .query("SELECT version, applied_ms FROM tollgate_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `tollgate migrate` applies the schema to an empty database (version 4) and, run again,
/// changes nothing; `tollgate check` says PostgreSQL answered and at which schema version, and
/// fails (exit 1) naming the reason when nothing answers at the URL, the URL's password shown
/// nowhere; two gateways started together on an empty database both come up, the schema
/// applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_check_and_a_fleet_starting_together_on_an_empty_database() {
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = cli_config(dir.path());
    let path = path.to_str().unwrap();
    // A password trust authentication ignores: it must appear nowhere.
    let url = format!("postgres://postgres:hunter2-not-shown@127.0.0.1:{PG_PORT}/{}", db.name);
    let env = [(PG_ENV, url.as_str()), ("TG_TEST_PROVIDER_KEY", "x")];
    let text = |o: &Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    let out = tollgate(&["check", path], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("store: PostgreSQL answered in ") && text(&out).contains(" ms (no schema yet)"),
        "{}",
        text(&out)
    );

    let out = tollgate(&["migrate", path], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "the ledger database is at schema version 4\n");
    let applied = schema(&db).await;
    assert_eq!(applied.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [1, 2, 3, 4]);
    let tables: Vec<String> = db
        .client
        .query("SELECT tablename::TEXT FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "tollgate_alerts",
            "tollgate_keys",
            "tollgate_ledger",
            "tollgate_schema",
            "tollgate_sso_people",
            "tollgate_sso_sessions"
        ]
    );

    let out = tollgate(&["migrate", path], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "the ledger database is at schema version 4\n");
    assert_eq!(schema(&db).await, applied, "a second run applies nothing");

    let out = tollgate(&["check", path], &env);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let line = all.lines().find(|l| l.starts_with("store: ")).unwrap_or_else(|| panic!("{all}"));
    let ms = line
        .strip_prefix("store: PostgreSQL answered in ")
        .and_then(|rest| rest.strip_suffix(" ms (schema version 4)"))
        .unwrap_or_else(|| panic!("{line}"));
    assert!(ms.parse::<f64>().is_ok(), "{line}");
    assert!(!all.contains("hunter2"), "{all}");

    // Nothing listening at the URL's port.
    let closed = free_port();
    let wrong = format!("postgres://postgres:hunter2-not-shown@127.0.0.1:{closed}/{}", db.name);
    let started = Instant::now();
    let out = tollgate(&["check", path], &[(PG_ENV, wrong.as_str()), ("TG_TEST_PROVIDER_KEY", "x")]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr.starts_with("error: store: ") && stderr.contains("PostgreSQL: error connecting to server"),
        "{stderr}"
    );
    assert!(!text(&out).contains("hunter2"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(5), "check took {:?}", started.elapsed());
    let out = tollgate(&["migrate", path], &[(PG_ENV, wrong.as_str())]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: store: PostgreSQL: "), "{}", text(&out));

    // Two gateways at once on another empty database.
    let empty = Db::create().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let cfg = config(&mock.url(), &key);
    let url = empty.url();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| start(&url, &cfg));
        let b = s.spawn(|| start(&url, &cfg));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(schema(&empty).await.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [1, 2, 3, 4], "applied once");
    assert_eq!(call(&a, &key.key, 0, false).await.0, 200);
    assert_eq!(call(&b, &key.key, 1, false).await.0, 200);
    empty.wait_rows(2, Duration::from_secs(10)).await;
    for gw in [&a, &b] {
        assert!(!gw.log().contains("ERROR"), "{}", gw.log());
    }
}

/// `tollgate check` on a URL where nothing answers says why (the connection was refused), as
/// it does for Redis, and says "store:" once.
#[test]
fn check_says_why_postgresql_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let path = cli_config(dir.path());
    let wrong = format!("postgres://postgres@127.0.0.1:{}/test", free_port());
    let out = tollgate(&["check", path.to_str().unwrap()], &[(PG_ENV, wrong.as_str()), ("TG_TEST_PROVIDER_KEY", "x")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("store: store:"), "{stderr}");
    assert!(stderr.to_lowercase().contains("connection refused"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 6. Idempotence.

/// A row written twice is kept once: a spool holding every row twice (one statement inserts
/// both copies), replayed, writes each once; the same spool replayed again, after its rows were
/// written, changes nothing; a line torn by a crash mid-append is skipped, the rest replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_twice_is_kept_once() {
    let db = Db::create().await;
    let proxy = TcpProxy::start(pg_address());
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let mut gw = start(&db.url_via(proxy.port), &config(&mock.url(), &key));
    proxy.cut();
    let ids = sequential(&gw, &key.key, 0, 8).await;
    assert!(gw.stop().success());
    let spool = std::fs::read_to_string(gw.spool_path()).unwrap();
    assert_eq!(spool.lines().count(), 8);
    let expected = ledger_of(&[&gw]);
    assert_eq!(expected.len(), 8);

    // Every row twice, in one file.
    std::fs::write(gw.spool_path(), format!("{spool}{spool}")).unwrap();
    proxy.restore();
    gw.restart();
    wait_spool_gone(&gw, Duration::from_secs(10)).await;
    db.wait_rows(8, Duration::from_secs(10)).await;
    assert_eq!(db.ledger().await, expected);
    assert_eq!(db.ledger_in_order().await.into_iter().map(|(id, _)| id).collect::<Vec<_>>(), ids);
    assert!(gw.stop().success());

    // The same rows again, after a line torn mid-append.
    let first = spool.lines().next().unwrap();
    std::fs::write(gw.spool_path(), format!("{spool}{}", &first[..first.len() / 2])).unwrap();
    gw.restart();
    wait_spool_gone(&gw, Duration::from_secs(10)).await;
    assert_eq!(wait_readyz(&gw, 200, Duration::from_secs(5)).await, json!({"status": "ready"}));
    let (count, sum) = db.totals().await;
    assert_eq!((count, sum as u64), (8, expected.values().sum::<u64>()), "nothing written twice");
    assert_eq!(db.ledger().await, expected);
    assert!(gw.log().contains("an unreadable line in the ledger spool is skipped"), "{}", gw.log());
    no_panics(&gw);
}

/// A line torn by a crash mid-append is the spool's last; rows the next run spools (the
/// database out of reach again before the spool was replayed) are appended to it, and the
/// first of them, glued to the torn line, is lost at the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_spooled_after_a_torn_line_are_not_lost() {
    let db = Db::create().await;
    let proxy = TcpProxy::start(pg_address());
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // Passes every 3 s: room to cut the database between the start and the first replay.
    let mut gw = start_with(&db.url_via(proxy.port), &config(&mock.url(), &key), "flush_interval = \"3s\"\n");
    assert!(gw.stop().success());
    // What a crash in the middle of an append leaves.
    std::fs::write(gw.spool_path(), "{\"request_id\":\"req_torn\",\"time_ms\":17").unwrap();
    gw.restart();
    proxy.cut();
    let ids = sequential(&gw, &key.key, 0, 3).await;
    // The first pass (3 s after the start) cannot replay; it appends the three rows.
    let start = Instant::now();
    while spool_ids(&gw.spool_path()).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing appended to the spool");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spooled = spool_ids(&gw.spool_path());
    println!("the spool after the append: {spooled:?}");
    proxy.restore();
    wait_spool_gone(&gw, Duration::from_secs(15)).await;
    let written: Vec<String> = db.ledger_in_order().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(written, ids, "every row served is in the ledger");
}

// ---------------------------------------------------------------------------------------------
// A database that stops answering (packets dropped, no reset).

/// PostgreSQL silent (a network that drops packets: connections stay open, nothing comes
/// back) under light load: requests are served, but `/readyz` should say the ledger cannot be
/// written within a few seconds (the connect timeout is 5 s), the admin listener should keep
/// answering `/healthz` while a report waits for the database, and a SIGTERM should end the
/// gateway with its unwritten rows spooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_database_is_reported_and_does_not_hang_the_gateway() {
    let db = Db::create().await;
    let proxy = TcpProxy::start(pg_address());
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let mut gw = start(&db.url_via(proxy.port), &config(&mock.url(), &key));
    sequential(&gw, &key.key, 0, 3).await;
    db.wait_rows(3, Duration::from_secs(10)).await;

    proxy.silence();
    let silenced = Instant::now();
    let served = sequential(&gw, &key.key, 3, 5).await;
    assert_eq!(served.len(), 5, "requests are served while the database is silent");
    let mut failures = Vec::new();

    // Readiness follows once the writer's batch, sent after the next flush, has waited out the
    // store's 10 s write timeout: 10 s plus the flush interval and a margin for a loaded machine.
    let ready = loop {
        let (status, v) = readyz(&gw).await;
        if status == 503 || silenced.elapsed() > Duration::from_secs(15) {
            break (status, v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("silent database: /readyz {} {:?} after the silence began: {}", ready.0, silenced.elapsed(), ready.1);
    if ready.0 != 503 {
        failures.push(format!(
            "/readyz still answers {} {} {:?} after the database went silent",
            ready.0,
            ready.1,
            silenced.elapsed()
        ));
    }

    // The admin listener keeps answering while a report waits for the database.
    let report = {
        let url = gw.admin_url("/admin/usage");
        tokio::spawn(async move { client().get(url).bearer_auth(TOKEN).send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = tokio::time::timeout(Duration::from_secs(3), client().get(gw.admin_url("/healthz")).send()).await;
    println!("silent database: /healthz while a report waits: {health:?}");
    if !matches!(&health, Ok(Ok(r)) if r.status() == 200) {
        failures.push("/healthz did not answer within 3 s while /admin/usage waited for the database".into());
    }
    report.abort();

    // A SIGTERM ends the gateway, its rows spooled.
    gw.signal("TERM");
    let stopping = Instant::now();
    let status = gw.wait_exit(Duration::from_secs(20));
    println!("silent database: SIGTERM: {status:?} after {:?}", stopping.elapsed());
    if status.is_none() {
        failures.push("the gateway had not stopped 20 s after SIGTERM".into());
    }
    let spooled = if gw.spool_path().exists() { spool_ids(&gw.spool_path()).len() } else { 0 };
    drop(gw); // killed if still running
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (count, _) = db.totals().await;
    println!("silent database: after the gateway ended, {count} rows in the ledger and {spooled} in the spool, of 8");
    if count as usize + spooled != 8 {
        failures
            .push(format!("{} of the 8 rows are neither in the ledger nor in the spool", 8 - count as usize - spooled));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A report that waits for the database (here on a lock an operator holds for 3 s; at ten
/// million rows, on the query itself: see `usage_reports_over_ten_million_rows`) must not hold
/// up the admin listener's probes: `/healthz` and `/readyz` answer at once meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_report_does_not_hold_up_the_health_probes() {
    let db = Db::create().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start(&db.url(), &config(&mock.url(), &key));
    sequential(&gw, &key.key, 0, 3).await;
    db.wait_rows(3, Duration::from_secs(10)).await;

    let locker = pg_connect(&db.url()).await;
    locker.batch_execute("BEGIN; LOCK TABLE tollgate_ledger IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let asked = Instant::now();
    let report = {
        let url = gw.admin_url("/admin/usage");
        tokio::spawn(async move {
            let status = client().get(url).bearer_auth(TOKEN).send().await.unwrap().status().as_u16();
            (status, asked.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut probes = Vec::new();
    for path in ["/healthz", "/readyz"] {
        let t = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(1), client().get(gw.admin_url(path)).send()).await;
        probes.push((path, answer.map(|r| r.map(|r| r.status().as_u16())).ok(), t.elapsed()));
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(asked.elapsed())).await;
    locker.batch_execute("COMMIT").await.unwrap();
    let (status, took) = report.await.unwrap();
    println!("slow report: {status} after {took:?}; probes meanwhile: {probes:?}");
    assert_eq!(status, 200);
    for (path, answer, t) in &probes {
        assert!(matches!(answer, Some(Ok(200))), "{path} did not answer within 1 s ({t:?}) while a report waited");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Reports at scale.

/// Asks each report three times through `gw`'s `/admin/usage` (checking its line count and, for
/// the whole fleet, its total) and prints how long each took, and how long a `/healthz` asked
/// 100 ms into it took.
async fn time_reports(gw: &Gateway, reports: &[(&str, String, usize)], expected_cost: i64, note: &str) {
    for (what, query, lines) in reports {
        let mut times = Vec::new();
        for _ in 0..3 {
            let asked = Instant::now();
            let health = {
                let url = gw.admin_url("/healthz");
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let t = Instant::now();
                    let _ = client().get(url).send().await;
                    t.elapsed()
                })
            };
            let (status, v) = admin(gw, reqwest::Method::GET, &format!("/admin/usage?{query}"), None).await;
            let took = asked.elapsed();
            let health = health.await.unwrap();
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["rows"].as_array().unwrap().len(), *lines, "{what}: {v}");
            if !query.contains("key=") && !query.contains("team=") {
                assert_eq!(v["total_cost_nanos"], json!(expected_cost), "{what}");
            }
            times.push((took, health));
        }
        let shown: Vec<String> = times
            .iter()
            .map(|(t, h)| {
                format!("{:>5.0} ms (/healthz meanwhile {:>5.0} ms)", t.as_secs_f64() * 1e3, h.as_secs_f64() * 1e3)
            })
            .collect();
        println!("scale: report {what:16} {}{note}", shown.join(", "));
    }
}

/// Ten million ledger rows (100 keys in 10 teams, spread over the 30 days of June 2025), made
/// on the server; the usage report for the month grouped by team, by key and by day, and for
/// one key by day, timed through a gateway's `/admin/usage`. Run by hand:
/// `cargo test --test fleet_store -- --ignored --nocapture usage_reports_over_ten_million_rows`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: ten million rows take minutes to make"]
async fn usage_reports_over_ten_million_rows() {
    const ROWS: i64 = 10_000_000;
    let db = Db::create().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start(&db.url(), &config(&mock.url(), &key));

    // June 2025, UTC: 30 days.
    let from_ms: i64 = 1_748_736_000_000;
    let span_ms: i64 = 30 * 86_400_000;
    let made = Instant::now();
    // Indexes built after the rows, as a bulk load does: the same indexes, made much faster.
    let indexes: Vec<String> = db
        .client
        .query("SELECT indexdef FROM pg_indexes WHERE tablename = 'tollgate_ledger' AND indexname <> 'tollgate_ledger_pkey'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(indexes.len(), 4, "{indexes:?}");
    db.client
        .batch_execute(
            "SET maintenance_work_mem = '512MB'; ALTER TABLE tollgate_ledger DROP CONSTRAINT tollgate_ledger_pkey; \
             DROP INDEX tollgate_ledger_ts, tollgate_ledger_key, tollgate_ledger_user, tollgate_ledger_team",
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO tollgate_ledger (request_id, ts_ms, key_id, user_id, team, model, provider, provider_model, \
             status, outcome, stream, input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, \
             cache_write_1h_tokens, cost_nanos, priced, estimated) \
             SELECT 'req_' || g, $1::BIGINT + (g - 1) * ($2::BIGINT / $3::BIGINT), 'key-' || (g % 100), \
             'user-' || (g % 100), 'team-' || (g % 10), 'm', 'mock', 'claude-sonnet-4-5-20250929', 200, 'ok', \
             g % 5 = 0, 100 + g % 1000, 10 + g % 500, 0, 0, 0, 300000 + g % 100000, TRUE, NULL \
             FROM generate_series(1, $3::BIGINT) AS g",
            &[&from_ms, &span_ms, &ROWS],
        )
        .await
        .unwrap();
    let filled = made.elapsed();
    db.client.batch_execute("ALTER TABLE tollgate_ledger ADD PRIMARY KEY (request_id)").await.unwrap();
    for def in &indexes {
        db.client.batch_execute(def).await.unwrap();
    }
    db.client.batch_execute("VACUUM ANALYZE tollgate_ledger").await.unwrap();
    println!("scale: rows inserted in {filled:?}; indexes: {indexes:?}");
    let size: String = db
        .client
        .query_one("SELECT pg_size_pretty(pg_total_relation_size('tollgate_ledger'))", &[])
        .await
        .unwrap()
        .get(0);
    println!("scale: {ROWS} rows made in {:?} ({size} with indexes)", made.elapsed());
    let expected_cost: i64 =
        db.client.query_one("SELECT SUM(cost_nanos)::BIGINT FROM tollgate_ledger", &[]).await.unwrap().get(0);

    let month = "from=2025-06-01&to=2025-07-01";
    let reports = [
        ("by team", format!("group_by=team&{month}"), 10),
        ("by key", format!("group_by=key&{month}"), 100),
        ("by day", format!("group_by=day&{month}"), 30),
        ("by team and day", format!("group_by=team,day&{month}"), 300),
        ("one key by day", format!("group_by=day&key=key-7&{month}"), 30),
        ("one team by key", format!("group_by=key&team=team-3&{month}"), 10),
        // The console's spend page: these three at once (by day and team, by team, the total).
        ("the month's total", month.to_string(), 1),
    ];
    time_reports(&gw, &reports, expected_cost, "").await;
    // Days are cut from `ts_ms / 900000`; the schema's statistics on that expression (migration
    // 2) let PostgreSQL hash ~3,000 buckets instead of sorting ten million rows, once ANALYZE
    // has filled them (autovacuum does after a bulk load; here, at once).
    db.client.batch_execute("ANALYZE tollgate_ledger").await.unwrap();
    time_reports(&gw, &reports, expected_cost, " (after ANALYZE)").await;
    // What PostgreSQL does for the month by team.
    let plan: Vec<String> = db
        .client
        .query(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT team, COUNT(*)::BIGINT, SUM(cost_nanos)::BIGINT FROM tollgate_ledger \
             WHERE TRUE AND ts_ms >= $1 AND ts_ms < $2 GROUP BY team",
            &[&from_ms, &(from_ms + span_ms)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    println!("scale: plan of the month by team:\n{}", plan.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The whole fleet: budgets in Redis, the ledger in PostgreSQL.

/// Two gateways sharing Redis and PostgreSQL; key `a` with a budget of exactly ten worst cases
/// and keys `b`, `c` of team `t2` whose budget holds six; 400 concurrent requests spread over
/// both gateways, each really costing its worst case: exactly ten (and six) are served, the
/// ledger's sum equals the spend Redis holds, and neither exceeds the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_redis_and_postgres_spend_a_budget_exactly() {
    const CONTEXT_WINDOW: u64 = 200_000;
    const PROMPT_RATE: u64 = 6000; // $6 per million 1-hour cache writes, in nano-dollars per token
    const OUTPUT_RATE: u64 = 15_000;
    const MAX_TOKENS: u64 = 100;
    let worst = CONTEXT_WINDOW * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE;
    let db = Db::create().await;
    let prefix = format!("tg-test-{:016x}", rand::random::<u64>());
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let (a, b, c) = (new_key(), new_key(), new_key());
    let usd = |n: u64| (n * worst) as f64 / 1e9;
    let cfg = format!(
        "[limits]\nbackend = \"redis\"\nurl = \"env:TG_TEST_REDIS_URL\"\nprefix = \"{prefix}\"\n\
         [[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\", failures = 1000 }}\n\
         [[model]]\nname = \"m\"\nmax_attempts = 1\ndeployments = [{{ provider = \"mock\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{}\"\nbudget = {{ usd = {}, period = \"daily\" }}\n\
         [[key]]\nid = \"b\"\nhash = \"{}\"\nteam = \"t2\"\n\
         [[key]]\nid = \"c\"\nhash = \"{}\"\nteam = \"t2\"\n\
         [[team]]\nid = \"t2\"\nbudget = {{ usd = {}, period = \"daily\" }}\n",
        mock.url(),
        a.hash,
        usd(10),
        b.hash,
        c.hash,
        usd(6),
    );
    let start_one = || {
        start_gateway_store(
            &store_lines("500ms", ""),
            &format!("token = \"env:{TOKEN_ENV}\""),
            &[(PG_ENV, db.url().as_str()), (TOKEN_ENV, TOKEN), ("TG_TEST_REDIS_URL", "redis://127.0.0.1:6379/")],
            &cfg,
        )
    };
    let (g1, g2) = (start_one(), start_one());
    let usage =
        json!({"input_tokens": 0, "output_tokens": MAX_TOKENS, "cache_creation_1h_input_tokens": CONTEXT_WINDOW})
            .to_string();
    let body = json!({
        "model": "m",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/big.png"}},
            {"type": "text", "text": "what is in it?"},
        ]}],
    })
    .to_string();
    // 400 at once: 200 on key a, 200 on keys b and c of team t2, alternating gateways.
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let gw = if i % 2 == 0 { &g1 } else { &g2 };
            let secret = match i % 4 {
                0 | 1 => &a.key,
                2 => &b.key,
                _ => &c.key,
            };
            let req = client()
                .post(gw.url("/v1/messages"))
                .header("x-api-key", secret.as_str())
                .header("anthropic-version", "2023-06-01")
                .header("content-type", "application/json")
                .header("x-mock-usage", usage.clone())
                .header("x-mock-header-delay-ms", "30")
                .body(body.clone());
            let who = if i % 4 < 2 { "a" } else { "t2" };
            tokio::spawn(async move { (who, req.send().await.unwrap().status().as_u16()) })
        })
        .collect();
    let mut served = BTreeMap::<&str, u64>::new();
    for t in tasks {
        let (who, status) = t.await.unwrap();
        assert!(matches!(status, 200 | 403 | 429), "status {status}");
        *served.entry(who).or_default() += u64::from(status == 200);
    }
    // Requests refused while others held the budget (429) leave room that later ones take.
    for (who, secret) in [("a", &a.key), ("t2", &b.key), ("t2", &c.key)] {
        for gw in [&g1, &g2].iter().cycle().take(16) {
            let resp = client()
                .post(gw.url("/v1/messages"))
                .header("x-api-key", secret.as_str())
                .header("anthropic-version", "2023-06-01")
                .header("content-type", "application/json")
                .header("x-mock-usage", usage.clone())
                .body(body.clone())
                .send()
                .await
                .unwrap();
            *served.entry(who).or_default() += u64::from(resp.status() == 200);
        }
    }
    assert_eq!(served.get("a"), Some(&10), "key a's budget holds ten worst cases: {served:?}");
    assert_eq!(served.get("t2"), Some(&6), "team t2's budget holds six, across keys and gateways: {served:?}");
    // Every request has its row, refused ones (at no cost) included: 400 + 3 × 16.
    db.wait_rows(448, Duration::from_secs(10)).await;
    // The ledger (PostgreSQL) and the budgets (Redis) agree, to the nano-dollar.
    let by_key: BTreeMap<String, i64> = db
        .client
        .query("SELECT key_id, SUM(cost_nanos)::BIGINT FROM tollgate_ledger WHERE status = 200 GROUP BY key_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    let team_spent = by_key.get("b").copied().unwrap_or(0) + by_key.get("c").copied().unwrap_or(0);
    assert_eq!(by_key.get("a").copied(), Some((10 * worst) as i64), "{by_key:?}");
    assert_eq!(team_spent, (6 * worst) as i64, "{by_key:?}");
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/").unwrap().get_connection().unwrap();
    let spent = |kind: &str, id: &str, redis: &mut redis::Connection| -> Option<i64> {
        redis::cmd("HGET").arg(format!("{{{prefix}}}:s:{kind}:{id}")).arg("spent").query(redis).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while spent("team", "t2", &mut redis) != Some(team_spent)
        || spent("key", "a", &mut redis) != Some((10 * worst) as i64)
    {
        assert!(
            Instant::now() < deadline,
            "Redis holds key a {:?}, team t2 {:?}",
            spent("key", "a", &mut redis),
            spent("team", "t2", &mut redis)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{{{prefix}}}:*")).query(&mut redis).unwrap();
    let _: i64 = redis::cmd("DEL").arg(keys).query(&mut redis).unwrap();
    no_panics(&g1);
    no_panics(&g2);
}

// ---------------------------------------------------------------------------------------------
// Moving an embedded node into the fleet.

/// An embedded node's keys and ledger moved into PostgreSQL with `tollgate migrate
/// --from-sqlite`: every row arrives once with its cost (a second run adds nothing), the key
/// created through the node's admin API works on a gateway of the fleet, and the fleet's usage
/// report holds the node's spend to the nano-dollar. A key whose id the database has already is
/// left as the database has it, and said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_nodes_keys_and_ledger_move_into_postgres() {
    let db = Db::create().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let cfg = config(&mock.url(), &key);
    let mut node = start_gateway_store("", &format!("token = \"env:{TOKEN_ENV}\""), &[(TOKEN_ENV, TOKEN)], &cfg);
    let (status, v) =
        admin(&node, reqwest::Method::POST, "/admin/keys", Some(json!({"id": "made", "team": "t2"}))).await;
    assert_eq!(status, 201, "{v}");
    let made = v["secret"].as_str().unwrap().to_string();
    let (status, v) = admin(&node, reqwest::Method::POST, "/admin/keys", Some(json!({"id": "clash"}))).await;
    assert_eq!(status, 201, "{v}");
    for i in 0..30 {
        assert_eq!(call(&node, &key.key, i, i % 3 == 0).await.0, 200);
    }
    for i in 30..40 {
        assert_eq!(call(&node, &made, i, false).await.0, 200);
    }
    node.stop();
    let want = ledger_of(&[&node]);
    assert_eq!(want.len(), 40);
    let sum: u64 = want.values().sum();
    let sqlite = node.dir.path().join("tollgate.db");

    // The database already has a key of one of those ids (from another node, say).
    let other = new_key();
    let fleet_cfg = format!("{}[[key]]\nid = \"b\"\nhash = \"{}\"\n", config(&mock.url(), &key), other.hash);
    {
        let gw = start(&db.url(), &fleet_cfg);
        let (status, v) = admin(&gw, reqwest::Method::POST, "/admin/keys", Some(json!({"id": "clash"}))).await;
        assert_eq!(status, 201, "{v}");
    }

    let dir = tempfile::tempdir().unwrap();
    let path = cli_config(dir.path());
    let env = [(PG_ENV, db.url()), ("TG_TEST_PROVIDER_KEY", "x".to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["migrate", path.to_str().unwrap(), "--from-sqlite", sqlite.to_str().unwrap()];
    let out = tollgate(&args, &env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    let usd = format!("${:.9}", sum as f64 / 1e9);
    assert!(
        stdout.contains(&format!(
            "keys 1 added, 0 already present, 1 differing; ledger 40 rows ({usd}), 40 added, 0 already present"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("key \"clash\" differs in the database (changed on one side since)"), "{stdout}");
    assert_eq!(db.ledger().await, want, "every row once, with its cost");
    // Again: nothing new.
    let out = tollgate(&args, &env);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("keys 0 added, 1 already present, 1 differing; ledger 40 rows"), "{stdout}");
    assert!(stdout.contains("0 added, 40 already present"), "{stdout}");
    assert_eq!(db.totals().await, (40, sum as i64));

    // The fleet serves the moved key and reports the node's spend.
    let gw = start(&db.url(), &fleet_cfg);
    assert_eq!(call(&gw, &made, 40, false).await.0, 200);
    gw.wait_for_records(1);
    let added = ledger_of(&[&gw]);
    db.wait_rows(41, Duration::from_secs(10)).await;
    let (status, v) = admin(&gw, reqwest::Method::GET, "/admin/usage?group_by=key", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["total_cost_nanos"], json!(sum + added.values().sum::<u64>()), "{v}");
    let by_key: BTreeMap<String, (u64, u64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["group"]["key"].as_str().unwrap().to_string(),
                (r["requests"].as_u64().unwrap(), r["cost_nanos"].as_u64().unwrap()),
            )
        })
        .collect();
    assert_eq!(by_key["a"].0, 30, "{v}");
    assert_eq!(by_key["made"].0, 11, "{v}");

    // A file that is not a Tollgate store is refused, and nothing is written.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"").unwrap();
    let out = tollgate(&["migrate", path.to_str().unwrap(), "--from-sqlite", junk.to_str().unwrap()], &env);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a Tollgate store"), "{out:?}");
    no_panics(&gw);
}

// ---------------------------------------------------------------------------------------------
// TLS to the database.

/// A TLS front for the machine's PostgreSQL, as a server with `ssl = on` behaves: it answers a
/// client's SSLRequest with `S`, makes the TLS handshake with a certificate for `localhost`
/// signed by `ca`, and passes the protocol on, in plain, to 127.0.0.1:5432. Counts handshakes.
struct TlsFront {
    port: u16,
    handshakes: Arc<AtomicU64>,
}

impl TlsFront {
    async fn start(ca: &Ca) -> TlsFront {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (cert, key) = ca.leaf(&["localhost"]);
        let certs = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls_pemfile::private_key(&mut key.as_bytes()).unwrap().unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicU64::new(0));
        let counted = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    // SSLRequest: length 8, code 80877103.
                    let mut request = [0u8; 8];
                    if client.read_exact(&mut request).await.is_err() || request != [0, 0, 0, 8, 4, 210, 22, 47] {
                        return;
                    }
                    client.write_all(b"S").await.unwrap();
                    let Ok(mut tls) = acceptor.accept(client).await else { return };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut server = tokio::net::TcpStream::connect(pg_address()).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        TlsFront { port, handshakes }
    }
}

/// `sslmode=require` in `store.url`: the gateway, `tollgate check` and `tollgate migrate` speak
/// TLS to the database and verify its certificate and name against `store.ca_file`; without the
/// CA, or with the name wrong, they refuse to connect and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified() {
    let db = Db::create().await;
    let ca = Ca::new();
    let front = TlsFront::start(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let url = |host: &str| format!("postgres://postgres@{host}:{}/{}?sslmode=require", front.port, db.name);
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();

    let gw = start_with(&url("localhost"), &config(&mock.url(), &key), &format!("ca_file = \"{}\"", ca_file.display()));
    for i in 0..5 {
        assert_eq!(call(&gw, &key.key, i, i % 2 == 0).await.0, 200);
    }
    gw.wait_for_records(5);
    db.wait_rows(5, Duration::from_secs(10)).await;
    assert_eq!(db.ledger().await, ledger_of(&[&gw]));
    let (status, v) = admin(&gw, reqwest::Method::GET, "/admin/usage", None).await;
    assert_eq!((status, &v["rows"][0]["requests"]), (200, &json!(5)), "{v}");
    assert!(front.handshakes.load(Ordering::SeqCst) >= 2, "the reader and the writer connect over TLS");
    no_panics(&gw);

    // The CLI too; and without the CA, or for a name the certificate does not hold, no connection.
    let config_file = |ca: Option<&std::path::Path>| {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:{}\"\n[store]\nbackend = \"postgres\"\nurl = \"env:{PG_ENV}\"\n{}\n{}",
            free_port(),
            ca.map(|c| format!("ca_file = \"{}\"", c.display())).unwrap_or_default(),
            config("http://127.0.0.1:9", &new_key())
        );
        let path = dir.path().join(format!("t{:x}.toml", rand::random::<u32>()));
        std::fs::write(&path, text).unwrap();
        path
    };
    let text = |o: &Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let run = |cmd: &str, file: &std::path::Path, url: &str| {
        tollgate(&[cmd, file.to_str().unwrap()], &[("TG_TEST_PROVIDER_KEY", "x"), (PG_ENV, url)])
    };
    let (with_ca, without_ca) = (config_file(Some(&ca_file)), config_file(None));
    let out = run("check", &with_ca, &url("localhost"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("store: PostgreSQL answered in "), "{}", text(&out));
    let out = run("migrate", &with_ca, &url("localhost"));
    assert!(out.status.success(), "{}", text(&out));

    let out = run("check", &without_ca, &url("localhost"));
    assert!(!out.status.success());
    assert!(text(&out).contains("UnknownIssuer"), "{}", text(&out));
    let out = run("migrate", &with_ca, &url("127.0.0.1"));
    assert!(!out.status.success());
    assert!(text(&out).contains("certificate not valid for name"), "{}", text(&out));
    // A CA file without sslmode=require is a mistake worth saying.
    let out = run("check", &with_ca, &pg_url(&db.name, PG_PORT));
    assert!(!out.status.success());
    assert!(text(&out).contains("store.ca_file is for TLS: add sslmode=require to store.url"), "{}", text(&out));
}

/// A spool larger than a writer pass replays (five pages of 10,000 rows): 60,000 rows left by a
/// previous run are written over two passes, once each and in order, and requests served
/// meanwhile land after them (the queue waits behind the spool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_of_many_pages_is_replayed_over_several_passes_in_order() {
    let db = Db::create().await;
    let proxy = TcpProxy::start(pg_address());
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let mut gw = start(&db.url_via(proxy.port), &config(&mock.url(), &key));
    let first = sequential(&gw, &key.key, 0, 1).await;
    db.wait_rows(1, Duration::from_secs(10)).await;
    proxy.cut();
    sequential(&gw, &key.key, 1, 1).await;
    assert!(gw.stop().success());
    // The one spooled row is the template of 60,000.
    let template: Value =
        serde_json::from_str(std::fs::read_to_string(gw.spool_path()).unwrap().lines().next().unwrap()).unwrap();
    let ids: Vec<String> = (0..60_000).map(|i| format!("req_bulk_{i:06}")).collect();
    let mut spool = String::with_capacity(60_000 * 400);
    for id in &ids {
        let mut row = template.clone();
        row["request_id"] = json!(id);
        row["cost_nanos"] = json!(7);
        spool.push_str(&row.to_string());
        spool.push('\n');
    }
    std::fs::write(gw.spool_path(), spool).unwrap();

    proxy.restore();
    gw.restart();
    let after = sequential(&gw, &key.key, 2, 3).await;
    wait_spool_gone(&gw, Duration::from_secs(120)).await;
    db.wait_rows(1 + 60_000 + 3, Duration::from_secs(30)).await;
    let rows = db.ledger_in_order().await;
    let order: Vec<String> = rows.iter().map(|(id, _)| id.clone()).collect();
    let mut want = first.clone();
    want.extend(ids.iter().cloned());
    want.extend(after);
    assert_eq!(order.len(), want.len());
    assert!(order == want, "written once each, the spool in order and the requests after it");
    assert_eq!(rows.iter().filter(|(id, _)| id.starts_with("req_bulk_")).map(|(_, c)| c).sum::<u64>(), 7 * 60_000);
    no_panics(&gw);
}
