//! What real clients ran into, each pinned by a test: Claude Code on Bedrock sends betas in the
//! header and the body and both must arrive; a Vertex client's count-tokens keeps its own
//! `anthropic_version`; the `/anthropic` pass-through prefix never reaches the provider; and
//! errors reach each client in its own format (boto3 reads `x-amzn-errortype` and `message`,
//! the Vertex SDK Google's `error` object), unmodified when the provider speaks it already.

mod common;

use common::*;
use serde_json::{json, Value};

const VERTEX_BASE: &str = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models";

struct Setup {
    gw: Gateway,
    key: TestKey,
    anthropic: MockProvider,
    bedrock: MockProvider,
    vertex: MockProvider,
}

async fn setup() -> Setup {
    let (anthropic, bedrock, vertex) = three_mocks(Behavior::default()).await;
    let key = new_key();
    let providers = provider_sections([&anthropic.url(), &bedrock.url(), &vertex.url()], ["", "", ""]);
    let gw = start_gateway(&format!(
        r#"{providers}
[[model]]
name = "on-anthropic"
max_attempts = 1
deployments = [{{ provider = "anthropic", model = "claude-sonnet-4-5-20250929" }}]

[[model]]
name = "on-bedrock"
max_attempts = 1
deployments = [{{ provider = "bedrock", model = "global.anthropic.claude-sonnet-4-5-20250929-v1:0" }}]

[[model]]
name = "on-vertex"
max_attempts = 1
deployments = [{{ provider = "vertex", model = "claude-sonnet-4-5@20250929" }}]

[[key]]
id = "k"
hash = "{hash}"
"#,
        hash = key.hash
    ));
    Setup { gw, key, anthropic, bedrock, vertex }
}

