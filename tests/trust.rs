//! What the gateway trusts, and what it lets cross: client credentials and provider control
//! headers never reach a provider, provider headers reach clients only by name, a wildcard
//! listener stands in for its keyless clients, bodies must be UTF-8, JWKS URLs are HTTPS (no
//! redirects, no huge sets), a key's concurrency bounds the bodies it can make the gateway hold,
//! and JWT principals are counted in bounded memory however many there are.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VERTEX_BASE: &str = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models";

/// The shared secret of the HS256 issuers (at least 32 bytes).
const SECRET: &str = "tollgate-test-hmac-secret-0123456789abcdef";
const SECRET_ENV: &str = "TG_TEST_JWT_SECRET";
const ADMIN_TOKEN: &str = "admin-test-token-trust-4b9d";
const ADMIN_TOKEN_ENV: &str = "TG_TEST_ADMIN_TOKEN";

/// Tests that load the machine (hundreds of connections, tens of thousands of requests) run one
/// at a time:
/// with two cores, two of them at once would measure each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A valid token of the `helper` issuer for `user` of `team`; every call gives a distinct one.
fn token(user: &str, team: &str) -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let t = now();
    let claims = json!({
        "user": user,
        "team": team,
        "iat": t,
        "exp": t + 600,
        "jti": format!("t{}", SERIAL.fetch_add(1, Ordering::Relaxed)),
    });
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

