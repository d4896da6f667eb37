//! Vertex AI as a provider: an Anthropic-format client served through rawPredict, with a static
//! token or OAuth tokens minted from a service account (and renewed before they expire).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VERTEX_ID: &str = "claude-sonnet-4-5@20250929";
const PREDICT: &str = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models";

fn config(anthropic: &MockProvider, vertex: &MockProvider, auth: &str, key: &TestKey) -> String {
    format!(
        r#"
[[provider]]
name = "anthropic"
kind = "anthropic"
base_url = "{a}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[provider]]
name = "vertex"
kind = "vertex"
project = "p1"
region = "us-east5"
base_url = "{v}"
{auth}
health = {{ probe = "none" }}

[[model]]
name = "direct"
deployments = [{{ provider = "anthropic", model = "claude-sonnet-4-5-20250929" }}]

[[model]]
name = "viavertex"
deployments = [{{ provider = "vertex", model = "{VERTEX_ID}" }}]

[[key]]
id = "k"
hash = "{hash}"
"#,
        a = anthropic.url(),
        v = vertex.url(),
        hash = key.hash
    )
}

fn body(model: &str, stream: bool) -> String {
    json!({"model": model, "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_client_on_vertex_with_a_static_token() {
    let usage = MockUsage { input_tokens: 9, output_tokens: 4, cache_read_input_tokens: 50, ..Default::default() };
    let behavior = Behavior { usage, deltas: 3, ..Default::default() };
    let anthropic = MockProvider::start(behavior.clone()).await.unwrap();
    let vertex = MockProvider::start(behavior).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&anthropic, &vertex, "credential = \"env:TG_TEST_PROVIDER_KEY\"", &key));
    let send = |model: &str, stream: bool| {
        messages_request(&gw, &key)
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "context-1m-2025-08-07")
            .body(body(model, stream))
            .send()
    };
    let baseline = send("direct", true).await.unwrap().text().await.unwrap();
    let resp = send("viavertex", true).await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    assert_eq!(sse_data(&resp.text().await.unwrap()), sse_data(&baseline));

    let got = vertex.received().pop().unwrap();
    assert_eq!(got.uri, format!("{PREDICT}/{VERTEX_ID}:streamRawPredict"));
    assert_eq!(got.headers["authorization"], format!("Bearer {PROVIDER_SECRET}"));
    assert_eq!(got.headers["anthropic-beta"], "context-1m-2025-08-07");
    assert!(got.headers.get("x-api-key").is_none() && got.headers.get("anthropic-version").is_none());
    let sent: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        sent,
        json!({"max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "hi"}], "anthropic_version": "vertex-2023-10-16"})
    );
    let r = gw.record(&rid);
    assert_eq!((r["provider"].as_str(), r["outcome"].as_str()), (Some("vertex"), Some("complete")));
    assert_eq!(
        (r["usage"]["input_tokens"].as_u64(), r["usage"]["cache_read_input_tokens"].as_u64()),
        (Some(9), Some(50))
    );

    let resp = send("viavertex", false).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["usage"]["output_tokens"], 4);
    assert_eq!(vertex.received().pop().unwrap().uri, format!("{PREDICT}/{VERTEX_ID}:rawPredict"));

    let resp = client()
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", &key.key)
        .body(json!({"model": "viavertex", "messages": [{"role": "user", "content": "hi"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"input_tokens": 9}));
    let got = vertex.received().pop().unwrap();
    assert_eq!(got.uri, format!("{PREDICT}/count-tokens:rawPredict"));
    assert_eq!(serde_json::from_slice::<Value>(&got.body).unwrap()["model"], VERTEX_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_errors_reach_the_client_in_the_anthropic_shape() {
    let anthropic = MockProvider::start(Behavior::default()).await.unwrap();
    let vertex = MockProvider::start(Behavior {
        status: Some(400),
        error_message: Some("Request contains an invalid argument.".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&anthropic, &vertex, "credential = \"env:TG_TEST_PROVIDER_KEY\"", &key));
    let resp = messages_request(&gw, &key).body(body("viavertex", false)).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "Request contains an invalid argument."}})
    );
}

/// A token endpoint: checks the JWT bearer grant and answers tokens `ya29.t1`, `ya29.t2`, ...
/// that live `life` seconds.
struct TokenEndpoint {
    url: String,
    grants: Arc<Mutex<Vec<String>>>,
}

