//! Malformed and hostile requests get a clear 4xx in the Anthropic shape, never a 5xx, and the
//! gateway keeps serving.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

/// Sends raw bytes and returns the response head and body as text.
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_client_errors() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&one_provider_config(&mock.url(), &key));
    let port = gw.port;
    let k = &key.key;
    let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), "400", Some("no Host header")),
        (b"TRACE /v1/messages HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".to_vec(), "405", Some("invalid_request_error")),
        (b"GET /v1/..%2F..%2Fmetrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".to_vec(), "404", Some("not_found_error")),
        (
            format!("GET /{} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", "a".repeat(4000)).into_bytes(),
            "414",
            Some("longer than 2048"),
        ),
        (
            format!("POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n").into_bytes(),
            "400",
            Some("invalid_request_error"),
        ),
        // Refused by Pingora's own parser: still a 400, just without our body.
        (b"GARBAGE\r\n\r\n".to_vec(), "400", None),
        (format!("POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes(), "400", None),
    ];
    for (request, status, body_has) in cases {
        let response = raw(port, &request);
        let head = response.lines().next().unwrap_or_default().to_string();
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{head:?} for {:?}",
            String::from_utf8_lossy(&request[..40.min(request.len())])
        );
        if let Some(text) = body_has {
            assert!(response.contains("\"type\":\"error\""), "{response}");
            assert!(response.contains(text), "{response}");
        }
    }
    assert!(mock.received().is_empty(), "nothing malformed reaches the provider");
    // And a normal request is still served.
    let ok = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", k)
        .body(messages_body("m", false, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway_with("client_idle_timeout = \"1s\"", &one_provider_config(&mock.url(), &key));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Nothing more is sent: the gateway closes the connection after about a second.
    let started = std::time::Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the idle connection is closed, not answered");
    assert!(started.elapsed() < Duration::from_secs(4), "closed after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asks_to_close_gets_its_close() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&one_provider_config(&mock.url(), &key));
    for request in [&b"HEAD / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"[..], b"HEAD / HTTP/1.0\r\n\r\n"] {
        let started = std::time::Instant::now();
        // `raw` reads to the end: it returns only once the gateway closes the connection.
        let response = raw(gw.port, request);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(started.elapsed() < Duration::from_secs(2), "the connection stayed open");
    }
}
