//! Sign-in with the company's identity provider, end to end with real parts: panva's certified
//! `oidc-provider` on loopback (tests/sso/idp.mjs, from scripts/sso-deps.sh) with its users and
//! groups, each device sign-in approved in headless Chromium (tests/sso/approve.mjs, from
//! scripts/console-deps.sh), the real `tollgate login` and `tollgate token` commands, and Claude
//! Code (from scripts/conformance-deps.sh) with `apiKeyHelper = "tollgate token"` against the
//! mock provider.
//!
//! Missing node packages or browser fail the tests with the command that installs them.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "sso-test-admin-token-93be";
const CLIENT_SECRET: &str = "s3cret-of-the-gateway-at-the-idp";
const SIGNING_SECRET: &str = "the gateway's own token signing master secret, 48+ bytes";
const CLIENT_ID: &str = "tollgate";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tollgate() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

fn pin(file: &str, name: &str) -> String {
    if let Some(v) = std::env::var(name).ok().filter(|v| !v.is_empty()) {
        return v;
    }
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("{name} in {file}"))
}

/// Where the node packages and the browser are, or a failure naming the command that installs them.
struct Tools {
    sso_node_path: PathBuf,
    console_node_path: PathBuf,
    chromium: PathBuf,
}

fn tools() -> Tools {
    let cache = |var: &str, dir: &str, pkg: String| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".cache").join(dir).join(pkg).join("node_modules"))
    };
    let t = Tools {
        sso_node_path: cache(
            "TOLLGATE_SSO_NODE_PATH",
            "sso",
            format!("oidc-provider-{}", pin("tests/sso/versions.env", "OIDC_PROVIDER_VERSION")),
        ),
        console_node_path: cache(
            "TOLLGATE_CONSOLE_NODE_PATH",
            "console",
            format!("playwright-core-{}", pin("tests/console/versions.env", "PLAYWRIGHT_CORE_VERSION")),
        ),
        chromium: std::env::var_os("TOLLGATE_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/bin/chromium".into()),
    };
    for (what, path) in [
        ("oidc-provider", t.sso_node_path.join("oidc-provider")),
        ("playwright-core", t.console_node_path.join("playwright-core")),
        ("Chromium", t.chromium.clone()),
    ] {
        assert!(
            path.exists(),
            "\n\nThe SSO tests need {what}, and it is not installed ({} not found).\n\
             Install them (npm, apt-get as root; cached in .cache/) with\n\n    \
             scripts/sso-deps.sh && scripts/console-deps.sh\n\n\
             or run the tests as `scripts/test --test sso`, which installs them first.\n",
            path.display()
        );
    }
    t
}

/// The identity provider, killed when dropped.
struct Idp {
    child: Child,
    issuer: String,
    _dir: tempfile::TempDir,
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Alice is in `eng`, Bob in `data`, Carol in `eng` and `data`; every password is `<id>-pw`.
fn start_idp(t: &Tools) -> Idp {
    let dir = tempfile::tempdir().unwrap();
    let user = |id: &str, name: &str, groups: &[&str]| {
        json!({"id": id, "password": format!("{id}-pw"), "email": format!("{id}@example.com"), "name": name,
               "groups": groups, "disabled": false})
    };
    let state = json!({
        "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": ["http://127.0.0.1:1/sso/callback"]}],
        "users": [user("alice", "Alice", &["eng"]), user("bob", "Bob", &["data"]), user("carol", "Carol", &["data", "eng"])],
        "access_token_ttl": 300, "id_token_ttl": 300, "refresh_token_ttl": 86400,
    });
    let state_path = dir.path().join("state.json");
    std::fs::write(&state_path, state.to_string()).unwrap();
    let mut child = Command::new("node")
        .arg(repo().join("tests/sso/idp.mjs"))
        .arg(&state_path)
        .env("TOLLGATE_SSO_NODE_PATH", &t.sso_node_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let issuer = line.trim().strip_prefix("ready ").unwrap_or_else(|| panic!("idp.mjs said {line:?}")).to_string();
    Idp { child, issuer, _dir: dir }
}

