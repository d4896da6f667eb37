//! The spend console (`/console` on the admin listener) in a real browser: Debian's Chromium,
//! headless, driven by playwright-core (`tests/console/console.mjs`), both installed by
//! `scripts/console-deps.sh`.
//!
//! The test starts the gateway in front of the mock provider with keys in two teams (a team
//! budget on `t1`, a key budget, an rpm limit on `t2`'s key), sends twenty requests of varied
//! usage (streamed and not, two models, one stream cut short so its usage is an estimate, one
//! refused by the rpm limit), then reads the ledger's own numbers from `/admin/usage`,
//! `/admin/budgets` and `/metrics` with the admin token and hands them to the browser script,
//! which signs in with the keyboard, compares every figure the page draws with them, creates,
//! uses, rotates and disables a key through the page, and checks the session cookie and the CSRF
//! guard. Screenshots (1366x768) go to `console-screenshots/` in the target folder. Last, the key
//! the page created is checked from here through the admin API.
//!
//! Missing browser or playwright-core fails the test with the command that installs them.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "console-test-admin-token-5d2e81";
const TOKEN_ENV: &str = "TG_TEST_ADMIN_TOKEN";
/// The key the browser creates (tests/console/console.mjs).
const CREATED: &str = "console-created";
/// The whole browser run, beyond which it is killed.
const BROWSER_DEADLINE: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pinned playwright-core (`tests/console/versions.env`), unless the environment says.
fn playwright_pin() -> String {
    if let Some(v) = std::env::var("PLAYWRIGHT_CORE_VERSION").ok().filter(|v| !v.is_empty()) {
        return v;
    }
    let text = std::fs::read_to_string(repo().join("tests/console/versions.env")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "PLAYWRIGHT_CORE_VERSION")
        .map(|(_, v)| v.trim().to_string())
        .expect("PLAYWRIGHT_CORE_VERSION in tests/console/versions.env")
}

/// `TOLLGATE_CONSOLE_NODE_PATH` and `TOLLGATE_CHROMIUM`, or where scripts/console-deps.sh puts
/// them; fails with the command that installs them when they are not there.
fn find_browser() -> (PathBuf, PathBuf) {
    let node_path = std::env::var_os("TOLLGATE_CONSOLE_NODE_PATH").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("TOLLGATE_CONSOLE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".cache/console"))
            .join(format!("playwright-core-{}", playwright_pin()))
            .join("node_modules")
    });
    let chromium =
        std::env::var_os("TOLLGATE_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    for (what, path) in [
        ("playwright-core", node_path.join("playwright-core/index.mjs")),
        ("Chromium", chromium.clone()),
        ("node", PathBuf::from("node")),
    ] {
        let there = if what == "node" {
            Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success())
        } else {
            path.exists()
        };
        assert!(
            there,
            "\n\nThe spend console's browser test needs {what}, and it is not installed ({} not found).\n\
             Install Chromium and the pinned playwright-core (apt-get as root, npm; cached in .cache/console/) with\n\n    \
             scripts/console-deps.sh\n\n\
             or run the test as `scripts/test --test console`, which installs them first and sets\n\
             TOLLGATE_CONSOLE_NODE_PATH and TOLLGATE_CHROMIUM; alone: `export $(scripts/console-deps.sh)`\n\
             before `cargo test --test console`.\n",
            path.display()
        );
    }
    (node_path, chromium)
}

/// `console-screenshots/` in the target folder (wherever CARGO_TARGET_DIR puts it).
fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("the target folder").join("console-screenshots")
}

fn config(mock: &MockProvider, keys: &[&TestKey; 3]) -> String {
    format!(
        r#"
[[provider]]
name = "mock"
kind = "anthropic"
base_url = "{url}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[model]]
name = "m"
deployments = [{{ provider = "mock", model = "claude-sonnet-4-5-20250929" }}]

[[model]]
name = "h"
deployments = [{{ provider = "mock", model = "claude-haiku-4-5-20251001" }}]

[[key]]
id = "k1"
hash = "{h1}"
user = "ana"
team = "t1"

[[key]]
id = "k2"
hash = "{h2}"
user = "ben"
team = "t1"
budget = {{ usd = 2, period = "daily" }}

[[key]]
id = "k3"
hash = "{h3}"
user = "cy"
team = "t2"
limits = {{ rpm = 4 }}

[[team]]
id = "t1"
budget = {{ usd = 10, period = "monthly" }}
"#,
        url = mock.url(),
        h1 = keys[0].hash,
        h2 = keys[1].hash,
        h3 = keys[2].hash,
    )
}

/// The `i`-th request's usage: every token class shows up somewhere, no two requests alike.
fn usage(i: u64) -> String {
    json!({
        "input_tokens": 120 + 37 * i,
        "output_tokens": 25 + 11 * i,
        "cache_read_input_tokens": if i.is_multiple_of(3) { 2000 + 100 * i } else { 0 },
        "cache_creation_5m_input_tokens": if i % 4 == 1 { 300 + i } else { 0 },
        "cache_creation_1h_input_tokens": if i % 5 == 2 { 150 + i } else { 0 },
    })
    .to_string()
}

