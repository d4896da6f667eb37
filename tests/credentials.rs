//! Provider credentials follow their references: a reload (SIGHUP) reads every `file:` secret
//! again, so a rotated API key or a renewed set of temporary AWS keys is used from the next
//! request on, without a restart; an unreadable one leaves the running credential in place.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Sends a request and returns what the provider received as its credential header.
async fn credential_seen(gw: &Gateway, key: &TestKey, mock: &MockProvider, header: &str) -> String {
    mock.clear();
    let body = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let resp = messages_request(gw, key).body(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let received = mock.received();
    received[0].headers.get(header).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// Waits until a reload has taken effect: the provider sees `want` in its credential header.
async fn until_seen(gw: &Gateway, key: &TestKey, mock: &MockProvider, header: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = credential_seen(gw, key, mock, header).await;
        if seen.contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{header} is still {seen:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_file_secret_is_used_after_sighup() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("anthropic-key");
    std::fs::write(&secret, "sk-ant-first\n").unwrap();
    let gw = start_gateway(&format!(
        "[[provider]]\nname = \"a\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"file:{file}\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"a\", model = \"claude-sonnet-4-5-20250929\" }}]\n\
         [[key]]\nid = \"k\"\nhash = \"{hash}\"\n",
        url = mock.url(),
        file = secret.display(),
        hash = key.hash,
    ));
    assert_eq!(credential_seen(&gw, &key, &mock, "x-api-key").await, "sk-ant-first");

    std::fs::write(&secret, "sk-ant-second\n").unwrap();
    gw.signal("HUP");
    until_seen(&gw, &key, &mock, "x-api-key", "sk-ant-second").await;

    // A secret that cannot be read any more leaves the running one in place.
    std::fs::remove_file(&secret).unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(credential_seen(&gw, &key, &mock, "x-api-key").await, "sk-ant-second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_temporary_aws_keys_sign_after_sighup() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let write = |id: &str, token: &str| {
        std::fs::write(dir.path().join("id"), id).unwrap();
        std::fs::write(dir.path().join("secret"), "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY").unwrap();
        std::fs::write(dir.path().join("token"), token).unwrap();
    };
    write("ASIAFIRSTKEY0000", "token-one");
    let d = dir.path().display();
    let gw = start_gateway(&format!(
        "[[provider]]\nname = \"b\"\nkind = \"bedrock\"\nregion = \"us-east-1\"\nbase_url = \"{url}\"\n\
         aws = {{ access_key_id = \"file:{d}/id\", secret_access_key = \"file:{d}/secret\", session_token = \"file:{d}/token\" }}\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"b\", model = \"global.anthropic.claude-sonnet-4-5-20250929-v1:0\" }}]\n\
         [[key]]\nid = \"k\"\nhash = \"{hash}\"\n",
        url = mock.url(),
        hash = key.hash,
    ));
    let auth = credential_seen(&gw, &key, &mock, "authorization").await;
    assert!(auth.contains("Credential=ASIAFIRSTKEY0000/"), "{auth}");
    assert_eq!(mock.received()[0].headers["x-amz-security-token"], "token-one");

    write("ASIASECONDKEY000", "token-two");
    gw.signal("HUP");
    until_seen(&gw, &key, &mock, "authorization", "Credential=ASIASECONDKEY000/").await;
    assert_eq!(mock.received()[0].headers["x-amz-security-token"], "token-two");
}