fn bedrock_body() -> String {
    json!({
        "anthropic_version": "bedrock-2023-05-31",
        "anthropic_beta": ["interleaved-thinking-2025-05-14", "claude-code-20250219"],
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_client_betas_from_the_header_and_the_body_reach_every_provider() {
    let s = setup().await;
    for (model, mock) in [("on-anthropic", &s.anthropic), ("on-bedrock", &s.bedrock), ("on-vertex", &s.vertex)] {
        let resp = client()
            .post(s.gw.url(&format!("/model/{model}/invoke")))
            .header("authorization", format!("Bearer {}", s.key.key))
            .header("anthropic-beta", "claude-code-20250219")
            .body(bedrock_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{model}: {}", resp.text().await.unwrap());
        let got = mock.received().pop().unwrap();
        let betas: Vec<String> = match model {
            "on-bedrock" => serde_json::from_slice::<Value>(&got.body).unwrap()["anthropic_beta"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_string())
                .collect(),
            _ => got.headers["anthropic-beta"].to_str().unwrap().split(',').map(str::to_string).collect(),
        };
        if model == "on-bedrock" {
            // Bedrock itself gets the client's body byte for byte, its list as it came.
            assert_eq!(betas, ["interleaved-thinking-2025-05-14", "claude-code-20250219"], "{model}");
        } else {
            // The header's first, then the body's, each once.
            assert_eq!(betas, ["claude-code-20250219", "interleaved-thinking-2025-05-14"], "{model}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_count_tokens_keeps_the_clients_version() {
    let s = setup().await;
    let body = json!({
        "anthropic_version": "2026-10-21",
        "model": "on-vertex",
        "messages": [{"role": "user", "content": "hi"}],
    });
    let resp = client()
        .post(s.gw.url(&format!("{VERTEX_BASE}/count-tokens:rawPredict")))
        .header("authorization", format!("Bearer {}", s.key.key))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let got = s.vertex.received().pop().unwrap();
    let sent: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(sent["anthropic_version"], "2026-10-21");
    assert_eq!(sent["model"], "claude-sonnet-4-5@20250929");
    assert!(got.uri.ends_with("/publishers/anthropic/models/count-tokens:rawPredict"), "{}", got.uri);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_prefix_stays_at_the_gateway() {
    let s = setup().await;
    for (path, upstream) in [
        ("/anthropic/v1/messages?beta=true", "/v1/messages?beta=true"),
        ("/anthropic/v1/messages/count_tokens", "/v1/messages/count_tokens"),
    ] {
        let body = json!({"model": "on-anthropic", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        let resp =
            client().post(s.gw.url(path)).header("x-api-key", &s.key.key).body(body.to_string()).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}: {}", resp.text().await.unwrap());
        assert_eq!(s.anthropic.received().pop().unwrap().uri, upstream);
    }
}

/// Sends a request that the provider answers 429, as `client` speaks; returns the status,
/// headers and body the client got.
async fn throttled(s: &Setup, client_format: &str, model: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let messages = json!([{"role": "user", "content": "hi"}]);
    let (path, body) = match client_format {
        "anthropic" => ("/v1/messages".to_string(), json!({"model": model, "max_tokens": 5, "messages": messages})),
        "bedrock" => (format!("/model/{model}/invoke"), serde_json::from_str(&bedrock_body()).unwrap()),
        _ => (
            format!("{VERTEX_BASE}/{model}:rawPredict"),
            json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": messages}),
        ),
    };
    let resp = client()
        .post(s.gw.url(&path))
        .header("authorization", format!("Bearer {}", s.key.key))
        .header("x-mock-status", "429")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_each_client_in_its_own_format() {
    let s = setup().await;
    let errortype = |h: &reqwest::header::HeaderMap| h.get("x-amzn-errortype").map(|v| v.to_str().unwrap().to_string());

    // Same format: the provider's answer as it came.
    let (status, h, body) = throttled(&s, "bedrock", "on-bedrock").await;
    assert_eq!(status, 429);
    assert_eq!(
        errortype(&h).as_deref(),
        Some("ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/")
    );
    assert_eq!(body, json!({"message": "mock bedrock: status 429"}));
    let (status, _, body) = throttled(&s, "vertex", "on-vertex").await;
    assert_eq!(status, 429);
    assert_eq!(body, json!({"error": {"code": 429, "message": "mock vertex: status 429", "status": "MOCK"}}));
    let (status, _, body) = throttled(&s, "anthropic", "on-anthropic").await;
    assert_eq!(
        (status, body["type"].as_str(), body["error"]["type"].as_str()),
        (429, Some("error"), Some("rate_limit_error"))
    );

    // A Bedrock client of another provider: Bedrock's exception name and message.
    for model in ["on-anthropic", "on-vertex"] {
        let (status, h, body) = throttled(&s, "bedrock", model).await;
        assert_eq!(status, 429, "{model}");
        assert_eq!(errortype(&h).as_deref(), Some("ThrottlingException"), "{model}");
        let message = body["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{model}: {body}");
        assert!(body.get("type").is_none(), "{model}: {body}");
    }
    // A Vertex client of another provider: Google's shape.
    for model in ["on-anthropic", "on-bedrock"] {
        let (status, h, body) = throttled(&s, "vertex", model).await;
        assert_eq!(status, 429, "{model}");
        assert_eq!(body["error"]["code"], 429, "{model}: {body}");
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED", "{model}: {body}");
        assert!(errortype(&h).is_none(), "{model}");
    }
    // An Anthropic client of Bedrock: the Anthropic shape, and no Bedrock exception header that
    // would contradict it.
    let (status, h, body) = throttled(&s, "anthropic", "on-bedrock").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["message"], "mock bedrock: status 429");
    assert!(errortype(&h).is_none());

    // The gateway's own errors too: an unknown key from a Bedrock client and a Vertex client.
    let resp = client()
        .post(s.gw.url("/model/on-bedrock/invoke"))
        .header("authorization", "Bearer tg-not-a-key")
        .body(bedrock_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(errortype(resp.headers()).as_deref(), Some("AccessDeniedException"));
    let body: Value = resp.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("key"), "{body}");
    let resp = client()
        .post(s.gw.url(&format!("{VERTEX_BASE}/on-vertex:rawPredict")))
        .header("authorization", "Bearer tg-not-a-key")
        .body(json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": []}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_discovery_lists_what_the_key_may_use() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let (all, sonnet) = (new_key(), new_key());
    let gw = start_gateway(&format!(
        r#"
[[provider]]
name = "a"
kind = "anthropic"
base_url = "{url}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[model]]
name = "team-sonnet"
aliases = ["sonnet"]
deployments = [{{ provider = "a", model = "claude-sonnet-4-6" }}]

[[model]]
name = "claude"
patterns = ["claude-opus-4-*"]
deployments = [{{ provider = "a" }}]

[[key]]
id = "all"
hash = "{h1}"

[[key]]
id = "sonnet-only"
hash = "{h2}"
models = ["team-sonnet"]
"#,
        url = mock.url(),
        h1 = all.hash,
        h2 = sonnet.hash
    ));
    let list = |key: &TestKey, path: &str| client().get(gw.url(path)).header("x-api-key", &key.key).send();
    let ids = |v: &Value| -> Vec<String> {
        v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
    };
    let resp = list(&all, "/v1/models").await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    // Names and aliases, and the Opus 4 ids the price table knows that the pattern route serves.
    assert_eq!(
        ids(&v),
        [
            "claude-opus-4-1-20250805",
            "claude-opus-4-20250514",
            "claude-opus-4-5-20251101",
            "claude-opus-4-6",
            "claude-opus-4-7",
            "claude-opus-4-8",
            "sonnet",
            "team-sonnet"
        ]
    );
    assert_eq!(v["has_more"], false);
    assert_eq!(v["first_id"], "claude-opus-4-1-20250805");
    assert_eq!(v["data"][0]["type"], "model");

    let v: Value = list(&sonnet, "/v1/models").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&v), ["sonnet", "team-sonnet"]);
    let resp = list(&sonnet, "/v1/models/team-sonnet").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["id"], "team-sonnet");
    let resp = list(&sonnet, "/v1/models/claude-opus-4-6").await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"]["type"], "not_found_error");
    // Only with a key.
    let resp = client().get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(mock.received().is_empty(), "a listing never reaches the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_provider_ends_the_stream_with_an_error_the_client_reads() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&format!(
        "[[provider]]\nname = \"a\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         idle_timeout = \"1s\"\nhealth = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"a\", model = \"claude-sonnet-4-6\" }}]\n\
         [[key]]\nid = \"k\"\nhash = \"{hash}\"\n",
        url = mock.url(),
        hash = key.hash
    ));
    // Messages client: the SSE stream ends with an `error` event.
    let body = json!({"model": "m", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp =
        messages_request(&gw, &key).header("x-mock-delay-ms", "3000").body(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut text = Vec::new();
    let mut resp = resp;
    while let Ok(Some(chunk)) = resp.chunk().await {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(text).unwrap();
    assert!(text.contains("event: message_start"), "{text}");
    let error = sse_data(&text).into_iter().find(|e| e["type"] == "error").expect("an error event");
    assert_eq!(error["error"]["type"], "api_error");
    assert!(error["error"]["message"].as_str().unwrap().contains("sent nothing for 1s"), "{error}");

    // Bedrock client: an exception frame.
    let resp = client()
        .post(gw.url("/model/m/invoke-with-response-stream"))
        .header("authorization", format!("Bearer {}", key.key))
        .header("x-mock-delay-ms", "3000")
        .body(bedrock_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut frames = Vec::new();
    let mut resp = resp;
    while let Ok(Some(chunk)) = resp.chunk().await {
        frames.extend_from_slice(&chunk);
    }
    let raw = String::from_utf8_lossy(&frames);
    assert!(raw.contains(":exception-type"), "an exception frame: {raw}");
    assert!(raw.contains("sent nothing for 1s"), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_and_betas_that_do_not_exist_yet_pass() {
    let s = setup().await;
    let body = r#"{"model":"on-anthropic","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"future_knob":{"level":3},"context_management":{"edits":[]}}"#;
    let resp = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.key.key)
        .header("anthropic-beta", "future-feature-2099-01-01, context-management-2025-06-27")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let got = s.anthropic.received().pop().unwrap();
    assert_eq!(
        got.body,
        body.replace("on-anthropic", "claude-sonnet-4-5-20250929").as_bytes(),
        "byte for byte but the model"
    );
    // Every beta, as the provider's policy passed them: one comma-joined line.
    assert_eq!(got.headers["anthropic-beta"], "future-feature-2099-01-01,context-management-2025-06-27");
    // Through Bedrock: the unknown field stays in the body, the betas move into it.
    let resp = client()
        .post(s.gw.url("/v1/messages"))
        .header("x-api-key", &s.key.key)
        .header("anthropic-beta", "future-feature-2099-01-01")
        .body(body.replace("on-anthropic", "on-bedrock"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let sent: Value = serde_json::from_slice(&s.bedrock.received().pop().unwrap().body).unwrap();
    assert_eq!(sent["future_knob"], json!({"level": 3}));
    assert_eq!(sent["anthropic_beta"], json!(["future-feature-2099-01-01"]));
}
