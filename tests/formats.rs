//! The 3×3 matrix: clients speaking Anthropic Messages, Bedrock InvokeModel or Vertex rawPredict,
//! served by Anthropic, Bedrock or Vertex providers. Every pair gets the same text and usage as
//! the Anthropic-to-Anthropic baseline, in the client's own framing, and a complete record.

mod common;

use common::*;
use serde_json::{json, Value};
use tollgate::protocol::bedrock::StreamToSse;

const VERTEX_BASE: &str = "/v1/projects/p1/locations/us-east5/publishers/anthropic/models";

fn config(a: &MockProvider, b: &MockProvider, v: &MockProvider, key: &TestKey) -> String {
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
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[provider]]
name = "vertex"
kind = "vertex"
project = "p1"
region = "us-east5"
base_url = "{v}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[model]]
name = "on-anthropic"
deployments = [{{ provider = "anthropic", model = "claude-sonnet-4-5-20250929" }}]

[[model]]
name = "on-bedrock"
deployments = [{{ provider = "bedrock", model = "anthropic.claude-sonnet-4-5-20250929-v1:0" }}]

[[model]]
name = "on-vertex"
deployments = [{{ provider = "vertex", model = "claude-sonnet-4-5@20250929" }}]

[[key]]
id = "k"
hash = "{hash}"
"#,
        a = a.url(),
        b = b.url(),
        v = v.url(),
        hash = key.hash
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    Anthropic,
    Bedrock,
    Vertex,
}

