//! The admin API (`/admin/keys`, `/admin/usage`, `/admin/budgets`, `/admin/reload`) and the
//! `tollgate` CLI over it, end to end: the real binary, the mock provider, a real HTTP client.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chrono::{Datelike, Days, Utc};
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const TOKEN: &str = "admin-test-token-7c1e0f9a";
const TOKEN_ENV: &str = "TG_TEST_ADMIN_TOKEN";

/// 25 input and 15 output tokens (the mock's default usage) at $3 / $15 per million.
const PLAIN_COST_NANOS: u64 = 25 * 3_000 + 15 * 15_000;

/// 25*3 + 15*15 + 4000*0.3 + 100*3.75 + 200*6 USD per million tokens, in nano-dollars.
const CACHE_COST_NANOS: u64 = 75_000 + 225_000 + 1_200_000 + 375_000 + 1_200_000;

struct Setup {
    mock: MockProvider,
    gw: Gateway,
    /// The config file's key `alice` (user alice@example.com, team platform).
    alice: TestKey,
}

fn config(mock_url: &str, alice: &TestKey, extra: &str) -> String {
    format!(
        r#"
[[provider]]
name = "mock"
kind = "anthropic"
base_url = "{mock_url}"
credential = "env:TG_TEST_PROVIDER_KEY"

[[model]]
name = "claude-sonnet-4-5"
deployments = [{{ provider = "mock", model = "claude-sonnet-4-5-20250929" }}]

[[price]]
match = "claude-sonnet-4-5-20250929"
input = 3.0
output = 15.0
cache_read = 0.3
cache_write_5m = 3.75
cache_write_1h = 6.0

[[key]]
id = "alice"
hash = "{hash}"
user = "alice@example.com"
team = "platform"
{extra}
"#,
        hash = alice.hash
    )
}

async fn setup_with(behavior: Behavior, extra: &str) -> Setup {
    let mock = MockProvider::start(behavior).await.unwrap();
    let alice = new_key();
    let gw = start_gateway_admin(
        &format!("token = \"env:{TOKEN_ENV}\""),
        &[(TOKEN_ENV, TOKEN)],
        &config(&mock.url(), &alice, extra),
    );
    Setup { mock, gw, alice }
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

/// An admin call with the right token; the answer's status and JSON body.
async fn api(gw: &Gateway, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, gw.admin_url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    read(req).await
}

async fn read(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("admin answer {status} is not JSON ({e}): {text}"));
    (status, v)
}

async fn get(gw: &Gateway, path: &str) -> (u16, Value) {
    api(gw, Method::GET, path, None).await
}

async fn post(gw: &Gateway, path: &str, body: Value) -> (u16, Value) {
    api(gw, Method::POST, path, Some(body)).await
}

async fn post_empty(gw: &Gateway, path: &str) -> (u16, Value) {
    api(gw, Method::POST, path, None).await
}

async fn patch(gw: &Gateway, path: &str, body: Value) -> (u16, Value) {
    api(gw, Method::PATCH, path, Some(body)).await
}

async fn delete(gw: &Gateway, path: &str) -> (u16, Value) {
    api(gw, Method::DELETE, path, None).await
}

