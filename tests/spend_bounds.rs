//! The worst case a budget reserves is a real bound: content fetched by reference reserves the
//! model's context window, `max_tokens` is checked before anything is reserved, price modifiers
//! the request asks for are reserved, and a request the provider may already be generating is
//! never sent twice.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The shipped row of this id: $6 per million 1-hour cache writes (its dearest prompt rate),
/// $15 per million output tokens, a 200,000-token context window and 64,000 output tokens.
const MODEL_ID: &str = "claude-sonnet-4-5-20250929";
const PROMPT_RATE: u64 = 6000;
const OUTPUT_RATE: u64 = 15_000;
const CONTEXT_WINDOW: u64 = 200_000;
const MAX_TOKENS: u64 = 100;

fn config(mock_url: &str, key: &TestKey, key_extra: &str, extra: &str) -> String {
    format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{mock_url}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nfirst_byte_timeout = \"500ms\"\n\
         health = {{ probe = \"none\", failures = 1000 }}\n\
         [[model]]\nname = \"m\"\nmax_attempts = 1\ndeployments = [{{ provider = \"mock\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\n{key_extra}\n{extra}\n",
        hash = key.hash,
    )
}

/// A prompt of a few hundred bytes whose image the provider fetches from a URL.
fn by_reference_body() -> String {
    json!({
        "model": "m",
        "max_tokens": MAX_TOKENS,
        "stream": true,
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/big.png"}},
            {"type": "text", "text": "what is in it?"},
        ]}],
    })
    .to_string()
}

fn message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_reference_prompts_reserve_the_context_window() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // The body is ~300 bytes, but the fetched image may fill the whole window.
    let worst = CONTEXT_WINDOW * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE;
    let budget = 10 * worst;
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", budget as f64 / 1e9);
    let gw = start_gateway(&config(&mock.url(), &key, &key_extra, ""));
    // Each request really fills the window with 1-hour cache writes: it costs its worst case.
    let usage =
        json!({"input_tokens": 0, "output_tokens": MAX_TOKENS, "cache_creation_1h_input_tokens": CONTEXT_WINDOW})
            .to_string();

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let req = messages_request(&gw, &key)
                .body(by_reference_body())
                .header("x-mock-usage", usage.clone())
                .header("x-mock-delay-ms", "5");
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                (status, message(&resp.text().await.unwrap()))
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let (status, text) = t.await.unwrap();
        match status {
            200 => admitted += 1,
            // Refused while the windows are held, or once the budget is spent.
            429 | 403 => assert!(
                text.contains(&format!("may cost up to ${}", tollgate::metering::usd(worst)))
                    || text.contains("is spent"),
                "{text}"
            ),
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert_eq!(admitted, 10, "the budget holds exactly ten context windows");
    gw.wait_for_records(200);
    let spent: u64 = gw.records().iter().map(|r| r["cost_nanos"].as_u64().unwrap()).sum();
    assert_eq!(spent, budget);
}

