//! Secrets stay inside the gateway: provider credentials (an Anthropic key, AWS keys), the JWT
//! signing secret, the admin token and the clients' own keys never appear in the debug log, the
//! audit log, metrics, `/status`, the admin API, `tollgate check`, or any answer, across
//! successes, provider errors, refused requests and a refused reload.

mod common;

use std::time::Duration;

use common::*;

const AWS_ID: &str = "AKIDSENTINELTOLLGATE";
const AWS_SECRET: &str = "aws-secret-sentinel-0123456789abcdefghij";
const JWT_SECRET: &str = "jwt-secret-sentinel-0123456789abcdefghijklmnop";
const ADMIN_TOKEN: &str = "admin-token-sentinel-0123456789";

fn config(anthropic: &MockProvider, bedrock: &MockProvider, key: &TestKey) -> String {
    format!(
        r#"
[[provider]]
name = "anthropic"
kind = "anthropic"
base_url = "{a}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[provider]]
name = "bedrock"
kind = "bedrock"
region = "us-east-1"
base_url = "{b}"
aws = {{ access_key_id = "env:TG_AWS_ID", secret_access_key = "env:TG_AWS_SECRET" }}
health = {{ probe = "none" }}

[[model]]
name = "m"
deployments = [{{ provider = "anthropic" }}]

[[model]]
name = "b"
deployments = [{{ provider = "bedrock", model = "anthropic.claude-sonnet-4-5-20250929-v1:0" }}]

[[price]]
match = "anthropic.*"
input = 3.0
output = 15.0
cache_read = 0.3
cache_write_5m = 3.75
cache_write_1h = 6.0

[[jwt_issuer]]
name = "helper"
algorithms = ["HS256"]
secrets = [{{ kid = "k1", secret = "env:TG_JWT_SECRET" }}]

[[key]]
id = "a"
hash = "{hash}"
"#,
        a = anthropic.url(),
        b = bedrock.url(),
        hash = key.hash
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leave_the_gateway() {
    let anthropic = MockProvider::start(Behavior::default()).await.unwrap();
    let bedrock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let envs = [
        ("TG_AWS_ID", AWS_ID),
        ("TG_AWS_SECRET", AWS_SECRET),
        ("TG_JWT_SECRET", JWT_SECRET),
        ("TG_ADMIN_TOKEN", ADMIN_TOKEN),
        // Everything the gateway and Pingora log, short of Pingora's trace level.
        ("TOLLGATE_LOG", "debug"),
    ];
    let gw = start_gateway_logged("token = \"env:TG_ADMIN_TOKEN\"", &envs, &config(&anthropic, &bedrock, &key));
    let mut seen = String::new();
    let mut note = |what: &str, status: u16, headers: &reqwest::header::HeaderMap, body: &str| {
        seen.push_str(&format!("--- {what}: {status}\n{headers:?}\n{body}\n"));
    };

    // Successes on both providers, streamed and not; provider errors; refused requests.
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>);
    let cases: Vec<Case> = vec![
        ("anthropic", messages_body("m", false, 1), vec![]),
        ("anthropic stream", messages_body("m", true, 1), vec![]),
        ("bedrock", messages_body("b", false, 1), vec![]),
        ("bedrock stream", messages_body("b", true, 1), vec![]),
        ("provider 401", messages_body("m", false, 1), vec![("x-mock-status", "401".into())]),
        ("provider 500", messages_body("b", false, 1), vec![("x-mock-status", "500".into())]),
        ("bad JSON", "{nope".into(), vec![]),
        ("unknown model", messages_body("nope", false, 1), vec![]),
    ];
    for (what, body, headers) in cases {
        let req = headers.iter().fold(messages_request(&gw, &key), |r, (n, v)| r.header(*n, v.as_str()));
        let resp = req.body(body).send().await.unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        note(what, status, &headers, &resp.text().await.unwrap());
    }
    // A wrong key, a forged JWT, a wrong admin token.
    let wrong =
        client().post(gw.url("/v1/messages")).header("x-api-key", "tg-wrong").body(messages_body("m", false, 1));
    let resp = wrong.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    note("wrong key", status, &headers, &resp.text().await.unwrap());
    let forged = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    let resp = client()
        .post(gw.url("/v1/messages"))
        .bearer_auth(forged)
        .body(messages_body("m", false, 1))
        .send()
        .await
        .unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    note("forged JWT", status, &headers, &resp.text().await.unwrap());

    // Everything the admin listener shows.
    for path in ["/metrics", "/status", "/readyz", "/admin/keys", "/admin/budgets", "/admin/usage?group_by=key"] {
        let resp = client().get(gw.admin_url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        assert!(status < 500, "{path}: {status}");
        note(path, status, &headers, &resp.text().await.unwrap());
    }
    let resp = client().get(gw.admin_url("/admin/keys")).bearer_auth("not-the-token").send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    note("wrong admin token", status, &headers, &resp.text().await.unwrap());

    // A reload that fails (a secret that cannot be read), then `tollgate check` on the config.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, text.replace("env:TG_AWS_SECRET", "env:TG_NOT_SET")).unwrap();
    let resp = client().post(gw.admin_url("/admin/reload")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    note("refused reload", status, &headers, &resp.text().await.unwrap());
    std::fs::write(&gw.config_path, &text).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config"])
        .arg(&gw.config_path)
        .env("TG_TEST_PROVIDER_KEY", PROVIDER_SECRET)
        .envs(envs)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    seen.push_str(&String::from_utf8_lossy(&check.stdout));
    seen.push_str(&String::from_utf8_lossy(&check.stderr));

    // The audit log holds every request by now.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.records().len() < 10 {
        assert!(std::time::Instant::now() < deadline, "{} records", gw.records().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let audit = std::fs::read_to_string(&gw.audit_path).unwrap();
    let log = gw.log();
    // The secrets did reach the providers (the test would prove nothing otherwise) ...
    assert_eq!(anthropic.received()[0].headers["x-api-key"], PROVIDER_SECRET);
    let auth = bedrock.received()[0].headers["authorization"].to_str().unwrap().to_string();
    assert!(auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={AWS_ID}/")), "{auth}");
    // ... and the log is a debug log, not an empty one.
    assert!(log.contains("DEBUG"), "{log}");

    for (name, secret) in [
        ("provider key", PROVIDER_SECRET),
        ("AWS access key id", AWS_ID),
        ("AWS secret", AWS_SECRET),
        ("JWT secret", JWT_SECRET),
        ("admin token", ADMIN_TOKEN),
        ("client key", key.key.as_str()),
    ] {
        for (place, text) in [("answers and admin pages", &seen), ("audit log", &audit), ("gateway log", &log)] {
            assert!(!text.contains(secret), "the {name} appears in the {place}");
        }
    }
}