impl Idp {
    async fn set_user(&self, id: &str, change: Value) {
        let resp = client().post(format!("{}/test/users/{id}", self.issuer)).json(&change).send().await.unwrap();
        assert_eq!(resp.status(), 200, "changing {id} at the identity provider");
    }
}

fn sso_section(issuer: &str, token_lifetime: &str) -> String {
    format!(
        r#"
[sso]
issuer = "{issuer}"
allow_http = true
client_id = "{CLIENT_ID}"
client_secret = "env:TG_TEST_SSO_CLIENT_SECRET"
signing_secret = "env:TG_TEST_SSO_SIGNING_SECRET"
token_lifetime = "{token_lifetime}"
key_rotation = "1h"

[[sso.group]]
name = "eng"
team = "eng"
models = ["sonnet"]
budget = {{ usd = 50, period = "monthly" }}
settings = {{ permissions = {{ deny = ["Bash(curl:*)"] }}, env = {{ TEAM = "eng" }} }}

[[sso.group]]
name = "data"
team = "data"
models = ["haiku"]
budget = {{ usd = 5, period = "daily" }}
settings = {{ permissions = {{ allow = ["Read"], deny = ["WebFetch"] }}, env = {{ TEAM = "data", WAREHOUSE = "on" }} }}
"#
    )
}

fn gateway_config(mock_url: &str, key: &TestKey) -> String {
    format!(
        r#"
[[provider]]
name = "mock"
kind = "anthropic"
base_url = "{mock_url}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[model]]
name = "sonnet"
patterns = ["*sonnet*"]
deployments = [{{ provider = "mock", model = "claude-sonnet-4-5-20250929" }}]

[[model]]
name = "haiku"
patterns = ["*haiku*"]
deployments = [{{ provider = "mock", model = "claude-haiku-4-5-20251001" }}]

[[key]]
id = "ops"
hash = "{hash}"
"#,
        hash = key.hash
    )
}

fn start(idp: &Idp, mock_url: &str, token_lifetime: &str) -> Gateway {
    start_gateway_admin(
        "token = \"env:TG_TEST_ADMIN_TOKEN\"",
        &[
            ("TG_TEST_ADMIN_TOKEN", ADMIN_TOKEN),
            ("TG_TEST_SSO_CLIENT_SECRET", CLIENT_SECRET),
            ("TG_TEST_SSO_SIGNING_SECRET", SIGNING_SECRET),
        ],
        &(gateway_config(mock_url, &new_key()) + &sso_section(&idp.issuer, token_lifetime)),
    )
}

/// Approves a device sign-in as `user` (password `<user>-pw`) in the browser.
fn approve(t: &Tools, url: &str, user: &str) -> std::process::Output {
    Command::new("node")
        .arg(repo().join("tests/sso/approve.mjs"))
        .args([url, user, &format!("{user}-pw")])
        .env("TOLLGATE_CONSOLE_NODE_PATH", &t.console_node_path)
        .env("TOLLGATE_CHROMIUM", &t.chromium)
        .output()
        .unwrap()
}

/// The identity provider, the mock provider, and a gateway whose tokens live `token_lifetime`.
async fn setup(token_lifetime: &str) -> (Tools, Idp, MockProvider, Gateway) {
    let t = tools();
    let idp = start_idp(&t);
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let gw = start(&idp, &mock.url(), token_lifetime);
    (t, idp, mock, gw)
}

/// A person's machine: its own credentials folder.
struct Machine {
    home: tempfile::TempDir,
}

impl Machine {
    fn new() -> Self {
        Machine { home: tempfile::tempdir().unwrap() }
    }

    fn tollgate(&self) -> Command {
        let mut cmd = Command::new(tollgate());
        cmd.env("TOLLGATE_HOME", self.home.path().join("tollgate"));
        cmd
    }

