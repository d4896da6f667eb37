//! Bedrock as a provider: an Anthropic-format client is served by a Bedrock deployment (API key
//! or SigV4) exactly as by the Anthropic API, and falls back across providers invisibly.

mod common;

use common::*;
use serde_json::{json, Value};

const ANTHROPIC_ID: &str = "claude-sonnet-4-5-20250929";
const BEDROCK_ID: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";
const BEDROCK_PATH_ID: &str = "anthropic.claude-sonnet-4-5-20250929-v1%3A0";

/// Provider `bedrock` (the mock, in Bedrock mode by path) with `auth`, and provider `anthropic`
/// (another mock); model `direct` on Anthropic, `viabedrock` on Bedrock, `failover` on both.
fn config(anthropic: &MockProvider, bedrock: &MockProvider, auth: &str, key: &TestKey) -> String {
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
{auth}
health = {{ probe = "none" }}

[[model]]
name = "direct"
deployments = [{{ provider = "anthropic", model = "{ANTHROPIC_ID}" }}]

[[model]]
name = "viabedrock"
deployments = [{{ provider = "bedrock", model = "{BEDROCK_ID}" }}]

[[model]]
name = "failover"
deployments = [{{ provider = "anthropic", model = "{ANTHROPIC_ID}" }}, {{ provider = "bedrock", model = "{BEDROCK_ID}" }}]

[[price]]
match = "{BEDROCK_ID}"
input = 3.0
output = 15.0
cache_read = 0.3
cache_write_5m = 3.75
cache_write_1h = 6.0

[[key]]
id = "k"
hash = "{hash}"
"#,
        a = anthropic.url(),
        b = bedrock.url(),
        hash = key.hash
    )
}