/// Sends one request in `client`'s format; returns the status, the request id, the answer as
/// SSE events (decoded from frames for Bedrock streams) or JSON, and the raw body sent.
async fn call(
    gw: &Gateway,
    key: &TestKey,
    client: Client,
    model: &str,
    stream: bool,
) -> (u16, String, Vec<Value>, Vec<u8>) {
    let messages = json!([{"role": "user", "content": "hi"}]);
    let (path, body) = match client {
        Client::Anthropic => (
            "/v1/messages".to_string(),
            json!({"model": model, "max_tokens": 100, "stream": stream, "messages": messages}),
        ),
        Client::Bedrock => (
            format!("/model/{model}/{}", if stream { "invoke-with-response-stream" } else { "invoke" }),
            json!({"anthropic_version": "bedrock-2023-05-31", "anthropic_beta": ["context-1m-2025-08-07"], "max_tokens": 100, "messages": messages}),
        ),
        Client::Vertex => (
            format!("{VERTEX_BASE}/{model}:{}", if stream { "streamRawPredict" } else { "rawPredict" }),
            json!({"anthropic_version": "vertex-2023-10-16", "stream": stream, "max_tokens": 100, "messages": messages}),
        ),
    };
    let body = body.to_string().into_bytes();
    let mut req = common::client().post(gw.url(&path)).body(body.clone());
    req = match client {
        Client::Anthropic => req.header("x-api-key", &key.key).header("anthropic-version", "2023-06-01"),
        _ => req.header("authorization", format!("Bearer {}", key.key)),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let rid = resp.headers().get("x-tollgate-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let content_type = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let bytes = resp.bytes().await.unwrap();
    let events = if stream && status == 200 {
        let sse = if client == Client::Bedrock {
            assert_eq!(content_type, "application/vnd.amazon.eventstream", "a Bedrock client gets frames");
            StreamToSse::new().feed(&bytes).expect("well-formed frames").to_vec()
        } else {
            assert!(content_type.starts_with("text/event-stream"), "{content_type}");
            bytes.to_vec()
        };
        String::from_utf8(sse)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| {
                let mut v: Value = serde_json::from_str(d).unwrap();
                if v["message"]["model"].is_string() {
                    v["message"]["model"] = json!("M");
                }
                v
            })
            .collect()
    } else {
        let mut v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if v["model"].is_string() {
            v["model"] = json!("M");
        }
        if v["id"].is_string() {
            v["id"] = json!("ID");
        }
        vec![v]
    };
    (status, rid, events, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_format_on_every_provider() {
    let usage =
        MockUsage { input_tokens: 12, output_tokens: 34, cache_creation_1h_input_tokens: 56, ..Default::default() };
    let behavior = Behavior { usage, deltas: 4, ..Default::default() };
    let a = MockProvider::start(behavior.clone()).await.unwrap();
    let b = MockProvider::start(behavior.clone()).await.unwrap();
    let v = MockProvider::start(behavior).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(&a, &b, &v, &key));

    for stream in [true, false] {
        let (status, _, baseline, _) = call(&gw, &key, Client::Anthropic, "on-anthropic", stream).await;
        assert_eq!(status, 200);
        for client in [Client::Anthropic, Client::Bedrock, Client::Vertex] {
            for (model, provider, mock) in
                [("on-anthropic", "anthropic", &a), ("on-bedrock", "bedrock", &b), ("on-vertex", "vertex", &v)]
            {
                let (status, rid, answer, sent) = call(&gw, &key, client, model, stream).await;
                let case = format!("{client:?} client, {provider} provider, stream {stream}");
                assert_eq!(status, 200, "{case}: {answer:?}");
                assert_eq!(answer, baseline, "{case}");
                let r = gw.record(&rid);
                assert_eq!(r["provider"], provider, "{case}");
                assert_eq!(r["format"], format!("{client:?}").to_lowercase(), "{case}");
                assert_eq!(r["outcome"], "complete", "{case}");
                assert_eq!(r["stream"], stream, "{case}");
                let u = &r["usage"];
                assert_eq!((u["input_tokens"].as_u64(), u["output_tokens"].as_u64()), (Some(12), Some(34)), "{case}");
                assert_eq!(u["cache_creation_1h_input_tokens"], 56, "{case}");
                // A provider that speaks the client's format gets the client's body unchanged.
                let got = mock.received().pop().unwrap();
                if (client, provider) == (Client::Bedrock, "bedrock")
                    || (client, provider) == (Client::Vertex, "vertex")
                {
                    assert_eq!(got.body, sent, "{case}: byte-exact");
                }
                // The betas a Bedrock client put in its body reach every provider.
                if client == Client::Bedrock {
                    let betas = match provider {
                        "bedrock" => serde_json::from_slice::<Value>(&got.body).unwrap()["anthropic_beta"].clone(),
                        _ => json!([got.headers["anthropic-beta"].to_str().unwrap()]),
                    };
                    assert_eq!(betas, json!(["context-1m-2025-08-07"]), "{case}");
                }
                if provider == "anthropic" {
                    assert_eq!(got.headers["anthropic-version"], "2023-06-01", "{case}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_listener_custom_header_and_inference_profiles() {
    let (a, b, v) = three_mocks(Behavior::default()).await;
    let key = new_key();
    let gw = start_gateway_full("key_header = \"x-tollgate-key\"", "anonymous_key = \"k\"", &config(&a, &b, &v, &key));

    // Claude Code with CLAUDE_CODE_SKIP_BEDROCK_AUTH: no credential at all.
    let body = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client().post(gw.url("/model/on-bedrock/invoke")).body(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let r = gw.record(&rid);
    assert_eq!((r["key_id"].as_str(), r["auth"].as_str()), (Some("k"), Some("listener")));

    // A wrong key is still refused: the listener only stands in for no key. A Bedrock client
    // hears it as Bedrock says it (403 AccessDeniedException).
    let resp = client()
        .post(gw.url("/model/on-bedrock/invoke"))
        .header("authorization", "Bearer tg-wrong")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-amzn-errortype"], "AccessDeniedException");

    // Claude Code on Vertex: Authorization holds a Google token, the key comes in a custom header.
    let vbody = json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client()
        .post(gw.url(&format!("{VERTEX_BASE}/on-vertex:rawPredict")))
        .header("authorization", "Bearer ya29.google-token")
        .header("x-tollgate-key", &key.key)
        .body(vbody.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    assert_eq!(gw.record(&rid)["auth"], "key");
    assert!(v.received().pop().unwrap().headers["authorization"].to_str().unwrap().ends_with(PROVIDER_SECRET));

    // LiteLLM-style pass-through prefixes: the same service, the format named in the path.
    let resp = client()
        .post(gw.url("/bedrock/model/on-anthropic/invoke"))
        .header("authorization", format!("Bearer {}", key.key))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let anthropic_body =
        json!({"model": "on-vertex", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let resp = client()
        .post(gw.url("/anthropic/v1/messages"))
        .header("x-api-key", &key.key)
        .body(anthropic_body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        (gw.record(&rid)["provider"].as_str(), gw.record(&rid)["format"].as_str()),
        (Some("vertex"), Some("anthropic"))
    );
    let resp =
        client().post(gw.url("/anthropic/model/on-anthropic/invoke")).body(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 404, "a prefix serves its own format only");

    let resp = client().get(gw.url("/inference-profiles")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"inferenceProfileSummaries": []}));

    // Vertex token counting, in Vertex's shape, on the Anthropic API.
    let count = json!({"anthropic_version": "vertex-2023-10-16", "model": "on-anthropic", "messages": [{"role": "user", "content": "hi"}]});
    let resp = client()
        .post(gw.url(&format!("{VERTEX_BASE}/count-tokens:rawPredict")))
        .header("x-tollgate-key", &key.key)
        .body(count.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"input_tokens": 25}));
    assert_eq!(a.received().pop().unwrap().uri, "/v1/messages/count_tokens");
}