    /// `tollgate login`, approved in the browser as `user`; what it printed last.
    fn login(&self, t: &Tools, gw: &Gateway, user: &str) -> Result<String, String> {
        let mut child = self
            .tollgate()
            .args(["login", "--gateway", &gw.url("")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let url = line
            .strip_prefix("To sign in, open ")
            .and_then(|rest| rest.split(" and confirm the code ").next())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("tollgate login printed {line:?}")
            })
            .to_string();
        let approved = approve(t, &url, user);
        let approval =
            String::from_utf8_lossy(&approved.stdout).trim().to_string() + &String::from_utf8_lossy(&approved.stderr);
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tollgate login did not finish after the approval ({approval})");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        if status.success() {
            assert!(approved.status.success(), "the approval failed ({approval}) but login succeeded");
            Ok(rest)
        } else {
            Err(format!("{err} (approval: {approval})"))
        }
    }

    /// `tollgate token [--refresh]`: the token, or the error it printed.
    fn token(&self, refresh: bool) -> Result<String, String> {
        let mut cmd = self.tollgate();
        cmd.arg("token");
        if refresh {
            cmd.arg("--refresh");
        }
        let out = cmd.output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).unwrap().trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

async fn models(gw: &Gateway, token: &str) -> (u16, Vec<String>) {
    let resp = client().get(gw.url("/v1/models")).bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    let ids = v["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str()).map(str::to_string).collect();
    (status, ids)
}

async fn ask(gw: &Gateway, token: &str, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client().post(gw.url("/v1/messages")).header("x-api-key", token).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

async fn admin(gw: &Gateway, method: reqwest::Method, path: &str) -> Value {
    let resp = client().request(method, gw.admin_url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

fn assert_401(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 401, "{what}: {body}");
    assert_eq!(body["type"], "error", "{what}: {body}");
    assert_eq!(body["error"]["type"], "authentication_error", "{what}: {body}");
}

fn claude_code() -> PathBuf {
    std::env::var_os("TOLLGATE_CONFORMANCE_CLAUDE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("TOLLGATE_CONFORMANCE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".cache/conformance"))
            .join(format!("npm-{}", pin("tests/conformance/versions.env", "CLAUDE_CODE_VERSION")))
            .join("node_modules/.bin/claude")
    })
}