/// A gateway whose key has a budget and whose policy refuses content fetched by reference.
async fn refusing_by_reference() -> (MockProvider, TestKey, Gateway) {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&config(
        &mock.url(),
        &key,
        "budget = { usd = 100, period = \"daily\" }",
        "[controls]\nby_reference = \"refuse\"",
    ));
    (mock, key, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_reference_prompts_can_be_refused_under_a_budget() {
    let (mock, key, gw) = refusing_by_reference().await;
    let resp = messages_request(&gw, &key).body(by_reference_body()).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error");
    let text = v["error"]["message"].as_str().unwrap();
    assert!(text.starts_with("source.type = \"url\": "), "{text}");
    // A server tool and an MCP server are named too.
    for (body, field) in [
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]}),
            "tools[].type (a server tool)",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                   "mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}]}),
            "mcp_servers",
        ),
    ] {
        let resp = messages_request(&gw, &key).body(body.to_string()).send().await.unwrap();
        assert_eq!(resp.status(), 403);
        let text = message(&resp.text().await.unwrap());
        assert!(text.starts_with(&format!("{field}: ")), "{text}");
    }
    assert!(mock.received().is_empty(), "no refused request reaches the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_do_not_hide_content_fetched_by_reference() {
    let (mock, key, gw) = refusing_by_reference().await;
    // `"\u0075rl"` is `"url"` to the provider, and `https:\/\/` a URL.
    let escaped = r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[
        {"type":"image","source":{"type":"\u0075rl","url":"https:\/\/example.com\/big.png"}}]}]}"#;
    let resp = messages_request(&gw, &key).body(escaped).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let text = message(&resp.text().await.unwrap());
    assert!(text.starts_with("source.type = \"url\": "), "{text}");
    // A body the exact reading cannot hold (a number past a 64-bit float) is refused under a
    // budget: what it reaches could not be known.
    let unreadable = r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[
        {"type":"image","source":{"type":"url","url":"https:\/\/example.com\/big.png"}}]},
        {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"n","input":{"a":1e400}}]},
        {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"ok"}]}]}"#;
    let resp = messages_request(&gw, &key).body(unreadable).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("cannot be read exactly (number out of range at line"),
        "{v}"
    );
    assert!(mock.received().is_empty(), "no refused request reaches the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_out_of_range_is_refused_before_anything_is_reserved() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // A shared output bucket of 64,000 tokens a minute: one bad value must not drain it.
    let gw = start_gateway(
        &config(&mock.url(), &key, "", "")
            .replace("max_attempts = 1\n", "max_attempts = 1\nlimits = { output_tpm = 64000 }\n"),
    );
    for raw in ["1000000000000000", "1e15", "-1", "1.5", "\"x\"", "0", "64001"] {
        let body = format!(r#"{{"model":"m","max_tokens":{raw},"messages":[{{"role":"user","content":"hi"}}]}}"#);
        let resp = messages_request(&gw, &key).body(body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "max_tokens {raw}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let text = v["error"]["message"].as_str().unwrap();
        assert!(text.starts_with("max_tokens: "), "{text}");
        if raw == "64001" || raw == "1000000000000000" {
            assert!(text.contains("above the 64000 tokens model m can generate"), "{text}");
        }
    }
    assert!(mock.received().is_empty(), "none reached the provider");
    // The whole minute's output allowance is still there.
    let body = json!({"model": "m", "max_tokens": 64000, "messages": [{"role": "user", "content": "hi"}]});
    let resp = messages_request(&gw, &key).body(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_mode_and_us_inference_are_reserved_at_their_prices() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let body = |extra: Value| {
        let mut b = json!({"model": "m", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    let plain = body(json!({}));
    let prompt = plain.len() as u64 + 1024;
    // Standard worst case, at the operator's own row: fast 6x, US 1.1x.
    let standard = prompt * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE;
    let price = "[[price]]\nmatch = \"claude-sonnet-4-5-20250929\"\ninput = 3.0\noutput = 15.0\ncache_read = 0.3\n\
                 cache_write_5m = 3.75\ncache_write_1h = 6.0\nfast = 6.0\ngeo = { us = 1.1 }\n";
    let key_extra = format!("budget = {{ usd = {}, period = \"daily\" }}", (2 * standard) as f64 / 1e9);
    let gw = start_gateway(&config(&mock.url(), &key, &key_extra, price));

    let fast = body(json!({"speed": "fast"}));
    let fast_prompt = fast.len() as u64 + 1024;
    let fast_worst = fast_prompt * 36_000 + MAX_TOKENS * 90_000;
    let resp = messages_request(&gw, &key).body(fast).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let text = message(&resp.text().await.unwrap());
    assert!(text.contains(&format!("may cost up to ${}", tollgate::metering::usd(fast_worst))), "{text}");

    let us = body(json!({"inference_geo": "us"}));
    let us_worst = (us.len() as u64 + 1024) * 6600 + MAX_TOKENS * 16_500;
    assert!(us_worst <= 2 * standard);
    let resp = messages_request(&gw, &key)
        .body(us)
        .header("x-mock-usage", r#"{"input_tokens": 10, "output_tokens": 20, "inference_geo": "us"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let _ = resp.bytes().await;
    // Billed by what the usage says ran: 10 x $3.30 + 20 x $16.50 per million.
    assert_eq!(gw.record(&id)["cost_nanos"], 10 * 3300 + 20 * 16_500);
}

/// A provider that reads a whole request and hangs up without a word.
async fn hang_up_provider() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            // Read the head and the declared body, then close.
            loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let _ = sock.shutdown().await;
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_written_whole_is_not_sent_again() {
    let (hang_up, _task) = hang_up_provider().await;
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let config = format!(
        "[[provider]]\nname = \"first\"\nkind = \"anthropic\"\nbase_url = \"{hang_up}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\", failures = 1000 }}\n\
         [[provider]]\nname = \"second\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"first\", model = \"{MODEL_ID}\" }}, {{ provider = \"second\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\n",
        url = mock.url(),
        hash = key.hash,
    );
    let gw = start_gateway(&config);
    let body = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let resp = messages_request(&gw, &key).body(body).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let id = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    assert!(mock.received().is_empty(), "the first provider may be generating it: no second try");
    let rec = gw.record(&id);
    let attempts = rec["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["provider"], "first");
    assert_eq!(attempts[0]["may_be_billed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_byte_timeout_falls_back_and_keeps_the_attempt_that_may_be_billed() {
    let slow =
        MockProvider::start(Behavior { header_delay: Duration::from_secs(3), ..Behavior::default() }).await.unwrap();
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let config = format!(
        "[[provider]]\nname = \"slow\"\nkind = \"anthropic\"\nbase_url = \"{slow}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         first_byte_timeout = \"300ms\"\nhealth = {{ probe = \"none\", failures = 1000 }}\n\
         [[provider]]\nname = \"second\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"slow\", model = \"{MODEL_ID}\" }}, {{ provider = \"second\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\n",
        slow = slow.url(),
        url = mock.url(),
        hash = key.hash,
    );
    let gw = start_gateway(&config);
    let body = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let resp = messages_request(&gw, &key).body(body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let attempts = gw.record(&id)["attempts"].as_array().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["may_be_billed"], true, "{attempts:?}");
    assert_eq!(attempts[1]["provider"], "second");
    assert!(attempts[1].get("may_be_billed").is_none());
}