async fn token_endpoint(life: u64) -> TokenEndpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let grants = Arc::new(Mutex::new(Vec::new()));
    let seen = grants.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then the body by its Content-Length.
                let body = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break body.to_string();
                        }
                    }
                };
                let n = {
                    let mut g = seen.lock().unwrap();
                    g.push(body);
                    g.len()
                };
                let answer = json!({"access_token": format!("ya29.t{n}"), "expires_in": life, "token_type": "Bearer"})
                    .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    TokenEndpoint { url, grants }
}

fn rsa_key(dir: &std::path::Path) -> (String, String) {
    let private = dir.join("sa.pem");
    let public = dir.join("sa.pub.pem");
    let ok = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genpkey");
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkey");
    (std::fs::read_to_string(private).unwrap(), std::fs::read_to_string(public).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_minted_and_renewed() {
    let anthropic = MockProvider::start(Behavior::default()).await.unwrap();
    let vertex = MockProvider::start(Behavior::default()).await.unwrap();
    let tokens = token_endpoint(2).await;
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_key(dir.path());
    let sa = json!({
        "type": "service_account",
        "client_email": "tollgate@p1.iam.gserviceaccount.com",
        "private_key": private,
        "token_uri": tokens.url,
    });
    let sa_path = dir.path().join("sa.json");
    std::fs::write(&sa_path, sa.to_string()).unwrap();
    let key = new_key();
    let auth = format!("service_account = \"file:{}\"", sa_path.display());
    let gw = start_gateway(&config(&anthropic, &vertex, &auth, &key));

    // The token was fetched before the first request.
    let resp = messages_request(&gw, &key).body(body("viavertex", false)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(vertex.received().pop().unwrap().headers["authorization"], "Bearer ya29.t1");

    // The grant: a JWT bearer assertion signed with the account's key, for the token endpoint.
    let grant = tokens.grants.lock().unwrap()[0].clone();
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(grant.as_bytes()).into_owned().collect();
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:jwt-bearer");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[&tokens.url]);
    let claims = jsonwebtoken::decode::<Value>(
        &form["assertion"],
        &jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["iss"], "tollgate@p1.iam.gserviceaccount.com");
    assert_eq!(claims["scope"], "https://www.googleapis.com/auth/cloud-platform");
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 3600);

    // A 2-second token is renewed before it runs out; requests move to the new one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = messages_request(&gw, &key).body(body("viavertex", false)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "never without a valid token");
        if vertex.received().pop().unwrap().headers["authorization"] != "Bearer ya29.t1" {
            break;
        }
        assert!(Instant::now() < deadline, "the token was never renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A pass-through deployment (no `model`) puts the client's model name in the Vertex URL path:
/// a name that would step out of its path segment is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_names_cannot_step_out_of_the_upstream_path() {
    let (anthropic, vertex) = (
        MockProvider::start(Behavior::default()).await.unwrap(),
        MockProvider::start(Behavior::default()).await.unwrap(),
    );
    let key = new_key();
    let passthrough = "[[model]]\nname = \"any-claude\"\npatterns = [\"claude-*\"]\ndeployments = [{ provider = \"vertex\" }]\n\
                       [[price]]\nmatch = \"claude-*\"\ninput = 3.0\noutput = 15.0\ncache_read = 0.3\ncache_write_5m = 3.75\ncache_write_1h = 6.0\n";
    let gw = start_gateway(&format!(
        "{}{passthrough}",
        config(&anthropic, &vertex, "credential = \"env:TG_TEST_PROVIDER_KEY\"", &key)
    ));
    for model in ["claude-haiku-x/../claude-opus-4-1@20250805", "claude-x/..", "claude-a?b", "claude-a#b"] {
        let resp = messages_request(&gw, &key).body(body(model, false)).send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 400, "{model}: {text}");
        assert!(text.contains("is not a model id provider vertex can be asked for"), "{text}");
    }
    // A well-formed name passes through, in its own path segment.
    let resp = messages_request(&gw, &key).body(body("claude-haiku-4-5@20251001", false)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let got = vertex.received();
    assert_eq!(got.len(), 1, "nothing malformed reached the provider");
    assert_eq!(got[0].uri, format!("{PREDICT}/claude-haiku-4-5@20251001:rawPredict"));
    // The same names in a Bedrock-format path never route (404).
    let resp = client()
        .post(gw.url("/model/..%2F..%2Fadmin/invoke"))
        .header("x-api-key", &key.key)
        .body(body("x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