/// Claude Code with `apiKeyHelper` set to `tollgate token`: the whole client setup.
fn run_claude(machine: &Machine, gw: &Gateway, model: &str) -> std::process::Output {
    let claude = claude_code();
    assert!(claude.exists(), "Claude Code is not installed at {}: run scripts/conformance-deps.sh", claude.display());
    let home = machine.home.path();
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    let helper = format!("{} token", tollgate());
    std::fs::write(home.join(".claude/settings.json"), json!({ "apiKeyHelper": helper }).to_string()).unwrap();
    Command::new(claude)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("TOLLGATE_HOME", home.join("tollgate"))
        .env("ANTHROPIC_BASE_URL", gw.url(""))
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .current_dir(home)
        .args(["-p", "Say hello", "--model", model, "--output-format", "json"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn credentials_mode(machine: &Machine) -> u32 {
    std::fs::metadata(machine.home.path().join("tollgate/credentials.json")).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn claude_code_after_tollgate_login_is_governed_as_the_person_and_their_team() {
    let (t, _idp, _mock, gw) = setup("1h").await;
    let alice = Machine::new();

    let said = alice.login(&t, &gw, "alice").unwrap();
    assert_eq!(said, format!("Signed in to {} as alice@example.com (team eng)\n", gw.url("")));
    assert_eq!(credentials_mode(&alice), 0o600);
    let dir_mode = std::fs::metadata(alice.home.path().join("tollgate")).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);

    let out = run_claude(&alice, &gw, "claude-sonnet-4-5");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "claude: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let result: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    assert_eq!(result["is_error"], false, "{stdout}");

    // Every request Claude Code made is the person's, in their team, on their own key scope.
    // Claude Code has exited, but its last request's record may still be on its way: a row is
    // queued for the ledger before its record is written, so wait until the two agree.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (records, usage) = loop {
        let records = gw.records();
        let usage = admin(&gw, reqwest::Method::GET, "/admin/usage?group_by=user,team").await;
        if !records.is_empty() && usage["rows"][0]["requests"].as_u64() == Some(records.len() as u64) {
            break (records, usage);
        }
        assert!(Instant::now() < deadline, "{} records; the ledger: {usage}", records.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for r in &records {
        assert_eq!(r["user"], "alice@example.com", "{r}");
        assert_eq!(r["team"], "eng", "{r}");
        assert_eq!(r["key_id"], "sso:alice@example.com", "{r}");
        assert_eq!(r["auth"], "sso", "{r}");
        assert_eq!(r["status"], 200, "{r}");
    }
    // And the ledger says the same, to the nano-dollar of the audit records.
    let rows = usage["rows"].as_array().cloned().unwrap_or_default();
    let cost: u64 = records.iter().map(|r| r["cost_nanos"].as_u64().unwrap()).sum();
    assert_eq!(rows.len(), 1, "{usage}");
    let group = &rows[0]["group"];
    assert_eq!((group["user"].as_str(), group["team"].as_str()), (Some("alice@example.com"), Some("eng")), "{usage}");
    assert_eq!(rows[0]["cost_nanos"].as_u64(), Some(cost), "{usage}");
    assert_eq!(rows[0]["requests"].as_u64(), Some(records.len() as u64), "{usage}");

    // The admin sees the person, their groups, team and sign-in.
    let people = admin(&gw, reqwest::Method::GET, "/admin/people").await;
    let p = &people["people"][0];
    assert_eq!((p["user"].as_str(), p["team"].as_str()), (Some("alice@example.com"), Some("eng")), "{people}");
    assert_eq!(p["groups"], json!(["eng"]));
    assert_eq!(p["sessions"].as_array().unwrap().len(), 1);

    // The sign-in is in the audit log, with the session the ledger's tokens belong to.
    let events = gw.events();
    let sign_in = events.iter().find(|e| e["event"] == "sign_in").unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(sign_in["user"], "alice@example.com");
    assert_eq!((sign_in["team"].as_str(), sign_in["by"].as_str()), (Some("eng"), Some("person")));
    assert_eq!(sign_in["groups"], json!(["eng"]));
    assert_eq!(sign_in["session"], p["sessions"][0]["id"]);
    assert_eq!(sign_in["client_ip"], "127.0.0.1");

    // `tollgate logout` ends the sign-in at the gateway, not only on this machine.
    let token = alice.token(false).unwrap();
    let out = alice.tollgate().arg("logout").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Signed out\n");
    assert!(!alice.home.path().join("tollgate/credentials.json").exists());
    let (status, body) = ask(&gw, &token, "claude-sonnet-4-5").await;
    assert_401(status, &body, "a token of a signed-out sign-in");
    // The audit writer takes its queue every 20 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.events().iter().any(|e| e["event"] == "sign_out" && e["user"] == "alice@example.com") {
        assert!(Instant::now() < deadline, "no sign_out event: {:?}", gw.events());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn groups_give_models_budgets_and_settings_and_a_group_change_applies_at_the_next_token() {
    let (t, idp, _mock, gw) = setup("1h").await;
    let (alice, bob, carol) = (Machine::new(), Machine::new(), Machine::new());
    alice.login(&t, &gw, "alice").unwrap();
    bob.login(&t, &gw, "bob").unwrap();
    carol.login(&t, &gw, "carol").unwrap();
    let (ta, tb, tc) = (alice.token(false).unwrap(), bob.token(false).unwrap(), carol.token(false).unwrap());

    // The listing holds each allowed route and the Claude model ids its patterns take.
    let only =
        |list: &[String], family: &str| list.contains(&family.to_string()) && list.iter().all(|m| m.contains(family));
    let (status, a) = models(&gw, &ta).await;
    assert!(status == 200 && only(&a, "sonnet"), "{a:?}");
    let (status, b) = models(&gw, &tb).await;
    assert!(status == 200 && only(&b, "haiku"), "{b:?}");
    // Carol is in both: every listed group's models, the first listed group's team and budget.
    let (status, mut both) = models(&gw, &tc).await;
    assert_eq!(status, 200);
    both.sort();
    let mut union = [a.clone(), b.clone()].concat();
    union.sort();
    assert_eq!(both, union);
    assert_eq!(ask(&gw, &ta, "claude-sonnet-4-5").await.0, 200);
    assert_eq!(ask(&gw, &tb, "claude-haiku-4-5").await.0, 200);
    assert_eq!(ask(&gw, &tc, "claude-haiku-4-5").await.0, 200);
    let (status, body) = ask(&gw, &tb, "claude-sonnet-4-5").await;
    assert_eq!((status, body["error"]["type"].as_str()), (403, Some("permission_error")), "{body}");

    // Each person's own budget is their first group's, counting what they spent.
    gw.wait_for_records(4);
    let spent = |user: &str| {
        tollgate::metering::usd(
            gw.records().iter().filter(|r| r["user"] == user).map(|r| r["cost_nanos"].as_u64().unwrap()).sum(),
        )
    };
    let people = admin(&gw, reqwest::Method::GET, "/admin/people").await;
    let budget = |user: &str| {
        let p = people["people"].as_array().unwrap().iter().find(|p| p["user"] == user).unwrap();
        let b = &p["budget"];
        let text = |f: &str| b[f].as_str().unwrap_or_default().to_string();
        (text("limit_usd"), text("period"), text("spent_usd"))
    };
    let expect = |limit: &str, period: &str, user: &str| (limit.to_string(), period.to_string(), spent(user));
    assert_eq!(budget("alice@example.com"), expect("50", "monthly", "alice@example.com"));
    assert_eq!(budget("bob@example.com"), expect("5", "daily", "bob@example.com"));
    // Carol's groups come as ["data", "eng"]; eng is listed first in the config, so it decides.
    assert_eq!(budget("carol@example.com"), expect("50", "monthly", "carol@example.com"));
    assert_ne!(spent("bob@example.com"), "0");
    let teams: Vec<(String, String)> = gw
        .records()
        .iter()
        .map(|r| (r["user"].as_str().unwrap().to_string(), r["team"].as_str().unwrap().to_string()))
        .collect();
    for (user, team) in [("alice@example.com", "eng"), ("bob@example.com", "data"), ("carol@example.com", "eng")] {
        assert!(teams.contains(&(user.into(), team.into())), "{teams:?}");
    }

    // Managed settings: the groups' settings merged, the first listed group winning.
    let out = carol.tollgate().arg("settings").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let settings: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        settings,
        json!({"permissions": {"deny": ["Bash(curl:*)"], "allow": ["Read"]}, "env": {"TEAM": "eng", "WAREHOUSE": "on"}})
    );

    // Alice moves from eng to data at the identity provider: her next token carries it.
    idp.set_user("alice", json!({"groups": ["data"]})).await;
    assert_eq!(models(&gw, &ta).await.1, a, "the token held still says eng");
    let fresh = alice.token(true).unwrap();
    assert_ne!(fresh, ta);
    assert_eq!(models(&gw, &fresh).await, (200, b.clone()));
    let (status, body) = ask(&gw, &fresh, "claude-sonnet-4-5").await;
    assert_eq!(status, 403, "{body}");
    // Out of every listed group: no new token.
    idp.set_user("alice", json!({"groups": ["sales"]})).await;
    let refused = alice.token(true).unwrap_err();
    assert!(refused.contains("403") && refused.contains("in no group"), "{refused}");
    // Back in a group: the sign-in was kept, the next token carries it.
    idp.set_user("alice", json!({"groups": ["eng"]})).await;
    assert_eq!(models(&gw, &alice.token(true).unwrap()).await, (200, a.clone()));

    // Renamed at the identity provider: budgets and revocations know people by name, so the
    // sign-in ends and Carol signs in again as who she is now.
    idp.set_user("carol", json!({"email": "carol.new@example.com"})).await;
    let refused = carol.token(true).unwrap_err();
    assert!(refused.contains("401") && refused.contains("names you differently"), "{refused}");
    assert_401(ask(&gw, &tc, "claude-haiku-4-5").await.0, &ask(&gw, &tc, "claude-haiku-4-5").await.1, "renamed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_person_is_refused_within_a_token_lifetime_and_a_revocation_is_immediate() {
    // Tokens live 12 s: long enough for Bob's sign-in in the browser while Alice's is held,
    // short enough to wait one out.
    let (t, idp, _mock, mut gw) = setup("12s").await;
    let (alice, bob) = (Machine::new(), Machine::new());
    alice.login(&t, &gw, "alice").unwrap();
    let ta = alice.token(false).unwrap();
    let issued = Instant::now();
    bob.login(&t, &gw, "bob").unwrap();
    let tb = bob.token(false).unwrap();

    // Disabled at the identity provider: the token held works until it expires (the gateway
    // learns of it at the next refresh), and not past its lifetime.
    idp.set_user("alice", json!({"disabled": true})).await;
    assert_eq!(ask(&gw, &ta, "claude-sonnet-4-5").await.0, 200);

    // Revoked by an admin: refused at once, and no new token either.
    let revoked = admin(&gw, reqwest::Method::POST, "/admin/people/bob@example.com/revoke").await;
    assert_eq!(revoked["sessions_revoked"], 1, "{revoked}");
    let (status, body) = ask(&gw, &tb, "claude-haiku-4-5").await;
    assert_401(status, &body, "a revoked sign-in's token");
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
    let refused = bob.token(true).unwrap_err();
    assert!(refused.contains("401"), "{refused}");

    // Within one token lifetime, Alice's token is done too.
    let left = Duration::from_secs(12).saturating_sub(issued.elapsed()) + Duration::from_millis(1100);
    tokio::time::sleep(left).await;
    let (status, body) = ask(&gw, &ta, "claude-sonnet-4-5").await;
    assert_401(status, &body, "an expired token");
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
    // And `tollgate token` cannot get another: the identity provider refuses, the sign-in ends.
    let refused = alice.token(false).unwrap_err();
    assert!(refused.contains("401") && refused.contains("ended this sign-in"), "{refused}");

    // A restart forgets nothing: the revoked sign-in stays revoked.
    gw.stop();
    gw.restart();
    let refused = bob.token(true).unwrap_err();
    assert!(refused.contains("401"), "{refused}");

    // Disabled in the gateway: a new sign-in is refused although the identity provider agrees.
    admin(&gw, reqwest::Method::POST, "/admin/people/bob@example.com/disable").await;
    let failed = bob.login(&t, &gw, "bob").unwrap_err();
    assert!(failed.contains("disabled in this gateway"), "{failed}");
    admin(&gw, reqwest::Method::POST, "/admin/people/bob@example.com/enable").await;
    bob.login(&t, &gw, "bob").unwrap();
    assert_eq!(ask(&gw, &bob.token(false).unwrap(), "claude-haiku-4-5").await.0, 200);

    // The audit log tells the story: sign-ins, the identity provider's refusal, the admin's acts
    // (once the audit writer, every 20 ms, has taken the last of them).
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.events().len() < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events: Vec<(String, String, String)> = gw
        .events()
        .iter()
        .map(|e| {
            let s = |f: &str| e[f].as_str().unwrap_or_default().to_string();
            (s("event"), s("user"), s("by"))
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("sign_in", "alice@example.com", "person"),
        ("sign_in", "bob@example.com", "person"),
        ("revoke", "bob@example.com", "admin"),
        ("token_refused", "bob@example.com", "person"),
        ("token_refused", "alice@example.com", "person"),
        ("token_refused", "bob@example.com", "person"),
        ("disable", "bob@example.com", "admin"),
        ("sign_in_refused", "bob@example.com", "person"),
        ("enable", "bob@example.com", "admin"),
        ("sign_in", "bob@example.com", "person"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(events, expected);

    // The people listing shows who was revoked.
    let people = admin(&gw, reqwest::Method::GET, "/admin/people").await;
    let bob_entry =
        people["people"].as_array().unwrap().iter().find(|p| p["user"] == "bob@example.com").unwrap().clone();
    let sessions = bob_entry["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{bob_entry}");
    assert_eq!(sessions.iter().filter(|s| s["revoked_ms"].is_null()).count(), 1, "{bob_entry}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_the_gateway_must_not_accept_get_401_in_the_anthropic_shape() {
    use tollgate::sso::token::{TokenClaims, TokenKeys, TOKEN_ISSUER};
    let (t, idp, _mock, gw) = setup("1h").await;
    let alice = Machine::new();
    alice.login(&t, &gw, "alice").unwrap();
    let good = alice.token(false).unwrap();
    assert_eq!(ask(&gw, &good, "claude-sonnet-4-5").await.0, 200);

    let now = tollgate::auth::unix_now();
    let claims = |aud: &str, iat: u64, exp: u64| TokenClaims {
        iss: TOKEN_ISSUER.into(),
        aud: aud.into(),
        sub: "alice".into(),
        user: "alice@example.com".into(),
        groups: vec!["eng".into()],
        sid: "made-up".into(),
        iat,
        exp,
    };
    let keys =
        |secret: &str| TokenKeys::new(secret.as_bytes(), Duration::from_secs(3600), Duration::from_secs(3600)).unwrap();
    let ours = keys(SIGNING_SECRET);
    let theirs = keys("somebody else's master secret, long enough to pass");
    let cases = [
        ("expired", ours.sign(&claims(TOKEN_ISSUER, now - 600, now - 60)), "expired"),
        ("wrong audience", ours.sign(&claims("another-gateway", now, now + 600)), "not meant for this gateway"),
        ("wrong signature", theirs.sign(&claims(TOKEN_ISSUER, now, now + 600)), "signature"),
    ];
    for (what, token, says) in cases {
        let (status, body) = ask(&gw, &token, "claude-sonnet-4-5").await;
        assert_401(status, &body, what);
        assert!(body["error"]["message"].as_str().unwrap().contains(says), "{what}: {body}");
        let (status, _) = models(&gw, &token).await;
        assert_eq!(status, 401, "{what} on /v1/models");
    }

    // A token from the identity provider itself: this gateway trusts only its own.
    let start: Value = client()
        .post(format!("{}/device/auth", idp.issuer))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("scope", "openid email groups")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let approved = approve(&t, start["verification_uri_complete"].as_str().unwrap(), "alice");
    assert!(approved.status.success(), "{}", String::from_utf8_lossy(&approved.stderr));
    let tokens: Value = client()
        .post(format!("{}/token", idp.issuer))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", start["device_code"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for field in ["id_token", "access_token"] {
        let token = tokens[field].as_str().unwrap_or_else(|| panic!("no {field}: {tokens}"));
        let (status, body) = ask(&gw, token, "claude-sonnet-4-5").await;
        assert_401(status, &body, &format!("the identity provider's {field}"));
    }

    // Revoked: the person's real token, after the admin revoked their sign-in.
    admin(&gw, reqwest::Method::POST, "/admin/people/alice@example.com/revoke").await;
    let (status, body) = ask(&gw, &good, "claude-sonnet-4-5").await;
    assert_401(status, &body, "revoked");

    // The sign-in endpoints refuse what they cannot use, in the same shape.
    let resp = client()
        .post(gw.url("/sso/refresh"))
        .json(&json!({"refresh_token": "tgr-not-a-session"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_401(status, &resp.json().await.unwrap(), "an unknown refresh credential");
    let resp = client().post(gw.url("/sso/device/token")).body("not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    // A device code this gateway did not hand out never reaches the identity provider.
    let resp =
        client().post(gw.url("/sso/device/token")).json(&json!({"device_code": "guessed"})).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_needs_an_sso_section_and_the_credentials_file_stays_private() {
    // Without [sso], the endpoints say so.
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&gateway_config(&mock.url(), &key));
    let resp = client().post(gw.url("/sso/device")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("[sso]"), "{body}");
    // `tollgate token` before any login names the command to run.
    let m = Machine::new();
    let err = m.token(false).unwrap_err();
    assert!(err.contains("tollgate login"), "{err}");
}

/// A PostgreSQL database of the test's own on the machine's server (`test` reachable with trust
/// authentication, as on CI machines), dropped at the end.
async fn create_database() -> (String, String) {
    let connect = |db: &str| {
        let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("this test needs PostgreSQL at 127.0.0.1:5432 (database test): {e}"));
            tokio::spawn(conn);
            client
        }
    };
    let admin = connect("test").await;
    let name = format!("tg_sso_{:016x}", rand::random::<u64>());
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    (name.clone(), format!("postgres://postgres@127.0.0.1:5432/{name}"))
}

async fn drop_database(name: &str) {
    let (client, conn) =
        tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/test", tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_on_postgresql_shares_sign_ins_and_revocations() {
    let t = tools();
    let idp = start_idp(&t);
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let (db, url) = create_database().await;
    let node = || {
        start_gateway_store(
            "backend = \"postgres\"\nurl = \"env:TG_TEST_PG_URL\"",
            "token = \"env:TG_TEST_ADMIN_TOKEN\"",
            &[
                ("TG_TEST_PG_URL", url.as_str()),
                ("TG_TEST_ADMIN_TOKEN", ADMIN_TOKEN),
                ("TG_TEST_SSO_CLIENT_SECRET", CLIENT_SECRET),
                ("TG_TEST_SSO_SIGNING_SECRET", SIGNING_SECRET),
            ],
            &(gateway_config(&mock.url(), &new_key()) + &sso_section(&idp.issuer, "1h")),
        )
    };
    let (a, b) = (node(), node());
    let alice = Machine::new();
    alice.login(&t, &a, "alice").unwrap();
    let token = alice.token(false).unwrap();
    // Signed in at one gateway, governed at the other: same keys, same sign-in.
    assert_eq!(ask(&b, &token, "claude-sonnet-4-5").await.0, 200);

    // The sign-in is in the shared database: the other gateway renews it.
    let path = alice.home.path().join("tollgate/credentials.json");
    let mut creds: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    creds["gateway"] = json!(b.url("").trim_end_matches('/'));
    std::fs::write(&path, creds.to_string()).unwrap();
    let renewed = alice.token(true).unwrap();
    assert_eq!(ask(&a, &renewed, "claude-sonnet-4-5").await.0, 200);

    // Revoked at one gateway: refused there at once, at the other within its sync (2 s).
    admin(&b, reqwest::Method::POST, "/admin/people/alice@example.com/revoke").await;
    assert_eq!(ask(&b, &renewed, "claude-sonnet-4-5").await.0, 401);
    let revoked_at = Instant::now();
    loop {
        let (status, body) = ask(&a, &renewed, "claude-sonnet-4-5").await;
        if status == 401 {
            assert_401(status, &body, "revoked at the other gateway");
            break;
        }
        assert!(revoked_at.elapsed() < Duration::from_secs(5), "still {status} at the other gateway after 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(alice.token(true).unwrap_err().contains("401"));
    drop((a, b));
    drop_database(&db).await;
}