/// Sends one request; its status and whether its body came whole.
async fn send(gw: &Gateway, key: &TestKey, model: &str, stream: bool, headers: &[(&str, String)]) -> (u16, bool) {
    let body = json!({
        "model": model,
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    });
    let mut req = messages_request(gw, key).body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.is_ok())
}

async fn admin_get(gw: &Gateway, path: &str) -> Value {
    let resp = client().get(gw.admin_url(path)).bearer_auth(TOKEN).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "GET {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {text}"))
}

/// One column of a one-group usage report, by the group's value.
type Column = BTreeMap<String, Value>;

/// `cost_usd`, `requests` and `estimated` of a one-group usage report, by the group's value.
fn by_group(report: &Value, group: &str) -> (Column, Column, Column) {
    let (mut usd, mut requests, mut estimated) = (Column::new(), Column::new(), Column::new());
    for row in report["rows"].as_array().unwrap() {
        let name = row["group"][group].as_str().unwrap_or_else(|| panic!("a row without {group}: {row}")).to_string();
        usd.insert(name.clone(), row["cost_usd"].clone());
        requests.insert(name.clone(), row["requests"].clone());
        estimated.insert(name, row["estimated"].clone());
    }
    (usd, requests, estimated)
}

/// `tollgate_refused_total` by reason, from `/metrics`.
async fn refusals(gw: &Gateway) -> BTreeMap<String, u64> {
    let text = client().get(gw.admin_url("/metrics")).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("tollgate_refused_total{reason=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(reason, n)| (reason.to_string(), n.trim().parse::<f64>().unwrap() as u64))
        .collect()
}

/// Runs the browser script; its exit status and what it printed.
fn run_browser(envs: Vec<(&'static str, String)>) -> (std::process::ExitStatus, String) {
    let script = repo().join("tests/console/console.mjs");
    let mut child = Command::new("node")
        .arg(&script)
        .envs(envs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Shown as it comes (the test's output), and kept.
    let out = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let err = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    let deadline = Instant::now() + BROWSER_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser test ran past {BROWSER_DEADLINE:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    if !err.trim().is_empty() {
        println!("--- node's stderr ---\n{err}");
    }
    (status, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_console_in_a_real_browser() {
    let (node_path, chromium) = find_browser();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let keys = [new_key(), new_key(), new_key()];
    let gw = start_gateway_admin(
        &format!("token = \"env:{TOKEN_ENV}\""),
        &[(TOKEN_ENV, TOKEN)],
        &config(&mock, &[&keys[0], &keys[1], &keys[2]]),
    );

    // Twenty requests: k1 and k2 (team t1) on both models, streamed and not; one of k2's
    // streams cut short (its usage an estimate); k3 (team t2, 4 per minute) once too often.
    let mut sent = 0;
    for i in 0..8u64 {
        let model = if i % 2 == 0 { "m" } else { "h" };
        assert_eq!(send(&gw, &keys[0], model, i % 3 != 1, &[("x-mock-usage", usage(i))]).await, (200, true));
        sent += 1;
    }
    for i in 8..14u64 {
        let model = if i % 3 == 0 { "h" } else { "m" };
        assert_eq!(send(&gw, &keys[1], model, i % 2 == 0, &[("x-mock-usage", usage(i))]).await, (200, true));
        sent += 1;
    }
    let cut = [("x-mock-usage", usage(14)), ("x-mock-cut-after", "5".to_string())];
    assert_eq!(send(&gw, &keys[1], "m", true, &cut).await, (200, false), "the cut stream reaches the client cut");
    sent += 1;
    for i in 15..19u64 {
        assert_eq!(send(&gw, &keys[2], "h", i % 2 == 1, &[("x-mock-usage", usage(i))]).await, (200, true));
        sent += 1;
    }
    assert_eq!(send(&gw, &keys[2], "h", false, &[("x-mock-usage", usage(19))]).await.0, 429, "k3's fifth request");
    sent += 1;
    assert_eq!(mock.received().len(), sent - 1);
    gw.wait_for_records(sent);

    // The ledger's own numbers, once settled (two reads in a row alike).
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(10);
    let total = loop {
        let now = admin_get(&gw, "/admin/usage").await;
        if now == last && now["rows"][0]["cost_nanos"].as_u64().unwrap_or(0) > 0 {
            break now;
        }
        assert!(Instant::now() < deadline, "the ledger never settled: {now}");
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let teams = admin_get(&gw, "/admin/usage?group_by=team").await;
    let team_days = admin_get(&gw, "/admin/usage?group_by=team,day").await;
    let models = admin_get(&gw, "/admin/usage?group_by=model").await;
    let budgets = admin_get(&gw, "/admin/budgets").await;
    let refused = refusals(&gw).await;
    assert_eq!(refused.get("rpm"), Some(&1), "{refused:?}");
    let row = &total["rows"][0];
    let (by_team, requests_by_team, estimated_by_team) = by_group(&teams, "team");
    assert_eq!(by_team.keys().collect::<Vec<_>>(), ["t1", "t2"]);
    assert_eq!(estimated_by_team["t1"], 1, "the cut stream's usage is an estimate: {teams}");
    let (by_model, requests_by_model, _) = by_group(&models, "model");
    assert_eq!(by_model.values().filter(|usd| *usd != "0").count(), 2, "two models spent: {models}");
    let by_team_day: BTreeMap<String, Value> = team_days["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                format!("{} {}", r["group"]["team"].as_str().unwrap(), r["group"]["day"].as_str().unwrap()),
                r["cost_usd"].clone(),
            )
        })
        .collect();
    let budget_list: Vec<Value> = budgets["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            json!({
                "scope": b["scope"],
                "id": b["id"],
                "spent_usd": b["budget"]["spent_usd"],
                "limit_usd": b["budget"]["limit_usd"],
            })
        })
        .collect();
    let expect = json!({
        "total_usd": total["total_cost_usd"],
        "by_team": by_team,
        "requests_by_team": requests_by_team,
        "estimated_by_team": estimated_by_team,
        "by_team_day": by_team_day,
        "by_model": by_model,
        "requests_by_model": requests_by_model,
        "tokens": {
            "input": row["input_tokens"],
            "output": row["output_tokens"],
            "cache_read": row["cache_read_tokens"],
            "cache_write": row["cache_write_5m_tokens"].as_u64().unwrap() + row["cache_write_1h_tokens"].as_u64().unwrap(),
        },
        "budgets": budget_list,
        "providers": ["mock"],
        "refusals": {"rpm": 1},
        "keys": ["k1", "k2", "k3"],
    });
    assert_eq!(expect["budgets"].as_array().unwrap().len(), 2, "{budgets}");
    let expect_file = gw.dir.path().join("console-expect.json");
    std::fs::write(&expect_file, serde_json::to_string_pretty(&expect).unwrap()).unwrap();
    println!("the ledger's numbers for the browser:\n{}", serde_json::to_string_pretty(&expect).unwrap());

    let shots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let envs = vec![
        ("TOLLGATE_CONSOLE_NODE_PATH", node_path.display().to_string()),
        ("TOLLGATE_CHROMIUM", chromium.display().to_string()),
        ("CONSOLE_URL", gw.admin_url("/console")),
        ("ADMIN_TOKEN", TOKEN.to_string()),
        ("GATEWAY_URL", gw.url("")),
        ("EXPECT", expect_file.display().to_string()),
        ("SCREENSHOTS", shots.display().to_string()),
    ];
    // The browser talks to the gateway and the gateway to the mock, which runs on this
    // runtime: the wait blocks a thread of its own.
    let (status, out) = tokio::task::spawn_blocking(move || run_browser(envs)).await.unwrap();
    let fail_line = out.lines().find(|l| l.starts_with("CONSOLE-FAIL")).unwrap_or("(no CONSOLE-FAIL line)");
    assert!(status.success(), "the browser test failed ({status}): {fail_line}\nscreenshots in {}", shots.display());
    let ok = out.lines().find_map(|l| l.strip_prefix("CONSOLE-OK ")).expect("a CONSOLE-OK line");
    let summary: Value = serde_json::from_str(ok).unwrap();
    assert_eq!(summary["total_usd"], expect["total_usd"]);
    assert_eq!(summary["disabled_key_status"], 401, "a disabled key is refused with 401 (tests/admin.rs)");
    println!("screenshots: {}", shots.display());

    // What the page did, seen from the admin API: the key exists as the form said, disabled.
    let list = admin_get(&gw, "/admin/keys").await;
    let created = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == CREATED)
        .unwrap_or_else(|| panic!("no key {CREATED} in /admin/keys: {list}"));
    assert_eq!(created["source"], "api", "{created}");
    assert_eq!(created["team"], "t1", "{created}");
    assert_eq!(created["budget"], json!({"usd": 5.0, "period": "monthly"}), "{created}");
    assert_eq!(created["limits"]["rpm"], 100, "{created}");
    assert_eq!(created["disabled"], true, "{created}");
    assert!(
        list["keys"].as_array().unwrap().iter().all(|k| k["id"] != "csrf-probe"),
        "a refused POST made a key: {list}"
    );
    // Its two answered requests (the first secret, then the rotated one) are in the audit log.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = gw.records();
        let mine: Vec<&Value> = records.iter().filter(|r| r["key_id"] == CREATED).collect();
        let answered = mine.iter().filter(|r| r["status"] == 200).count();
        if answered == 2 {
            break;
        }
        assert!(answered < 2 && Instant::now() < deadline, "{answered} answered requests of {CREATED}: {mine:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