/// Checks an error answer: its status, its type and a piece of its message.
#[track_caller]
fn assert_error(got: &(u16, Value), status: u16, kind: &str, message_has: &str) {
    let (s, v) = got;
    assert_eq!(*s, status, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no message in {v}"));
    assert!(message.contains(message_has), "{message:?} should contain {message_has:?}");
}

fn small_body() -> String {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

/// A Messages request at the proxy with `secret`: its status and body.
async fn send(gw: &Gateway, secret: &str) -> (u16, String) {
    let resp =
        client().post(gw.url("/v1/messages")).header("x-api-key", secret).body(small_body()).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

#[track_caller]
fn assert_proxy_refuses(got: &(u16, String), message_has: &str) {
    assert_eq!(got.0, 401, "{}", got.1);
    let v: Value = serde_json::from_str(&got.1).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(message_has), "{v}");
}

/// Polls `GET path` until `done` holds (settlement and the ledger trail the answer by a moment).
async fn wait_for(gw: &Gateway, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = get(gw, path).await;
        assert_eq!(status, 200, "{v}");
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "GET {path} never got there: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the ledger holds `n` requests.
async fn wait_ledger(gw: &Gateway, n: u64) {
    wait_for(gw, "/admin/usage", |v| v["rows"][0]["requests"] == n).await;
}

/// Removes `created` and `updated`, checking they are RFC 3339 times; returns them.
fn take_times(v: &mut Value) -> (String, String) {
    let obj = v.as_object_mut().unwrap();
    let mut t = [obj.remove("created"), obj.remove("updated")].map(|t| t.unwrap().as_str().unwrap().to_string());
    for s in &t {
        chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    }
    (std::mem::take(&mut t[0]), std::mem::take(&mut t[1]))
}

fn take_secret(v: &mut Value) -> String {
    let secret = v.as_object_mut().unwrap().remove("secret").expect("the secret is shown");
    let secret = secret.as_str().unwrap().to_string();
    assert!(secret.starts_with("tg-") && secret.len() == 3 + 48, "{secret:?}");
    secret
}

fn midnight(d: chrono::NaiveDate) -> String {
    format!("{d}T00:00:00Z")
}

fn today() -> chrono::NaiveDate {
    Utc::now().date_naive()
}

/// `(period_start, resets_at)` of a daily budget now, in UTC.
fn daily_bounds() -> (String, String) {
    (midnight(today()), midnight(today() + Days::new(1)))
}

fn weekly_bounds() -> (String, String) {
    let monday = today() - Days::new(u64::from(today().weekday().num_days_from_monday()));
    (midnight(monday), midnight(monday + Days::new(7)))
}

fn monthly_bounds() -> (String, String) {
    let first = today().with_day(1).unwrap();
    (midnight(first), midnight(first + chrono::Months::new(1)))
}

fn budget_status(limit: &str, spent: &str, remaining: &str, period: &str, bounds: (String, String)) -> Value {
    json!({
        "limit_usd": limit,
        "spent_usd": spent,
        "reserved_usd": "0",
        "remaining_usd": remaining,
        "period": period,
        "period_start": bounds.0,
        "resets_at": bounds.1,
    })
}

/// The config key `alice` as the API shows it.
fn alice_json() -> Value {
    json!({
        "id": "alice",
        "source": "config",
        "user": "alice@example.com",
        "team": "platform",
        "models": null,
        "budget": null,
        "limits": {},
        "expires": null,
        "disabled": false,
        "status": {"in_flight": 0},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_over_http() {
    let s = setup().await;
    let gw = &s.gw;
    assert_eq!(get(gw, "/admin/keys").await, (200, json!({"keys": [alice_json()]})));
    assert_eq!(get(gw, "/admin/keys/alice").await, (200, alice_json()));

    // Create: every field, the secret shown once, usable at once.
    let (status, mut created) = post(
        gw,
        "/admin/keys",
        json!({
            "id": "dev-1",
            "user": "dev@example.com",
            "team": "web",
            "models": ["claude-sonnet-*"],
            "budget": {"usd": 12.5, "period": "daily"},
            "limits": {"concurrency": 4},
            "expires": "2099-01-01T00:00:00Z",
            "metadata": {"laptop": "mbp-14"},
        }),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let secret = take_secret(&mut created);
    let (created_at, updated_at) = take_times(&mut created);
    assert_eq!(created_at, updated_at);
    let mut expected = json!({
        "id": "dev-1",
        "source": "api",
        "user": "dev@example.com",
        "team": "web",
        "models": ["claude-sonnet-*"],
        "budget": {"usd": 12.5, "period": "daily"},
        "limits": {"concurrency": 4},
        "expires": "2099-01-01T00:00:00Z",
        "disabled": false,
        "metadata": {"laptop": "mbp-14"},
        "status": {"in_flight": 0, "budget": budget_status("12.5", "0", "12.5", "daily", daily_bounds())},
    });
    assert_eq!(created, expected);

    assert_eq!(send(gw, &secret).await.0, 200);
    assert_eq!(s.mock.received().len(), 1);
    assert_eq!(s.mock.received()[0].headers["x-api-key"], PROVIDER_SECRET);
    let mut shown = wait_for(gw, "/admin/keys/dev-1", |v| v["status"]["budget"]["spent_usd"] == "0.0003").await;
    assert_eq!(take_times(&mut shown), (created_at.clone(), updated_at.clone()));
    expected["status"]["budget"] = budget_status("12.5", "0.0003", "12.4997", "daily", daily_bounds());
    assert_eq!(shown, expected);

    // The same id twice, and an id without a secret: one is generated.
    let dup = post(gw, "/admin/keys", json!({"id": "dev-1"})).await;
    assert_error(&dup, 409, "invalid_request_error", "already exists");
    let (status, mut anon) = post_empty(gw, "/admin/keys").await;
    assert_eq!(status, 201, "{anon}");
    let anon_secret = take_secret(&mut anon);
    let anon_id = anon["id"].as_str().unwrap().to_string();
    assert!(
        anon_id.len() == 16 && anon_id.starts_with("key-") && anon_id[4..].chars().all(|c| c.is_ascii_hexdigit()),
        "{anon_id}"
    );
    assert_eq!(anon["models"], Value::Null);
    assert_eq!(anon["budget"], Value::Null);
    assert_eq!(anon["status"], json!({"in_flight": 0}));
    assert_eq!(send(gw, &anon_secret).await.0, 200);

    // List: sorted by id, the API keys with their metadata.
    let (status, list) = get(gw, "/admin/keys").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alice", "dev-1", anon_id.as_str()]);
    assert_eq!(list["keys"][0], alice_json());
    let mut listed = list["keys"][1].clone();
    take_times(&mut listed);
    assert_eq!(listed, expected);

    // Update: absent fields stay, null clears, a new budget shows in the status with the spend
    // the ledger holds for its (new) period.
    let (status, mut updated) = patch(
        gw,
        "/admin/keys/dev-1",
        json!({"team": null, "budget": {"usd": 20, "period": "weekly"}, "metadata": {"laptop": "mbp-16"}}),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    let (c, u) = take_times(&mut updated);
    assert_eq!(c, created_at);
    assert!(u >= created_at, "{u} < {created_at}");
    expected["team"] = Value::Null;
    expected["budget"] = json!({"usd": 20.0, "period": "weekly"});
    expected["metadata"] = json!({"laptop": "mbp-16"});
    expected["status"]["budget"] = budget_status("20", "0.0003", "19.9997", "weekly", weekly_bounds());
    assert_eq!(updated, expected);
    let (status, mut shown) = get(gw, "/admin/keys/dev-1").await;
    assert_eq!(status, 200);
    take_times(&mut shown);
    assert_eq!(shown, expected);

    let (status, mut updated) =
        patch(gw, "/admin/keys/dev-1", json!({"models": null, "limits": null, "expires": null, "user": null})).await;
    assert_eq!(status, 200, "{updated}");
    take_times(&mut updated);
    expected["models"] = Value::Null;
    expected["limits"] = json!({});
    expected["expires"] = Value::Null;
    expected["user"] = Value::Null;
    assert_eq!(updated, expected);
    assert_error(
        &patch(gw, "/admin/keys/dev-1", json!({"id": "dev-2"})).await,
        400,
        "invalid_request_error",
        "cannot change",
    );

    // Disable and enable.
    let (status, v) = post_empty(gw, "/admin/keys/dev-1/disable").await;
    assert_eq!((status, &v["disabled"]), (200, &json!(true)), "{v}");
    assert_proxy_refuses(&send(gw, &secret).await, "disabled");
    assert_eq!(get(gw, "/admin/keys/dev-1").await.1["disabled"], true);
    let (status, v) = post_empty(gw, "/admin/keys/dev-1/enable").await;
    assert_eq!((status, &v["disabled"]), (200, &json!(false)), "{v}");
    assert_eq!(send(gw, &secret).await.0, 200);

    // Rotate: a new secret for the same key; the old one stops at once.
    let (status, mut rotated) = post_empty(gw, "/admin/keys/dev-1/rotate").await;
    assert_eq!(status, 200, "{rotated}");
    let new_secret = take_secret(&mut rotated);
    assert_ne!(new_secret, secret);
    take_times(&mut rotated);
    assert_eq!(rotated["id"], "dev-1");
    assert_eq!(rotated["budget"], json!({"usd": 20.0, "period": "weekly"}));
    assert_proxy_refuses(&send(gw, &secret).await, "invalid API key");
    assert_eq!(send(gw, &new_secret).await.0, 200);
    let (_, shown) = get(gw, "/admin/keys/dev-1").await;
    assert!(shown.get("secret").is_none(), "the secret is shown only once: {shown}");

    // Delete: the secret stops working and the key is gone.
    assert_eq!(delete(gw, "/admin/keys/dev-1").await, (200, json!({"id": "dev-1", "deleted": true})));
    assert_proxy_refuses(&send(gw, &new_secret).await, "invalid API key");
    assert_error(&get(gw, "/admin/keys/dev-1").await, 404, "not_found_error", "no key with id \"dev-1\"");
    assert_error(&delete(gw, "/admin/keys/dev-1").await, 404, "not_found_error", "dev-1");
    let (_, list) = get(gw, "/admin/keys").await;
    let ids: Vec<&str> = list["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alice", anon_id.as_str()]);
    // The config key was never touched.
    assert_eq!(send(gw, &s.alice.key).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_report_has_exact_tokens_and_cost_by_key_team_user_model_and_day() {
    let s = setup_with(Behavior { usage: cache_usage(), ..Behavior::default() }, "").await;
    let gw = &s.gw;
    let (status, mut web) =
        post(gw, "/admin/keys", json!({"id": "k-web", "user": "wes", "team": "web", "models": ["claude-*"]})).await;
    assert_eq!(status, 201, "{web}");
    let web_secret = take_secret(&mut web);

    // An empty ledger.
    assert_eq!(
        get(gw, "/admin/usage?group_by=key").await,
        (
            200,
            json!({"group_by": ["key"], "time_zone": "UTC", "rows": [], "total_cost_nanos": 0, "total_cost_usd": "0"})
        )
    );

    for secret in [&s.alice.key, &s.alice.key, &web_secret] {
        assert_eq!(send(gw, secret).await.0, 200);
    }
    // Without a key, or with a wrong one, nothing reaches the ledger.
    assert_eq!(send(gw, "").await.0, 401);
    assert_eq!(send(gw, "tg-not-a-key").await.0, 401);
    wait_ledger(gw, 3).await;

    let line = |group: Value, n: u64| {
        json!({
            "group": group,
            "requests": n,
            "input_tokens": 25 * n,
            "output_tokens": 15 * n,
            "cache_read_tokens": 4000 * n,
            "cache_write_5m_tokens": 100 * n,
            "cache_write_1h_tokens": 200 * n,
            "cost_nanos": CACHE_COST_NANOS * n,
            "cost_usd": tollgate::metering::usd(CACHE_COST_NANOS * n),
            "estimated": 0,
        })
    };
    let report = |group_by: Value, rows: Vec<Value>| {
        let total: u64 = rows.iter().map(|r| r["cost_nanos"].as_u64().unwrap()).sum();
        json!({
            "group_by": group_by,
            "time_zone": "UTC",
            "rows": rows,
            "total_cost_nanos": total,
            "total_cost_usd": tollgate::metering::usd(total),
        })
    };
    assert_eq!(tollgate::metering::usd(CACHE_COST_NANOS * 2), "0.00615");
    assert_eq!(tollgate::metering::usd(CACHE_COST_NANOS * 3), "0.009225");

    // Most expensive first.
    assert_eq!(
        get(gw, "/admin/usage?group_by=key").await,
        (200, report(json!(["key"]), vec![line(json!({"key": "alice"}), 2), line(json!({"key": "k-web"}), 1)]))
    );
    assert_eq!(
        get(gw, "/admin/usage?group_by=team").await,
        (200, report(json!(["team"]), vec![line(json!({"team": "platform"}), 2), line(json!({"team": "web"}), 1)]))
    );
    let day = today().to_string();
    assert_eq!(
        get(gw, "/admin/usage?group_by=team,day").await,
        (
            200,
            report(
                json!(["team", "day"]),
                vec![line(json!({"team": "platform", "day": day}), 2), line(json!({"team": "web", "day": day}), 1)]
            )
        )
    );
    assert_eq!(
        get(gw, "/admin/usage?group_by=user&team=web").await,
        (200, report(json!(["user"]), vec![line(json!({"user": "wes"}), 1)]))
    );
    assert_eq!(
        get(gw, "/admin/usage?group_by=model,key&key=alice&model=claude-sonnet-4-5").await,
        (200, report(json!(["model", "key"]), vec![line(json!({"key": "alice", "model": "claude-sonnet-4-5"}), 2)]))
    );
    assert_eq!(get(gw, "/admin/usage").await, (200, report(json!([]), vec![line(json!({}), 3)])));

    // Time bounds: [from, to), dates or RFC 3339 times.
    let tomorrow = (today() + Days::new(1)).to_string();
    let all = report(json!(["team"]), vec![line(json!({"team": "platform"}), 2), line(json!({"team": "web"}), 1)]);
    assert_eq!(get(gw, &format!("/admin/usage?group_by=team&from={day}&to={tomorrow}")).await, (200, all.clone()));
    let hour_ago = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(get(gw, &format!("/admin/usage?group_by=team&from={hour_ago}")).await, (200, all));
    assert_eq!(
        get(gw, &format!("/admin/usage?group_by=team&from={tomorrow}")).await,
        (200, report(json!(["team"]), vec![]))
    );
    assert_eq!(get(gw, &format!("/admin/usage?group_by=team&to={day}")).await, (200, report(json!(["team"]), vec![])));

    // Bad queries.
    let bad = get(gw, "/admin/usage?group_by=team,project").await;
    assert_error(&bad, 400, "invalid_request_error", "\"project\" is not one of key, user, team, model, day");
    assert_error(
        &get(gw, "/admin/usage?colour=red").await,
        400,
        "invalid_request_error",
        "unknown parameter \"colour\"",
    );
    assert_error(&get(gw, "/admin/usage?from=2026-13-01").await, 400, "invalid_request_error", "from:");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_listed_and_reload_through_the_api_applies_the_edited_file() {
    let extra = "[[user]]\nid = \"alice@example.com\"\nbudget = { usd = 30, period = \"weekly\" }\n";
    let s = setup_with(Behavior::default(), extra).await;
    let gw = &s.gw;
    let (status, mut k) =
        post(gw, "/admin/keys", json!({"id": "k-budget", "team": "platform", "budget": {"usd": 5, "period": "none"}}))
            .await;
    assert_eq!(status, 201, "{k}");
    let k_secret = take_secret(&mut k);
    // A lifetime budget: from the start of time, never resets.
    let lifetime = |spent: &str, remaining: &str| {
        json!({
            "limit_usd": "5", "spent_usd": spent, "reserved_usd": "0", "remaining_usd": remaining,
            "period": "none", "period_start": "1970-01-01T00:00:00Z", "resets_at": null,
        })
    };
    assert_eq!(k["budget"], json!({"usd": 5.0, "period": "none"}));
    assert_eq!(k["status"]["budget"], lifetime("0", "5"));

    assert_eq!(
        get(gw, "/admin/budgets").await,
        (
            200,
            json!({"time_zone": "UTC", "budgets": [
                {"scope": "key", "id": "k-budget", "in_flight": 0, "budget": lifetime("0", "5")},
                {"scope": "user", "id": "alice@example.com", "in_flight": 0,
                 "budget": budget_status("30", "0", "30", "weekly", weekly_bounds())},
            ]})
        )
    );

    assert_eq!(send(gw, &s.alice.key).await.0, 200);
    assert_eq!(send(gw, &k_secret).await.0, 200);
    assert_eq!(send(gw, &k_secret).await.0, 200);
    wait_ledger(gw, 3).await;
    let spent = |n: u64| tollgate::metering::usd(PLAIN_COST_NANOS * n);
    assert_eq!((spent(1), spent(2)), ("0.0003".to_string(), "0.0006".to_string()));
    let before_reload = json!({"time_zone": "UTC", "budgets": [
        {"scope": "key", "id": "k-budget", "in_flight": 0, "budget": lifetime("0.0006", "4.9994")},
        {"scope": "user", "id": "alice@example.com", "in_flight": 0,
         "budget": budget_status("30", "0.0003", "29.9997", "weekly", weekly_bounds())},
    ]});
    wait_for(gw, "/admin/budgets", |v| *v == before_reload).await;

    // A team budget added to the file: after the reload it counts what the team already spent
    // (one request of alice's and two of k-budget's, all in team platform).
    let mut text = std::fs::read_to_string(&gw.config_path).unwrap();
    text.push_str("\n[[team]]\nid = \"platform\"\nbudget = { usd = 100, period = \"monthly\" }\n");
    std::fs::write(&gw.config_path, &text).unwrap();
    assert_eq!(post_empty(gw, "/admin/reload").await, (200, json!({"reloaded": true})));
    let mut after_reload = before_reload.clone();
    after_reload["budgets"].as_array_mut().unwrap().push(json!(
        {"scope": "team", "id": "platform", "in_flight": 0,
         "budget": budget_status("100", "0.0009", "99.9991", "monthly", monthly_bounds())}
    ));
    assert_eq!(get(gw, "/admin/budgets").await, (200, after_reload.clone()));
    // The API key survives the reload.
    assert_eq!(send(gw, &k_secret).await.0, 200);
    wait_ledger(gw, 4).await;

    // A broken file is refused and the running config stays.
    std::fs::write(&gw.config_path, format!("{text}\n[[team]]\nid = \"web\"\nbudget = {{ usd = -1 }}\n")).unwrap();
    let refused = post_empty(gw, "/admin/reload").await;
    assert_error(&refused, 400, "invalid_request_error", "reload refused, the running config stays");
    let (status, v) = get(gw, "/admin/budgets").await;
    assert_eq!(status, 200);
    let ids: Vec<(&str, &str)> = v["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["scope"].as_str().unwrap(), b["id"].as_str().unwrap()))
        .collect();
    assert_eq!(ids, [("key", "k-budget"), ("user", "alice@example.com"), ("team", "platform")]);
    assert_eq!(v["budgets"][2]["budget"]["spent_usd"], "0.0012");

    // A reload also applies a new admin token (here from a file).
    let token_file = gw.dir.path().join("admin-token");
    std::fs::write(&token_file, "second-admin-token\n").unwrap();
    let text =
        text.replace(&format!("token = \"env:{TOKEN_ENV}\""), &format!("token = \"file:{}\"", token_file.display()));
    std::fs::write(&gw.config_path, text).unwrap();
    assert_eq!(post_empty(gw, "/admin/reload").await, (200, json!({"reloaded": true})));
    assert_error(&get(gw, "/admin/budgets").await, 401, "authentication_error", "invalid admin token");
    let (status, _) = read(client().get(gw.admin_url("/admin/budgets")).bearer_auth("second-admin-token")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_calls_are_refused_with_the_right_status() {
    let s = setup().await;
    let gw = &s.gw;
    let c = client();

    // Authentication.
    let missing = read(c.get(gw.admin_url("/admin/keys"))).await;
    assert_error(&missing, 401, "authentication_error", "Authorization: Bearer");
    let wrong = read(c.get(gw.admin_url("/admin/keys")).bearer_auth("admin-test-token-7c1e0f9b")).await;
    assert_error(&wrong, 401, "authentication_error", "invalid admin token");
    let prefix = read(c.get(gw.admin_url("/admin/keys")).bearer_auth(&TOKEN[..TOKEN.len() - 1])).await;
    assert_error(&prefix, 401, "authentication_error", "invalid admin token");
    let basic = read(c.get(gw.admin_url("/admin/keys")).basic_auth("admin", Some(TOKEN))).await;
    assert_error(&basic, 401, "authentication_error", "Authorization: Bearer");
    // The proxy's keys are not admin tokens, and the token is not a proxy key.
    let proxy_key = read(c.get(gw.admin_url("/admin/keys")).bearer_auth(&s.alice.key)).await;
    assert_error(&proxy_key, 401, "authentication_error", "invalid admin token");
    assert_eq!(send(gw, TOKEN).await.0, 401);
    // Every endpoint is behind the token, even unknown ones and changes.
    for (method, path) in [
        (Method::POST, "/admin/keys"),
        (Method::DELETE, "/admin/keys/alice"),
        (Method::GET, "/admin/usage"),
        (Method::GET, "/admin/budgets"),
        (Method::POST, "/admin/reload"),
        (Method::GET, "/admin/nothing"),
    ] {
        let r = read(c.request(method.clone(), gw.admin_url(path)).header("content-type", "application/json")).await;
        assert_error(&r, 401, "authentication_error", "Bearer");
    }
    assert_eq!(get(gw, "/admin/keys").await.1["keys"].as_array().unwrap().len(), 1, "nothing was created");
    // Probes and metrics need no token.
    for path in ["/metrics", "/healthz", "/readyz", "/status"] {
        assert_eq!(c.get(gw.admin_url(path)).send().await.unwrap().status(), 200, "{path}");
    }

    // Unknown keys.
    assert_error(&get(gw, "/admin/keys/nobody").await, 404, "not_found_error", "no key with id \"nobody\"");
    assert_error(&patch(gw, "/admin/keys/nobody", json!({"team": "t"})).await, 404, "not_found_error", "nobody");
    for action in ["disable", "enable", "rotate"] {
        let r = post_empty(gw, &format!("/admin/keys/nobody/{action}")).await;
        assert_error(&r, 404, "not_found_error", "nobody");
    }
    assert_error(&delete(gw, "/admin/keys/nobody").await, 404, "not_found_error", "nobody");

    // Invalid fields.
    let create = |body: Value| post(gw, "/admin/keys", body);
    for budget in [json!({"usd": -1}), json!({"usd": 1e10, "period": "daily"})] {
        assert_error(&create(json!({"id": "b", "budget": budget})).await, 400, "invalid_request_error", "budget");
    }
    assert_error(
        &create(json!({"id": "b", "budget": {"usd": 5, "period": "hourly"}})).await,
        400,
        "invalid_request_error",
        "hourly",
    );
    assert_error(
        &create(json!({"id": "b", "budget": {"usd": "5"}})).await,
        400,
        "invalid_request_error",
        "invalid key",
    );
    assert_error(&create(json!({"id": "b", "buget": 5})).await, 400, "invalid_request_error", "unknown field `buget`");
    assert_error(&create(json!({"id": "b", "limits": {"rpm": 0}})).await, 400, "invalid_request_error", "limits:");
    assert_error(&create(json!({"id": "b", "limits": {"rph": 5}})).await, 400, "invalid_request_error", "rph");
    assert_error(&create(json!({"id": "b", "expires": "tomorrow"})).await, 400, "invalid_request_error", "expires:");
    assert_error(&create(json!({"id": "b", "models": [""]})).await, 400, "invalid_request_error", "models:");
    let long = "x".repeat(129);
    for id in ["a b", "a/b", "", "é", long.as_str()] {
        assert_error(&create(json!({ "id": id })).await, 400, "invalid_request_error", "a key id is 1 to 128");
    }
    let (status, v) = create(json!({"id": "x".repeat(128)})).await;
    assert_eq!(status, 201, "{v}");
    let not_json = read(c.post(gw.admin_url("/admin/keys")).bearer_auth(TOKEN).body("{\"id\": ")).await;
    assert_error(&not_json, 400, "invalid_request_error", "invalid key");
    // A bad update changes nothing.
    let (status, _) = create(json!({"id": "ok", "team": "web"})).await;
    assert_eq!(status, 201);
    let bad = patch(gw, "/admin/keys/ok", json!({"team": "ops", "budget": {"usd": -5}})).await;
    assert_error(&bad, 400, "invalid_request_error", "budget");
    let bad = patch(gw, "/admin/keys/ok", json!({"team": "ops", "colour": "red"})).await;
    assert_error(&bad, 400, "invalid_request_error", "unknown field `colour`");
    assert_eq!(get(gw, "/admin/keys/ok").await.1["team"], "web");

    // Config keys are changed in the file only.
    assert_error(&create(json!({"id": "alice"})).await, 409, "invalid_request_error", "config file");
    assert_error(
        &patch(gw, "/admin/keys/alice", json!({"team": "web"})).await,
        409,
        "invalid_request_error",
        "defined in the config file",
    );
    for action in ["disable", "enable", "rotate"] {
        let r = post_empty(gw, &format!("/admin/keys/alice/{action}")).await;
        assert_error(&r, 409, "invalid_request_error", "defined in the config file");
    }
    assert_error(&delete(gw, "/admin/keys/alice").await, 409, "invalid_request_error", "defined in the config file");
    assert_eq!(get(gw, "/admin/keys/alice").await, (200, alice_json()));
    assert_eq!(send(gw, &s.alice.key).await.0, 200);

    // Unknown endpoints and methods.
    assert_error(&get(gw, "/admin/teams").await, 404, "not_found_error", "/admin/teams");
    assert_error(&api(gw, Method::PUT, "/admin/keys/ok", None).await, 405, "invalid_request_error", "PUT");
    assert_error(&get(gw, "/admin/reload").await, 405, "invalid_request_error", "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_closed_without_a_configured_token() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let alice = new_key();
    let gw = start_gateway(&config(&mock.url(), &alice, ""));
    let c = client();
    for req in [
        c.get(gw.admin_url("/admin/keys")),
        c.get(gw.admin_url("/admin/keys")).bearer_auth(TOKEN),
        c.get(gw.admin_url("/admin/keys")).bearer_auth(""),
        c.post(gw.admin_url("/admin/keys")).bearer_auth(TOKEN).body("{}"),
        c.post(gw.admin_url("/admin/reload")).bearer_auth(TOKEN),
    ] {
        assert_error(&read(req).await, 401, "authentication_error", "the admin API is closed: set admin.token");
    }
    assert_eq!(c.get(gw.admin_url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.admin_url("/metrics")).send().await.unwrap().status(), 200);
    assert_eq!(send(&gw, &alice.key).await.0, 200);
    // The CLI says so too.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&gw.config_path)
        .args(["keys", "list"])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env_remove("TOLLGATE_ADMIN_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: 401 the admin API is closed: set admin.token in the config\n"
    );
}

// ---- The CLI ----

/// `tollgate --config <gateway's config> args...`, with the token the config refers to.
fn cli_env(gw: &Gateway, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&gw.config_path)
        .args(args)
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env_remove("TOLLGATE_ADMIN_URL")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env(TOKEN_ENV, TOKEN)
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

/// Runs the CLI, expects success and returns its standard output.
#[track_caller]
fn cli(gw: &Gateway, args: &[&str]) -> String {
    let out = cli_env(gw, args, &[]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tollgate {args:?} failed: {stdout}\n{stderr}");
    assert_eq!(stderr, "", "tollgate {args:?}");
    stdout
}

#[track_caller]
fn cli_json(gw: &Gateway, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cli(gw, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tollgate {args:?} --json is not JSON ({e}): {out}"))
}

/// Runs the CLI and expects it to fail; returns its standard error.
#[track_caller]
fn cli_fails(gw: &Gateway, args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = cli_env(gw, args, envs);
    assert!(!out.status.success(), "tollgate {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.stdout, b"", "nothing on standard output when it fails");
    String::from_utf8(out.stderr).unwrap()
}

/// The `secret:` line of a create or rotate.
fn secret_of(stdout: &str) -> String {
    let secret = stdout.lines().find_map(|l| l.strip_prefix("secret: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(secret.starts_with("tg-") && secret.len() == 51, "{secret:?}");
    secret.to_string()
}

/// A table row as whitespace-separated cells, found by its first cell.
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{table}"))
}

/// Where each header's column starts, so rows can be checked to line up under it.
fn column_of(table: &str, header: &str) -> usize {
    table.lines().next().unwrap().find(header).unwrap_or_else(|| panic!("no {header} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_keys_end_to_end() {
    let s = setup().await;
    let gw = &s.gw;

    let out = cli(
        gw,
        &[
            "keys",
            "create",
            "--id",
            "cli-1",
            "--user",
            "bob",
            "--team",
            "web",
            "--models",
            "claude-sonnet-*,claude-haiku-*",
            "--budget",
            "12.5",
            "--period",
            "daily",
            "--concurrency",
            "3",
            "--expires",
            "2099-01-01T00:00:00Z",
            "--meta",
            "laptop=mbp",
            "--meta",
            "os=linux",
        ],
    );
    let secret = secret_of(&out);
    let lines: Vec<&str> = out.lines().collect();
    let field = |name: &str, value: &str| format!("{name:<9} {value}");
    assert_eq!(lines[0], field("id", "cli-1"));
    assert_eq!(lines[1], field("source", "api"));
    assert_eq!(lines[2], field("user", "bob"));
    assert_eq!(lines[3], field("team", "web"));
    assert_eq!(lines[4], field("models", "claude-sonnet-*,claude-haiku-*"));
    assert_eq!(lines[5], field("expires", "2099-01-01T00:00:00Z"));
    assert_eq!(lines[6], field("disabled", "false"));
    assert!(lines[7].starts_with("created   "), "{out}");
    assert!(lines[8].starts_with("updated   "), "{out}");
    assert_eq!(lines[9], field("budget", "$0 of $12.5 daily"));
    assert_eq!(lines[10], field("limits", "concurrency=3"));
    assert_eq!(lines[11], field("metadata", r#"{"laptop":"mbp","os":"linux"}"#));
    assert_eq!(lines[12], "");
    assert_eq!(lines[13], format!("secret: {secret}"));
    assert!(lines[14].contains("not shown again"), "{out}");

    // The secret works at the proxy at once.
    assert_eq!(send(gw, &secret).await.0, 200);
    wait_for(gw, "/admin/keys/cli-1", |v| v["status"]["budget"]["spent_usd"] == "0.0003").await;

    // The table lists both keys under their headers.
    let table = cli(gw, &["keys", "list"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "SOURCE", "USER", "TEAM", "MODELS", "SPENT", "STATE"]);
    assert_eq!(row(&table, "alice"), ["alice", "config", "alice@example.com", "platform", "-", "-", "active"]);
    assert_eq!(
        row(&table, "cli-1"),
        ["cli-1", "api", "bob", "web", "claude-sonnet-*,claude-haiku-*", "$0.0003", "of", "$12.5", "daily", "active"]
    );
    let cli_line = table.lines().find(|l| l.starts_with("cli-1")).unwrap();
    for (header, cell) in
        [("SOURCE", "api"), ("USER", "bob"), ("TEAM", "web"), ("SPENT", "$0.0003"), ("STATE", "active")]
    {
        assert_eq!(cli_line.find(cell), Some(column_of(&table, header)), "{cell} under {header}:\n{table}");
    }

    // --json is the API's own answer.
    let list = cli_json(gw, &["keys", "list"]);
    let (_, api_list) = get(gw, "/admin/keys").await;
    assert_eq!(list, api_list);
    let ids: Vec<&str> = list["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alice", "cli-1"]);
    let shown = cli_json(gw, &["keys", "show", "cli-1"]);
    assert_eq!(shown["budget"], json!({"usd": 12.5, "period": "daily"}));
    assert_eq!(shown["limits"], json!({"concurrency": 3}));
    assert_eq!(shown["metadata"], json!({"laptop": "mbp", "os": "linux"}));
    assert_eq!(shown["models"], json!(["claude-sonnet-*", "claude-haiku-*"]));
    assert_eq!(shown["status"]["budget"], budget_status("12.5", "0.0003", "12.4997", "daily", daily_bounds()));

    // Update: the flags given change, the others stay; "" and "none" clear.
    let out = cli(gw, &["keys", "update", "cli-1", "--team", "", "--budget", "20", "--period", "weekly"]);
    assert!(out.lines().any(|l| l == field("team", "-")), "{out}");
    assert!(out.lines().any(|l| l == field("user", "bob")), "{out}");
    assert!(out.lines().any(|l| l == field("budget", "$0.0003 of $20 weekly")), "{out}");
    let shown = cli_json(gw, &["keys", "show", "cli-1"]);
    assert_eq!(shown["team"], Value::Null);
    assert_eq!(shown["budget"], json!({"usd": 20.0, "period": "weekly"}));
    assert_eq!(shown["limits"], json!({"concurrency": 3}));
    let out = cli(gw, &["keys", "update", "cli-1", "--budget", "none", "--models", "", "--expires", "never"]);
    assert!(out.lines().any(|l| l == field("budget", "-")), "{out}");
    let shown = cli_json(gw, &["keys", "show", "cli-1"]);
    assert_eq!((&shown["budget"], &shown["models"], &shown["expires"]), (&Value::Null, &Value::Null, &Value::Null));

    // Disable, enable, rotate, delete.
    let out = cli(gw, &["keys", "disable", "cli-1"]);
    assert!(out.lines().any(|l| l == field("disabled", "true")), "{out}");
    assert_proxy_refuses(&send(gw, &secret).await, "disabled");
    let table = cli(gw, &["keys", "list"]);
    assert_eq!(row(&table, "cli-1").last(), Some(&"disabled"));
    let out = cli(gw, &["keys", "enable", "cli-1"]);
    assert!(out.lines().any(|l| l == field("disabled", "false")), "{out}");
    assert_eq!(send(gw, &secret).await.0, 200);
    let new_secret = secret_of(&cli(gw, &["keys", "rotate", "cli-1"]));
    assert_ne!(new_secret, secret);
    assert_proxy_refuses(&send(gw, &secret).await, "invalid API key");
    assert_eq!(send(gw, &new_secret).await.0, 200);
    assert_eq!(cli(gw, &["keys", "delete", "cli-1"]), "deleted key cli-1\n");
    assert_proxy_refuses(&send(gw, &new_secret).await, "invalid API key");
    let table = cli(gw, &["keys", "list"]);
    assert_eq!(table.lines().count(), 2, "{table}");

    // A generated id, and an id with characters the URL must escape.
    let out = cli(gw, &["keys", "create"]);
    let id = out.lines().next().unwrap().strip_prefix(&field("id", "")).unwrap().to_string();
    assert!(id.starts_with("key-") && id.len() == 16, "{out}");
    let out = cli(gw, &["keys", "create", "--id", "bob@example.com:laptop"]);
    let laptop = secret_of(&out);
    assert_eq!(cli_json(gw, &["keys", "show", "bob@example.com:laptop"])["id"], "bob@example.com:laptop");
    cli(gw, &["keys", "disable", "bob@example.com:laptop"]);
    assert_proxy_refuses(&send(gw, &laptop).await, "disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_usage_and_budgets_and_reloads() {
    let s = setup_with(Behavior { usage: cache_usage(), ..Behavior::default() }, "").await;
    let gw = &s.gw;
    let secret = secret_of(&cli(gw, &["keys", "create", "--id", "k-web", "--team", "web", "--budget", "2"]));
    for key in [&s.alice.key, &secret, &secret] {
        assert_eq!(send(gw, key).await.0, 200);
    }
    wait_ledger(gw, 3).await;

    // The default groups by team.
    let table = cli(gw, &["usage"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TEAM", "REQUESTS", "INPUT", "OUTPUT", "CACHE", "READ", "CACHE", "WRITE", "COST", "USD", "ESTIMATED"]
    );
    assert_eq!(row(&table, "web"), ["web", "2", "50", "30", "8000", "600", "0.00615", "0"]);
    assert_eq!(row(&table, "platform"), ["platform", "1", "25", "15", "4000", "300", "0.003075", "0"]);
    assert!(lines[1].starts_with("web "), "most expensive first:\n{table}");
    assert_eq!(lines[3], "total: $0.009225 (days in UTC)");
    let web_line = lines[1];
    for (header, cell) in [("REQUESTS", "2"), ("CACHE READ", "8000"), ("COST USD", "0.00615")] {
        assert_eq!(web_line.find(&format!(" {cell}")).map(|i| i + 1), Some(column_of(&table, header)), "{table}");
    }

    let day = today().to_string();
    let table = cli(gw, &["usage", "--group-by", "key,day", "--team", "web", "--from", &day]);
    assert_eq!(
        table.lines().next().unwrap().split_whitespace().take(3).collect::<Vec<_>>(),
        ["KEY", "DAY", "REQUESTS"]
    );
    assert_eq!(row(&table, "k-web"), ["k-web", day.as_str(), "2", "50", "30", "8000", "600", "0.00615", "0"]);
    assert_eq!(table.lines().count(), 3, "{table}");

    let v = cli_json(gw, &["usage", "--group-by", "key"]);
    assert_eq!(v, get(gw, "/admin/usage?group_by=key").await.1);
    assert_eq!(v["rows"][0]["group"], json!({"key": "k-web"}));
    assert_eq!(v["rows"][0]["requests"], 2);
    assert_eq!(v["rows"][0]["cost_nanos"], 2 * CACHE_COST_NANOS);
    assert_eq!(v["rows"][1]["group"], json!({"key": "alice"}));
    assert_eq!(v["rows"][1]["cache_write_1h_tokens"], 200);
    assert_eq!(v["total_cost_usd"], "0.009225");

    // Budgets: the key's, monthly by default.
    wait_for(gw, "/admin/budgets", |v| v["budgets"][0]["budget"]["spent_usd"] == "0.00615").await;
    let table = cli(gw, &["budgets"]);
    assert_eq!(
        table.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["SCOPE", "ID", "PERIOD", "LIMIT", "SPENT", "RESERVED", "REMAINING", "RESETS"]
    );
    let (_, resets) = monthly_bounds();
    assert_eq!(row(&table, "key"), ["key", "k-web", "monthly", "$2", "$0.00615", "$0", "$1.99385", resets.as_str()]);
    assert_eq!(table.lines().count(), 2, "{table}");
    let v = cli_json(gw, &["budgets"]);
    assert_eq!(v, get(gw, "/admin/budgets").await.1);

    // Reload after an edit: the team budget appears.
    let mut text = std::fs::read_to_string(&gw.config_path).unwrap();
    text.push_str("\n[[team]]\nid = \"web\"\nbudget = { usd = 50, period = \"daily\" }\n");
    std::fs::write(&gw.config_path, &text).unwrap();
    assert_eq!(cli(gw, &["reload"]), "reloaded\n");
    let table = cli(gw, &["budgets"]);
    let (_, tomorrow) = daily_bounds();
    assert_eq!(row(&table, "team"), ["team", "web", "daily", "$50", "$0.00615", "$0", "$49.99385", tomorrow.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_go_to_stderr_with_the_status() {
    let s = setup().await;
    let gw = &s.gw;
    assert_eq!(cli_fails(gw, &["keys", "show", "nope"], &[]), "error: 404 no key with id \"nope\"\n");
    assert_eq!(cli_fails(gw, &["keys", "delete", "nope"], &[]), "error: 404 no key with id \"nope\"\n");
    let err = cli_fails(gw, &["keys", "update", "alice", "--team", "web"], &[]);
    assert!(err.starts_with("error: 409 key \"alice\" is defined in the config file"), "{err}");
    let err = cli_fails(gw, &["keys", "create", "--id", "b", "--budget=-1"], &[]);
    assert!(err.starts_with("error: 400 budget: "), "{err}");
    let err = cli_fails(gw, &["keys", "create", "--id", "b", "--budget", "lots"], &[]);
    assert_eq!(err, "error: --budget \"lots\" is not a USD amount\n");
    let err = cli_fails(gw, &["keys", "create", "--id", "b", "--meta", "novalue"], &[]);
    assert_eq!(err, "error: --meta \"novalue\": write name=value\n");
    let err = cli_fails(gw, &["usage", "--group-by", "project"], &[]);
    assert!(err.starts_with("error: 400 group_by: \"project\""), "{err}");
    // A wrong token from the environment wins over the config's.
    let err = cli_fails(gw, &["keys", "list"], &[("TOLLGATE_ADMIN_TOKEN", "wrong")]);
    assert_eq!(err, "error: 401 invalid admin token\n");
    // The token the config refers to must be readable by the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&gw.config_path)
        .args(["keys", "list"])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .env_remove("TOLLGATE_ADMIN_URL")
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: admin.token: environment variable {TOKEN_ENV} is not set\n")
    );
    assert!(get(gw, "/admin/keys/b").await.0 == 404, "no failed call created a key");

    // Without the config: the URL and the token from flags and the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--config", "/nonexistent/tollgate.toml", "keys", "list", "--admin-url"])
        .arg(format!("http://127.0.0.1:{}/", gw.admin_port))
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .env_remove("TOLLGATE_ADMIN_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(row(&String::from_utf8(out.stdout).unwrap(), "alice")[0], "alice");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--config", "/nonexistent/tollgate.toml", "budgets"])
        .env("TOLLGATE_ADMIN_URL", format!("http://127.0.0.1:{}", gw.admin_port))
        .env("TOLLGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Nothing listens there.
    let dead = free_port();
    let err = cli_fails(gw, &["keys", "list", "--admin-url", &format!("http://127.0.0.1:{dead}")], &[]);
    assert!(err.starts_with(&format!("error: cannot reach the admin API at http://127.0.0.1:{dead}")), "{err}");
}

// ---- Regressions: bugs found while writing these tests. ----

/// A budget removed and later restored with the same period counts what the ledger holds for
/// the period, including the requests made while the key had no budget (the limiter's old
/// counters for the same period must not be trusted: they missed those requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_budget_counts_the_spend_made_without_it() {
    let s = setup().await;
    let gw = &s.gw;
    let (status, mut k) = post(gw, "/admin/keys", json!({"id": "p", "budget": {"usd": 5, "period": "daily"}})).await;
    assert_eq!(status, 201, "{k}");
    let secret = take_secret(&mut k);
    assert_eq!(send(gw, &secret).await.0, 200);
    wait_ledger(gw, 1).await;
    assert_eq!(patch(gw, "/admin/keys/p", json!({"budget": null})).await.0, 200);
    assert_eq!(send(gw, &secret).await.0, 200);
    wait_ledger(gw, 2).await;
    let (status, v) = patch(gw, "/admin/keys/p", json!({"budget": {"usd": 5, "period": "daily"}})).await;
    assert_eq!(status, 200, "{v}");
    let usage = get(gw, "/admin/usage?key=p").await.1;
    assert_eq!(usage["total_cost_usd"], "0.0006");
    assert_eq!(v["status"]["budget"], budget_status("5", "0.0006", "4.9994", "daily", daily_bounds()));
}

/// `keys update` keeps what is not given: the other limits (the API replaces `limits` whole,
/// so the CLI merges), and the budget's period when only `--budget` is given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_update_keeps_the_limits_and_the_period_not_given() {
    let s = setup().await;
    let gw = &s.gw;
    cli(gw, &["keys", "create", "--id", "p", "--concurrency", "3", "--budget", "5", "--period", "daily"]);
    cli(gw, &["keys", "update", "p", "--rpm", "30"]);
    assert_eq!(cli_json(gw, &["keys", "show", "p"])["limits"], json!({"concurrency": 3, "rpm": 30}));
    cli(gw, &["keys", "update", "p", "--budget", "7"]);
    assert_eq!(cli_json(gw, &["keys", "show", "p"])["budget"], json!({"usd": 7.0, "period": "daily"}));
}

/// When the config file does not parse, the CLI says why, not that it has no `[admin]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_why_the_config_cannot_be_read() {
    let s = setup().await;
    let gw = &s.gw;
    let mut text = std::fs::read_to_string(&gw.config_path).unwrap();
    text.push_str("\n[[team]]\nid = \"web\"\nbuget = 5\n");
    std::fs::write(&gw.config_path, text).unwrap();
    let err = cli_fails(gw, &["keys", "list"], &[]);
    assert!(!err.contains("has no [admin] section"), "{err}");
    assert!(err.contains("unknown field `buget`"), "{err}");
}