const HS256_ISSUER: &str = "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\n\
                            secrets = [{ kid = \"k1\", secret = \"env:TG_TEST_JWT_SECRET\" }]\n";

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn metrics(gw: &Gateway) -> String {
    client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The value of an unlabelled metric.
fn gauge(metrics: &str, name: &str) -> u64 {
    let prefix = format!("{name} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
        .trim()
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The three client formats on the three provider kinds.
// ---------------------------------------------------------------------------------------------

/// Providers `anthropic`, `bedrock` (which lets the client's guardrail header through) and
/// `vertex` on the three mocks, a model on each, key `k`, the `helper` issuer, then `extra`.
fn three_providers(a: &MockProvider, b: &MockProvider, v: &MockProvider, key: &TestKey, extra: &str) -> String {
    let providers = provider_sections(
        [&a.url(), &b.url(), &v.url()],
        ["", "allow_headers = [\"x-amzn-bedrock-guardrailidentifier\"]", ""],
    );
    format!(
        r#"{providers}
[[model]]
name = "on-anthropic"
max_attempts = 1
deployments = [{{ provider = "anthropic", model = "claude-sonnet-4-5-20250929" }}]

[[model]]
name = "on-bedrock"
max_attempts = 1
deployments = [{{ provider = "bedrock", model = "anthropic.claude-sonnet-4-5-20250929-v1:0" }}]

[[model]]
name = "on-vertex"
max_attempts = 1
deployments = [{{ provider = "vertex", model = "claude-sonnet-4-5@20250929" }}]

[[key]]
id = "k"
hash = "{hash}"

{HS256_ISSUER}
{extra}
"#,
        hash = key.hash
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    Anthropic,
    Bedrock,
    Vertex,
}

const CLIENTS: [Client; 3] = [Client::Anthropic, Client::Bedrock, Client::Vertex];
const MODELS: [(&str, &str); 3] = [("on-anthropic", "anthropic"), ("on-bedrock", "bedrock"), ("on-vertex", "vertex")];

/// One request in `client`'s format for `model`, without a credential: the caller adds it and
/// any other header.
fn request(gw: &Gateway, client: Client, model: &str, stream: bool) -> reqwest::RequestBuilder {
    let messages = json!([{"role": "user", "content": "hi"}]);
    let (path, body) = match client {
        Client::Anthropic => (
            "/v1/messages".to_string(),
            json!({"model": model, "max_tokens": 100, "stream": stream, "messages": messages}),
        ),
        Client::Bedrock => (
            format!("/model/{model}/{}", if stream { "invoke-with-response-stream" } else { "invoke" }),
            json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100, "messages": messages}),
        ),
        Client::Vertex => (
            format!("{VERTEX_BASE}/{model}:{}", if stream { "streamRawPredict" } else { "rawPredict" }),
            json!({"anthropic_version": "vertex-2023-10-16", "stream": stream, "max_tokens": 100, "messages": messages}),
        ),
    };
    let req = common::client().post(gw.url(&path)).body(body.to_string());
    match client {
        Client::Anthropic => req.header("anthropic-version", "2023-06-01"),
        _ => req,
    }
}

/// Headers providers send with their answers: cookies, the provider account's id, edge and
/// routing headers, a date of their own (none of the client's business), and request ids and
/// rate-limit and Bedrock headers (which are).
const PROVIDER_HEADERS: &str = r#"{"set-cookie":"a=b","anthropic-organization-id":"org-1","cf-ray":"x","x-envoy-upstream-service-time":"3","anthropic-ratelimit-requests-remaining":"7","server":"provider-edge","via":"1.1 edge","x-amz-apigw-id":"gw-1","date":"Thu, 01 Jan 1970 00:00:00 GMT","x-amzn-requestid":"aws-1","x-amzn-bedrock-invocation-latency":"12"}"#;

/// The names of [`PROVIDER_HEADERS`] a client gets (with the answer's own).
const PROVIDER_ALLOWED: &[&str] =
    &["anthropic-ratelimit-requests-remaining", "x-amzn-requestid", "x-amzn-bedrock-invocation-latency"];

/// Headers the gateway's own HTTP/1.1 layer (Pingora) puts on every answer: its request id, and
/// its own `Date` and `Connection` (the provider's `Date` is not passed on).
const GATEWAY_OWN: &[&str] = &["x-tollgate-request-id", "date", "connection"];

fn names(headers: &reqwest::header::HeaderMap) -> BTreeSet<String> {
    headers.keys().map(|k| k.as_str().to_string()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Request headers.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_and_provider_controls_never_reach_a_provider() {
    let (a, b, v) = three_mocks(Behavior::default()).await;
    let key = new_key();
    let gw = start_gateway_sections(
        "key_header = \"x-tollgate-key\"",
        "",
        "",
        &[(SECRET_ENV, SECRET)],
        &three_providers(&a, &b, &v, &key, ""),
    );
    let jwt = token("alice", "x");
    // Every way a client presents a credential, each with the other credential headers holding
    // values of their own (which the gateway ignores, and must not pass on either).
    let ways: [(&str, Vec<(&str, String)>); 4] = [
        ("x-api-key", vec![("x-api-key", key.key.clone()), ("cookie", "session=client-cookie".into())]),
        ("bearer key", vec![("authorization", format!("Bearer {}", key.key))]),
        (
            "bearer JWT",
            vec![("authorization", format!("Bearer {jwt}")), ("proxy-authorization", "Basic Y2xpZW50".into())],
        ),
        (
            "key header",
            vec![
                ("x-tollgate-key", key.key.clone()),
                ("authorization", "Bearer ya29.client-google-token".into()),
                ("x-api-key", "client-x-api-key-decoy".into()),
            ],
        ),
    ];
    let secrets = [
        key.key.as_str(),
        jwt.as_str(),
        "client-cookie",
        "Y2xpZW50",
        "ya29.client-google-token",
        "client-x-api-key-decoy",
    ];
    // Provider controls a client may try to set: AWS guardrails, tiers and tokens, Google's
    // billed project and API key.
    let controls = [
        ("x-amzn-bedrock-guardrailidentifier", "client-guardrail"),
        ("x-amzn-bedrock-guardrailversion", "7"),
        ("x-amzn-bedrock-performanceconfig-latency", "optimized"),
        ("x-amz-security-token", "client-aws-token"),
        ("X-Amz-Date", "20250101T000000Z"),
        ("x-goog-user-project", "someone-elses-project"),
        ("x-goog-api-key", "client-google-key"),
    ];
    for (way, credential) in &ways {
        for (model, provider) in MODELS {
            let case = format!("{way}, {provider} provider");
            let mut req = request(&gw, Client::Anthropic, model, false)
                .header("x-claude-code-session-id", "session-1")
                .header("anthropic-beta", "context-1m-2025-08-07")
                .header("x-custom-client-header", "kept");
            for (name, value) in credential.iter() {
                req = req.header(*name, value);
            }
            for (name, value) in controls {
                req = req.header(name, value);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200, "{case}: {}", resp.text().await.unwrap());
            let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
            let r = gw.record(&rid);
            let (auth, key_id) = if *way == "bearer JWT" { ("jwt", "helper:alice") } else { ("key", "k") };
            assert_eq!((r["auth"].as_str(), r["key_id"].as_str()), (Some(auth), Some(key_id)), "{case}");

            let mock = match provider {
                "anthropic" => &a,
                "bedrock" => &b,
                _ => &v,
            };
            let got = mock.received().pop().unwrap();
            let h = &got.headers;
            // The credential headers hold exactly the gateway's own provider credential.
            if provider == "anthropic" {
                assert_eq!(h.get_all("x-api-key").iter().collect::<Vec<_>>(), [PROVIDER_SECRET], "{case}");
                assert!(h.get("authorization").is_none(), "{case}: {h:?}");
            } else {
                let bearer = format!("Bearer {PROVIDER_SECRET}");
                assert_eq!(h.get_all("authorization").iter().collect::<Vec<_>>(), [bearer.as_str()], "{case}");
                assert!(h.get("x-api-key").is_none(), "{case}: {h:?}");
            }
            for name in ["proxy-authorization", "cookie", "x-tollgate-key"] {
                assert!(h.get(name).is_none(), "{case}: {name} reached the provider: {h:?}");
            }
            // Provider controls are dropped, but for the one the bedrock provider allows.
            let reached: Vec<&str> =
                h.keys().map(|k| k.as_str()).filter(|n| n.starts_with("x-amz") || n.starts_with("x-goog")).collect();
            let allowed: &[&str] = if provider == "bedrock" { &["x-amzn-bedrock-guardrailidentifier"] } else { &[] };
            assert_eq!(reached, allowed, "{case}");
            if provider == "bedrock" {
                assert_eq!(h["x-amzn-bedrock-guardrailidentifier"], "client-guardrail", "{case}");
            }
            // Everything else passes as it came.
            assert_eq!(h["x-claude-code-session-id"], "session-1", "{case}");
            assert_eq!(h["x-custom-client-header"], "kept", "{case}");
            if provider == "anthropic" {
                assert_eq!(h["anthropic-beta"], "context-1m-2025-08-07", "{case}");
            }
            // No value the client sent as a credential is anywhere in what the provider got.
            let all = format!("{h:?}");
            for s in secrets {
                assert!(!all.contains(s), "{case}: {s:?} reached the provider: {all}");
            }
            assert!(!all.contains("client-aws-token") && !all.contains("someone-elses-project"), "{case}: {all}");
        }
    }

    // A Bedrock client's guardrail header, on its own format, reaches Bedrock too; its AWS
    // signature headers (it signed for the gateway, not for AWS) do not.
    let resp = request(&gw, Client::Bedrock, "on-bedrock", false)
        .header("authorization", format!("Bearer {}", key.key))
        .header("x-amzn-bedrock-guardrailidentifier", "g-2")
        .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
        .header("x-amz-date", "20250101T000000Z")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = b.received().pop().unwrap();
    let reached: Vec<&str> = got.headers.keys().map(|k| k.as_str()).filter(|n| n.starts_with("x-amz")).collect();
    assert_eq!(reached, ["x-amzn-bedrock-guardrailidentifier"]);
    assert_eq!(got.headers["x-amzn-bedrock-guardrailidentifier"], "g-2");
    assert_eq!(got.headers["authorization"], format!("Bearer {PROVIDER_SECRET}"));
}

// ---------------------------------------------------------------------------------------------
// 2. Response headers.
// ---------------------------------------------------------------------------------------------

/// Every cell of the matrix, streamed and not, answered with [`PROVIDER_HEADERS`] among the
/// mock's own: the client sees exactly the allowed names, plus `extra`.
async fn response_header_matrix(gw: &Gateway, key: &TestKey, extra: &[&str]) {
    for stream in [false, true] {
        for client in CLIENTS {
            for (model, provider) in MODELS {
                let case = format!("{client:?} client, {provider} provider, stream {stream}");
                let resp = request(gw, client, model, stream)
                    .header("x-api-key", &key.key)
                    .header("x-mock-response-headers", PROVIDER_HEADERS)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "{case}");
                let got = names(resp.headers());
                // What the provider said about the answer, its rate limits and its request id,
                // the gateway's own id, and the framing; no cookie, account id or routing header.
                let mut want = set(&["content-type", "request-id"]);
                want.extend(set(PROVIDER_ALLOWED));
                want.extend(set(GATEWAY_OWN));
                if stream {
                    want.extend(set(&["cache-control", "transfer-encoding"]));
                } else {
                    want.insert("content-length".into());
                }
                want.extend(set(extra));
                assert_eq!(got, want, "{case}");
                assert_eq!(resp.headers()["anthropic-ratelimit-requests-remaining"], "7", "{case}");
                assert_eq!(resp.headers()["x-amzn-requestid"], "aws-1", "{case}");
                assert_ne!(resp.headers()["date"], "Thu, 01 Jan 1970 00:00:00 GMT", "{case}: the provider's date");
                if !extra.is_empty() {
                    assert_eq!(resp.headers()["x-envoy-upstream-service-time"], "3", "{case}");
                }
                // The answer itself is whole.
                let body = resp.bytes().await.unwrap();
                assert!(!body.is_empty(), "{case}");
            }
        }
    }
    // A provider's error: from a provider of the client's own format it passes as it came,
    // headers filtered the same way; from another, it is restated in the client's format under
    // the gateway's own head, which keeps only the provider's retry advice.
    let error_headers = PROVIDER_HEADERS.replace('}', r#","retry-after":"1","x-should-retry":"false"}"#);
    for status in [400u16, 429] {
        for client in CLIENTS {
            for (model, provider) in MODELS {
                let case = format!("{status}: {client:?} client, {provider} provider");
                let resp = request(gw, client, model, false)
                    .header("x-api-key", &key.key)
                    .header("x-mock-response-headers", &error_headers)
                    .header("x-mock-status", status.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), status, "{case}");
                let got = names(resp.headers());
                let mut want = set(&["content-type", "content-length", "request-id"]);
                want.extend(set(GATEWAY_OWN));
                let same_format = format!("{client:?}").to_lowercase() == provider;
                if same_format {
                    want.extend(set(&["retry-after", "x-should-retry"]));
                    want.extend(set(PROVIDER_ALLOWED));
                    want.extend(set(extra));
                    if provider == "bedrock" {
                        want.insert("x-amzn-errortype".into());
                    }
                } else {
                    want.extend(set(&["retry-after", "x-should-retry"]));
                    if client == Client::Bedrock {
                        want.insert("x-amzn-errortype".into());
                    }
                }
                assert_eq!(got, want, "{case}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_only_the_allowed_provider_response_headers() {
    let (a, b, v) = three_mocks(Behavior::default()).await;
    let key = new_key();
    let gw = start_gateway_sections("", "", "", &[(SECRET_ENV, SECRET)], &three_providers(&a, &b, &v, &key, ""));
    response_header_matrix(&gw, &key, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_response_headers_let_named_ones_through() {
    let (a, b, v) = three_mocks(Behavior::default()).await;
    let key = new_key();
    let gw = start_gateway_sections(
        "response_headers = [\"x-envoy-upstream-service-time\"]",
        "",
        "",
        &[(SECRET_ENV, SECRET)],
        &three_providers(&a, &b, &v, &key, ""),
    );
    response_header_matrix(&gw, &key, &["x-envoy-upstream-service-time"]).await;
}

// ---------------------------------------------------------------------------------------------
// 3. A wildcard listener.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_listener_serves_keyless_requests_as_its_key() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let wildcard = free_port();
    // A second listener, on every address, after the harness's own (on 127.0.0.1, without an
    // anonymous key).
    let second = format!("\n[[listener]]\naddress = \"0.0.0.0:{wildcard}\"\nanonymous_key = \"k\"\n");
    let config = format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"mock\" }}]\n\
         [[key]]\nid = \"k\"\nhash = \"{}\"\n[[key]]\nid = \"other\"\nhash = \"{}\"\n",
        mock.url(),
        key.hash,
        new_key().hash
    );
    let gw = start_gateway_sections("", &second, "", &[], &config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", wildcard)).is_err() {
        assert!(Instant::now() < deadline, "the wildcard listener did not open");
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let url = format!("http://127.0.0.1:{wildcard}/v1/messages");

    // No credential at all, to 127.0.0.1 on the wildcard listener's port: key k.
    let resp = client().post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let r = gw.record(&rid);
    assert_eq!((r["auth"].as_str(), r["key_id"].as_str()), (Some("listener"), Some("k")), "{r}");
    assert_eq!(r["status"], 200);

    // A key sent there is still the key.
    let resp = client().post(&url).header("x-api-key", &key.key).body(body.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    assert_eq!(gw.record(&rid)["auth"], "key");
    // A wrong one is refused: the listener only stands in for no key.
    let resp = client().post(&url).header("x-api-key", "tg-wrong").body(body.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // The 127.0.0.1 listener has no anonymous key: keyless requests there are refused.
    let resp = client().post(gw.url("/v1/messages")).body(body).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(mock.received().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 4. Bodies that are not UTF-8.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_utf8_is_refused_before_any_provider() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&one_provider_config(&mock.url(), &key));
    let prefix = br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":""#;
    let bodies: Vec<(Vec<u8>, usize)> = vec![
        // A lone 0xFF.
        ([&prefix[..], b"\xff\"}]}"].concat(), prefix.len()),
        // A UTF-16 surrogate encoded in UTF-8 (CESU-8), and a truncated sequence.
        ([&prefix[..], b"ok \xed\xa0\x80\"}]}"].concat(), prefix.len() + 3),
        ([&prefix[..], b"\xe2\x82\"}]}"].concat(), prefix.len()),
    ];
    for (body, offset) in bodies {
        for stream_header in [false, true] {
            let mut req = messages_request(&gw, &key).body(body.clone());
            if stream_header {
                req = req.header("accept", "text/event-stream");
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 400);
            let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.starts_with("the body is not valid UTF-8"), "{message}");
            assert_eq!(message, format!("the body is not valid UTF-8: invalid byte at offset {offset}"));
            assert_eq!(gw.record(&rid)["status"], 400);
        }
    }
    assert!(mock.received().is_empty(), "a body that is not UTF-8 reached the provider");
}

// ---------------------------------------------------------------------------------------------
// 5. JWKS hardening.
// ---------------------------------------------------------------------------------------------

fn check_with_issuer(issuer: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.toml")).unwrap();
    std::fs::write(&path, format!("{shipped}\n{issuer}")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .arg(&path)
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .unwrap()
}

#[test]
fn config_check_wants_https_jwks_urls() {
    let issuer = |url: &str, allow: bool| {
        format!(
            "[[jwt_issuer]]\nname = \"idp\"\nalgorithms = [\"ES256\"]\njwks_url = \"{url}\"\n{}",
            if allow { "jwks_allow_http = true\n" } else { "" }
        )
    };
    for (url, allow) in [
        ("https://idp.example/.well-known/jwks.json", false),
        ("https://idp.example/.well-known/jwks.json", true),
        ("http://127.0.0.1:9/jwks.json", true),
        ("http://localhost:9/jwks.json", true),
        ("http://[::1]:9/jwks.json", true),
    ] {
        let out = check_with_issuer(&issuer(url, allow));
        assert!(out.status.success(), "{url} (allow_http {allow}): {}", String::from_utf8_lossy(&out.stderr));
    }
    for (url, allow, message) in [
        ("http://idp.example/.well-known/jwks.json", false, "must be https"),
        ("http://127.0.0.1:9/jwks.json", false, "must be https"),
        ("http://localhost:9/jwks.json", false, "must be https"),
        ("http://idp.example/.well-known/jwks.json", true, "jwks_allow_http is for loopback addresses only"),
        ("http://10.0.0.5/jwks.json", true, "jwks_allow_http is for loopback addresses only"),
        ("http://127.0.0.1.nip.io/jwks.json", true, "jwks_allow_http is for loopback addresses only"),
        // The user-info part is no host: the host here is evil.example.
        ("http://127.0.0.1@evil.example/jwks.json", true, "jwks_allow_http is for loopback addresses only"),
        ("ftp://idp.example/jwks.json", false, "must be an https URL"),
        ("file:///etc/jwks.json", true, "jwks_url"),
        ("idp.example/jwks.json", false, "jwks_url"),
    ] {
        let out = check_with_issuer(&issuer(url, allow));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url} (allow_http {allow}) was accepted");
        assert!(stderr.contains("JWT issuer \"idp\""), "{stderr}");
        assert!(stderr.contains(message), "{url}: {stderr:?} should contain {message:?}");
    }
}

#[test]
fn the_gateway_will_not_start_on_a_plain_http_jwks_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.toml")).unwrap();
    let issuer =
        "[[jwt_issuer]]\nname = \"idp\"\nalgorithms = [\"ES256\"]\njwks_url = \"http://127.0.0.1:9/jwks.json\"\n";
    std::fs::write(&path, format!("{shipped}\n{issuer}")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("ANTHROPIC_API_KEY", "sk-ant-unused")
        .env("TOLLGATE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the gateway started on a plain HTTP jwks_url");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("must be https"), "{stderr}");
}

fn es256_token(kp: &rcgen::KeyPair, kid: &str, user: &str) -> String {
    let t = now();
    let claims = json!({"user": user, "team": "x", "iat": t, "exp": t + 600});
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap()).unwrap()
}

fn jwks_issuer(url: &str) -> String {
    format!(
        "[[jwt_issuer]]\nname = \"idp\"\nalgorithms = [\"ES256\"]\njwks_url = \"{url}\"\njwks_allow_http = true\njwks_refresh = \"1s\"\n"
    )
}

/// `token` on the Messages API: the status and the error message, if any.
async fn send_token(gw: &Gateway, token: &str) -> (u16, String) {
    let body = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let resp = client().post(gw.url("/v1/messages")).header("x-api-key", token).body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (status, v["error"]["message"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_redirect_is_not_followed() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // The set the redirect points to is valid, and holds the key that signs the token.
    let target = CannedServer::start(200, &[], json!({"keys": [ec_jwk(&kp, "A")]}).to_string().into_bytes());
    let redirect = CannedServer::start(302, &[("location", target.url.as_str())], b"{}".to_vec());
    let gw = start_gateway_logged(
        "",
        &[],
        &format!("{}\n{}", one_provider_config(&mock.url(), &key), jwks_issuer(&redirect.url)),
    );
    // Several refreshes (every second, sooner after a failure) have run.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redirect.hits() < 3 {
        assert!(Instant::now() < deadline, "the gateway stopped fetching the set");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, message) = send_token(&gw, &es256_token(&kp, "A", "alice")).await;
    assert_eq!(status, 401, "{message}");
    assert!(message.contains("JWT key id \"A\" is unknown to issuer \"idp\""), "{message}");
    assert_eq!(target.hits(), 0, "the redirect was followed");
    let log = gw.log();
    assert!(log.contains(&format!("JWKS at {} answered 302", redirect.url)), "{log}");

    // The same set at the configured URL is used (so the refusal above was for the redirect).
    redirect.serve(json!({"keys": [ec_jwk(&kp, "A")]}).to_string().into_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, message) = send_token(&gw, &es256_token(&kp, "A", "alice")).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the set was never taken: {status} {message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(target.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_larger_than_1_mib_is_refused() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // A valid set holding the signing key, padded to `size` bytes with a member nobody reads.
    let padded = |size: usize| {
        let bare = json!({"keys": [ec_jwk(&kp, "A")], "padding": ""}).to_string();
        let doc = json!({"keys": [ec_jwk(&kp, "A")], "padding": "p".repeat(size - bare.len())}).to_string();
        assert_eq!(doc.len(), size);
        doc.into_bytes()
    };
    let jwks = CannedServer::start(200, &[], padded((1 << 20) + 1));
    let gw = start_gateway_logged(
        "",
        &[],
        &format!("{}\n{}", one_provider_config(&mock.url(), &key), jwks_issuer(&jwks.url)),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while jwks.hits() < 2 {
        assert!(Instant::now() < deadline, "the gateway stopped fetching the set");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, message) = send_token(&gw, &es256_token(&kp, "A", "alice")).await;
    assert_eq!(status, 401, "a set of 1 MiB + 1 byte was taken: {message}");
    assert!(message.contains("JWT key id \"A\" is unknown to issuer \"idp\""), "{message}");
    let log = gw.log();
    assert!(log.contains("the body is larger than 1048576 bytes"), "{log}");

    // Exactly 1 MiB is still a key set.
    jwks.serve(padded(1 << 20));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, message) = send_token(&gw, &es256_token(&kp, "A", "alice")).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a set of exactly 1 MiB was never taken: {status} {message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A key's concurrency slot is taken before its body is read.
// ---------------------------------------------------------------------------------------------

const UPLOAD: usize = 1 << 20;

/// A Messages request of exactly [`UPLOAD`] bytes of body, head included before it.
fn upload(key: &TestKey) -> Vec<u8> {
    let bare = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": ""}]}).to_string();
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "a".repeat(UPLOAD - bare.len())}]})
            .to_string();
    assert_eq!(body.len(), UPLOAD);
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\ncontent-type: application/json\r\nContent-Length: {UPLOAD}\r\n\r\n",
        key.key
    );
    [head.as_bytes(), body.as_bytes()].concat()
}

/// Reads an HTTP/1.1 answer with a Content-Length: the head and body as text (what arrived, if
/// the connection ends first).
async fn read_answer(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                break;
            }
        }
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Opens a connection, sends `request` but its last byte while reading the answer: the answer
/// to a request refused before its body is read, and whether the gateway then closed the
/// connection.
async fn refused_upload(port: u16, request: Arc<Vec<u8>>) -> (String, bool) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The gateway closes the connection without reading: the write fails part way.
        let _ = w.write_all(&request[..request.len() - 1]).await;
        w
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut r))
        .await
        .unwrap_or_else(|_| "no answer within 10 s: the body is being waited for".to_string());
    // Then the gateway closes the connection (an end, or a reset for the bytes it left unread).
    let mut rest = [0u8; 1024];
    let closed = matches!(tokio::time::timeout(Duration::from_secs(5), r.read(&mut rest)).await, Ok(Ok(0) | Err(_)));
    writer.abort();
    (answer, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_at_its_concurrency_is_refused_before_its_body_is_read() {
    let _heavy = HEAVY.lock().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let config = format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"mock\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{}\"\nlimits = {{ concurrency = 2 }}\n",
        mock.url(),
        key.hash
    );
    // Room for 500 uploads of 1 MiB on the listener (the defaults, said out loud).
    let gw = start_gateway_full("max_body_bytes = 33554432", "max_connections = 4096", &config);
    let started = Instant::now();
    let request = Arc::new(upload(&key));
    // One small request first, so the baseline has the gateway's working set.
    let small = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    assert_eq!(messages_request(&gw, &key).body(small).send().await.unwrap().status(), 200);
    let before = rss_kib(gw.pid());

    // Two uploads take the key's two slots and send all but their last byte.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.write_all(&request[..request.len() - 1]))
            .await
            .expect("the gateway reads the body of a request that holds a slot")
            .unwrap();
        held.push(s);
    }
    // Their bodies are read (short of the last byte) before the rest come.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 498 more, 50 at a time: each gets its 429 with its body unread.
    let mut answered = 0;
    for batch in (0..498).collect::<Vec<_>>().chunks(50) {
        let answers =
            futures_util::future::join_all(batch.iter().map(|_| refused_upload(gw.port, request.clone()))).await;
        for (answer, closed) in answers {
            assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
            assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
            assert!(closed, "the connection stayed open after the refusal");
            assert!(answer.contains("\"type\":\"rate_limit_error\""), "{answer}");
            assert!(answer.contains("concurrency limit of key \\\"a\\\": 2 requests at a time"), "{answer}");
            answered += 1;
        }
    }
    assert_eq!(answered, 498);
    let after = rss_kib(gw.pid());
    let growth_mib = after.saturating_sub(before) / 1024;
    assert!(growth_mib < 64, "the gateway grew by {growth_mib} MiB ({before} KiB to {after} KiB)");

    // The two held uploads finish and are served.
    for mut s in held {
        s.write_all(&request[request.len() - 1..]).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut s)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(mock.received().len(), 1 + 2);
    assert!(mock.received().iter().skip(1).all(|r| r.body.len() == UPLOAD));
    // Every refusal is on record, and the slots are free again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = gw.records();
        let refused = records.iter().filter(|r| r["status"] == 429).count();
        if refused == 498 {
            break;
        }
        assert!(Instant::now() < deadline, "{refused} refusals on record");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&gw).await;
    assert!(m.contains("tollgate_refused_total{reason=\"concurrency\"} 498\n"), "{m}");
    let small = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    assert_eq!(messages_request(&gw, &key).body(small).send().await.unwrap().status(), 200);
    eprintln!("500 uploads: {:?}, RSS {before} KiB -> {after} KiB", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 7. JWT principals in bounded memory.
// ---------------------------------------------------------------------------------------------

/// Sends `n` requests, each with a token of its own user (`u{first + i}`), from `tasks`
/// concurrent senders; returns how many were refused by the principal's daily budget, and the
/// first few other answers.
async fn principals(gw: &Gateway, first: usize, n: usize, tasks: usize) -> (usize, Vec<String>) {
    let body: Arc<str> =
        json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}).to_string().into();
    let next = Arc::new(AtomicUsize::new(0));
    let http = client();
    let mut joins = Vec::new();
    for _ in 0..tasks {
        let (next, http, body, url) = (next.clone(), http.clone(), body.clone(), gw.url("/v1/messages"));
        joins.push(tokio::spawn(async move {
            let (mut budget, mut other) = (0usize, Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return (budget, other);
                }
                let t = token(&format!("u{}", first + i), "x");
                let resp = http.post(&url).header("x-api-key", t).body(body.to_string()).send().await.unwrap();
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap();
                if status == 403 && text.contains("daily budget of key \\\"helper:u") {
                    budget += 1;
                } else if other.len() < 5 {
                    other.push(format!("{status} {text}"));
                }
            }
        }));
    }
    let mut budget = 0;
    let mut other = Vec::new();
    for j in joins {
        let (b, o) = j.await.unwrap();
        budget += b;
        other.extend(o);
    }
    (budget, other)
}

/// Principals sent by [`jwt_principals_are_counted_in_bounded_memory`]. The acceptance figure is
/// 100,000, which takes 40 s (idle) to 80 s (other tests running) against the debug build on two
/// cores, at 1,200 to 2,600 requests a second with the gateway's own CPU the limit; 30,000 takes
/// 12 to 25 s. `TG_TEST_PRINCIPALS=100000` runs the full figure.
fn principal_count() -> usize {
    std::env::var("TG_TEST_PRINCIPALS").ok().and_then(|v| v.parse().ok()).unwrap_or(30_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_principals_are_counted_in_bounded_memory() {
    let _heavy = HEAVY.lock().await;
    let total = principal_count();
    const FIRST: usize = 1_000;
    const CAP: u64 = 1_000;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // Every principal may spend a nano-dollar a day: each request is refused at admission (and
    // leaves its principal with no spend and nothing in flight: forgettable at once).
    let config = format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"mock\", model = \"claude-sonnet-4-5-20250929\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{}\"\n\
         {HS256_ISSUER}budget = {{ usd = 0.000000001, period = \"daily\" }}\n\
         [controls]\nmax_principals = {CAP}\n",
        mock.url(),
        key.hash
    );
    let gw = start_gateway_sections(
        "",
        "",
        &format!("token = \"env:{ADMIN_TOKEN_ENV}\""),
        &[(SECRET_ENV, SECRET), (ADMIN_TOKEN_ENV, ADMIN_TOKEN)],
        &config,
    );
    let started = Instant::now();

    let (refused, other) = principals(&gw, 0, FIRST, 32).await;
    assert_eq!((refused, other.as_slice()), (FIRST, &[][..]), "every request is refused by its budget");
    let rss_first = rss_kib(gw.pid());

    // The rest, 10,000 at a time (the rate of each is printed: it does not fall as principals
    // come and go).
    let mut done = FIRST;
    let mut rates = Vec::new();
    while done < total {
        let n = (total - done).min(10_000);
        let t = Instant::now();
        let (refused, other) = principals(&gw, done, n, 32).await;
        assert!(other.is_empty(), "answers other than the budget's 403 (none may be 429 principals): {other:?}");
        assert_eq!(refused, n);
        rates.push((n as f64 / t.elapsed().as_secs_f64()) as u64);
        done += n;
    }
    let rss_last = rss_kib(gw.pid());

    let m = metrics(&gw).await;
    let (counted, forgotten) = (gauge(&m, "tollgate_key_scopes"), gauge(&m, "tollgate_key_scopes_forgotten"));
    assert!(counted <= CAP, "{counted} key scopes counted");
    assert!(forgotten >= total as u64 - 1_000, "{forgotten} forgotten of {total}");
    assert_eq!(counted + forgotten, total as u64, "each principal counted once, then forgotten or still counted");
    let growth_mib = rss_last.saturating_sub(rss_first) / 1024;
    assert!(
        growth_mib < 32,
        "grew by {growth_mib} MiB after the first {FIRST} principals ({rss_first} KiB to {rss_last} KiB)"
    );
    assert!(mock.received().is_empty());
    eprintln!(
        "{total} principals in {:?}; requests per second by 10,000: {rates:?}; RSS {rss_first} KiB -> {rss_last} KiB; \
         counted {counted}, forgotten {forgotten}",
        started.elapsed()
    );

    // A reload re-reads every principal's spend from the ledger: it must not bring back the
    // principals forgotten (each has a ledger row of its refusal, at no cost).
    let resp = client().post(gw.admin_url("/admin/reload")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let m = metrics(&gw).await;
    let counted = gauge(&m, "tollgate_key_scopes");
    assert!(counted <= CAP, "after a reload, {counted} key scopes are counted (max_principals = {CAP})");
}