fn body(model: &str, stream: bool) -> String {
    json!({"model": model, "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_client_on_bedrock_with_an_api_key() {
    let usage =
        MockUsage { input_tokens: 7, output_tokens: 11, cache_creation_1h_input_tokens: 100, ..Default::default() };
    let behavior = Behavior { usage: usage.clone(), deltas: 4, ..Default::default() };
    let anthropic = MockProvider::start(behavior.clone()).await.unwrap();
    let bedrock = MockProvider::start(behavior).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&anthropic, &bedrock, "credential = \"env:TG_TEST_PROVIDER_KEY\"", &key));

    // The same streamed request, to Anthropic and to Bedrock.
    let send = |model: &str, stream: bool| {
        messages_request(&gw, &key)
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "interleaved-thinking-2025-05-14,context-1m-2025-08-07")
            .body(body(model, stream))
            .send()
    };
    let baseline = send("direct", true).await.unwrap();
    assert_eq!(baseline.status(), 200);
    let baseline = baseline.text().await.unwrap();
    let resp = send("viabedrock", true).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let text = resp.text().await.unwrap();
    assert_eq!(sse_data(&text), sse_data(&baseline), "the Bedrock stream reaches the client as the Anthropic one");
    assert!(text.starts_with("event: message_start\ndata: "));

    // What Bedrock received: the model in the path, its envelope, its credential.
    let got = bedrock.received().pop().unwrap();
    assert_eq!(got.uri, format!("/model/{BEDROCK_PATH_ID}/invoke-with-response-stream"));
    assert_eq!(got.headers["authorization"], format!("Bearer {PROVIDER_SECRET}"));
    assert!(got.headers.get("x-api-key").is_none());
    assert!(got.headers.get("anthropic-beta").is_none() && got.headers.get("anthropic-version").is_none());
    assert_eq!(got.headers["accept"], "application/vnd.amazon.eventstream");
    let sent: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        sent,
        json!({
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}],
            "anthropic_version": "bedrock-2023-05-31",
            "anthropic_beta": ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"],
        })
    );

    // Metered like any stream: 7 input, 11 output, 100 one-hour cache writes.
    let r = gw.record(&rid);
    assert_eq!(r["provider"], "bedrock");
    assert_eq!(r["provider_model"], BEDROCK_ID);
    assert_eq!(r["outcome"], "complete");
    assert_eq!(r["usage"]["input_tokens"], 7);
    assert_eq!(r["usage"]["output_tokens"], 11);
    assert_eq!(r["usage"]["cache_creation_1h_input_tokens"], 100);
    // A regional Bedrock id (no `global.` prefix) costs 10% more than the global endpoint.
    assert_eq!(r["cost_nanos"], 7 * 3300 + 11 * 16_500 + 100 * 6600);

    // Not streamed: the JSON answer as it came.
    let resp = send("viabedrock", false).await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["output_tokens"], 11);
    assert_eq!(bedrock.received().pop().unwrap().uri, format!("/model/{BEDROCK_PATH_ID}/invoke"));
    assert_eq!(gw.record(&rid)["usage"]["input_tokens"], 7);

    // Token counting goes to Bedrock's CountTokens and comes back in the Messages shape.
    let resp = client()
        .post(gw.url("/v1/messages/count_tokens"))
        .header("x-api-key", &key.key)
        .body(json!({"model": "viabedrock", "messages": [{"role": "user", "content": "hi"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"input_tokens": 7}));
    assert_eq!(bedrock.received().pop().unwrap().uri, format!("/model/{BEDROCK_PATH_ID}/count-tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_party_only_betas_are_kept_from_bedrock_and_counted() {
    let anthropic = MockProvider::start(Behavior::default()).await.unwrap();
    let bedrock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&anthropic, &bedrock, "credential = \"env:TG_TEST_PROVIDER_KEY\"", &key));
    for model in ["viabedrock", "direct"] {
        let resp = messages_request(&gw, &key)
            .header("anthropic-beta", "files-api-2025-04-14,context-1m-2025-08-07")
            .body(body(model, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let got = bedrock.received().pop().unwrap();
    let sent: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(sent["anthropic_beta"], json!(["context-1m-2025-08-07"]));
    // The Anthropic API takes every beta, as the client sent them.
    assert_eq!(
        anthropic.received().pop().unwrap().headers["anthropic-beta"],
        "files-api-2025-04-14,context-1m-2025-08-07"
    );
    let metrics = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_betas_dropped_total{provider=\"bedrock\",rule=\"files-api-*\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_errors_reach_the_client_in_the_anthropic_shape() {
    let anthropic = MockProvider::start(Behavior::default()).await.unwrap();
    let bedrock = MockProvider::start(Behavior {
        status: Some(400),
        error_message: Some("messages: text content blocks must be non-empty".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&anthropic, &bedrock, "credential = \"env:TG_TEST_PROVIDER_KEY\"", &key));
    let resp = messages_request(&gw, &key).body(body("viabedrock", true)).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "messages: text content blocks must be non-empty"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigv4_signs_every_request() {
    let anthropic = MockProvider::start(Behavior::default()).await.unwrap();
    let bedrock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let auth = "aws = { access_key_id = \"env:TG_AWS_ID\", secret_access_key = \"env:TG_AWS_SECRET\", session_token = \"env:TG_AWS_TOKEN\" }";
    let gw = start_gateway_admin(
        "",
        &[
            ("TG_AWS_ID", "AKIDEXAMPLE"),
            ("TG_AWS_SECRET", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            ("TG_AWS_TOKEN", "tok"),
        ],
        &config(&anthropic, &bedrock, auth, &key),
    );
    let resp = messages_request(&gw, &key).body(body("viabedrock", false)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = bedrock.received().pop().unwrap();
    let authz = got.headers["authorization"].to_str().unwrap();
    let date = got.headers["x-amz-date"].to_str().unwrap();
    assert!(
        authz.starts_with(&format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{}/us-east-1/bedrock/aws4_request, ",
            &date[..8]
        )),
        "{authz}"
    );
    assert!(authz.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature="), "{authz}");
    assert_eq!(got.headers["x-amz-security-token"], "tok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_anthropic_falls_back_to_bedrock_invisibly() {
    let anthropic = MockProvider::start(Behavior { status: Some(529), ..Default::default() }).await.unwrap();
    let bedrock = MockProvider::start(Behavior { deltas: 5, ..Default::default() }).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&anthropic, &bedrock, "credential = \"env:TG_TEST_PROVIDER_KEY\"", &key));
    let resp = messages_request(&gw, &key).body(body("failover", true)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let text = resp.text().await.unwrap();
    // A well-formed SSE stream: every event named, its data JSON of that type, in order.
    let blocks: Vec<&str> = text.split("\n\n").filter(|b| !b.is_empty()).collect();
    let names: Vec<&str> = blocks.iter().map(|b| b.lines().next().unwrap().strip_prefix("event: ").unwrap()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert_eq!(names.iter().filter(|n| **n == "content_block_delta").count(), 5);
    for b in &blocks {
        let mut lines = b.lines();
        let name = lines.next().unwrap().strip_prefix("event: ").unwrap();
        let data: Value = serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], name);
    }
    let r = gw.record(&rid);
    assert_eq!(r["provider"], "bedrock");
    let attempts: Vec<(String, Value)> = r["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["provider"].as_str().unwrap().to_string(), a["status"].clone()))
        .collect();
    assert_eq!(attempts, [("anthropic".to_string(), json!(529)), ("bedrock".to_string(), json!(200))]);
    assert_eq!(anthropic.received().len(), 1);
    assert_eq!(bedrock.received().len(), 1);
}
