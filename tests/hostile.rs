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
        // A request line past server.max_header_bytes is refused as it arrives, before Pingora
        // parses it (Pingora alone would read up to 1 MB and answer an empty 400).
        (
            format!("GET /{} HTTP/1.1\r\nHost: gw\r\n\r\n", "a".repeat(40 << 10)).into_bytes(),
            "414",
            Some("request line is longer than 32768 bytes"),
        ),
        // Malformed heads are refused before Pingora's parser sees them, with a 400 that says
        // what is wrong (Pingora alone answers these with an empty 400).
        (b"GARBAGE\r\n\r\n".to_vec(), "400", Some("the request line is not")),
        (format!("POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes(), "400", Some("control character")),
        (b"GET / HTTP/1.1\r\nHost: gw\r\nX-Bad: a\rb\r\n\r\n".to_vec(), "400", Some("CR in the request head")),
        (b"GET / HTTP/1.1\r\nHost : gw\r\n\r\n".to_vec(), "400", Some("no colon")),
        (
            format!("POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\nContent-Length: 999999999\r\n\r\n{{").into_bytes(),
            "413",
            Some("request_too_large"),
        ),
        (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\n".to_vec(), "400", Some("Content-Length is not a number")),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec(), "405", Some("not a tunnel")),
        (
            format!("POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into_bytes(),
            "400",
            Some("both Content-Length and Transfer-Encoding"),
        ),
    ];
    // All at once, each on its own connection, while normal requests are served.
    let sent: Vec<_> = cases
        .into_iter()
        .map(|(request, status, body_has)| {
            let answer = std::thread::spawn(move || raw(port, &request));
            (answer, status, body_has)
        })
        .collect();
    served_promptly(port, &key).await;
    for (answer, status, body_has) in sent {
        let response = answer.join().unwrap();
        let head = response.lines().next().unwrap_or_default().to_string();
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head:?} for {body_has:?}");
        if let Some(text) = body_has {
            assert!(response.contains("\"type\":\"error\""), "{response}");
            assert!(response.contains(text), "{response}");
        }
    }
    assert_eq!(mock.received().len(), 1, "nothing malformed reaches the provider");
    served_promptly(port, &key).await;
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
    // Nothing more is sent: the gateway closes the connection after about a second, and serves
    // others meanwhile.
    let started = std::time::Instant::now();
    served_promptly(gw.port, &key).await;
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

/// Sends a normal request on a fresh connection and asserts it is answered within a second:
/// what an attack in progress must not prevent.
async fn served_promptly(port: u16, key: &TestKey) {
    let started = std::time::Instant::now();
    let ok = client()
        .post(format!("http://127.0.0.1:{port}/v1/messages"))
        .header("x-api-key", &key.key)
        .body(messages_body("m", false, 1))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1), "a normal request waited {:?}", started.elapsed());
}

/// A raw connection that sends `head`, then `drip` one byte at a time every `every`, while
/// reading. Returns what the gateway answered and how long after the start the connection ended.
fn slow_client(
    port: u16,
    head: Vec<u8>,
    drip: Vec<u8>,
    every: Duration,
) -> std::thread::JoinHandle<(String, Duration)> {
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut writer = s.try_clone().unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let dripper = std::thread::spawn(move || {
            if writer.write_all(&head).is_err() {
                return;
            }
            for b in drip {
                std::thread::sleep(every);
                if stop.load(std::sync::atomic::Ordering::Relaxed) || writer.write_all(&[b]).is_err() {
                    return;
                }
            }
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }
        let ended = started.elapsed();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = dripper.join();
        (String::from_utf8_lossy(&out).into_owned(), ended)
    })
}

async fn metrics(gw: &Gateway) -> String {
    client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap()
}

fn assert_refusal(answer: &str, status: &str, message_has: &str) {
    assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer:?}");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    assert_eq!(v["type"], "error", "{answer}");
    assert!(v["error"]["message"].as_str().unwrap().contains(message_has), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_get_408_while_others_are_served() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway_with("header_timeout = \"1s\"", &one_provider_config(&mock.url(), &key));
    // Slowloris: a head that never ends, one byte every 200 ms; and a connection that sends
    // nothing at all.
    let head = b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\n".to_vec();
    let dribbling = slow_client(gw.port, head, vec![b'x'; 100], Duration::from_millis(200));
    let silent = slow_client(gw.port, Vec::new(), Vec::new(), Duration::ZERO);
    for _ in 0..3 {
        served_promptly(gw.port, &key).await;
    }
    for (answer, ended) in [dribbling.join().unwrap(), silent.join().unwrap()] {
        assert_refusal(&answer, "408", "did not arrive within 1s");
        assert!(ended >= Duration::from_millis(900) && ended < Duration::from_secs(3), "ended after {ended:?}");
    }
    // The deadline is per request head: a kept-alive connection that sends its next request
    // after a pause longer than the deadline is still served.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..2 {
        s.write_all(b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(metrics(&gw).await.contains("tollgate_client_refused_total{reason=\"header_timeout\"} 2\n"));
    assert!(mock.received().len() == 3, "only the normal requests reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_and_414() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway_with("max_header_bytes = 8192\nmax_headers = 20", &one_provider_config(&mock.url(), &key));
    let k = &key.key;
    let big =
        format!("POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\nx-pad: {}\r\n\r\n", "p".repeat(20 << 10));
    let many = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\n{}\r\n",
        (0..30).map(|i| format!("x-h{i}: v\r\n")).collect::<String>()
    );
    // Pingora alone caps a head at 256 lines with an empty 400; this is far past that.
    let very_many = format!("GET / HTTP/1.1\r\nHost: gw\r\n{}\r\n", "x: v\r\n".repeat(1000));
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: gw\r\n\r\n", "a".repeat(9000));
    let attacks = [
        (big, "431", "request head is larger than 8192 bytes"),
        (many, "431", "more than 20 header lines"),
        (very_many, "431", "more than 20 header lines"),
        (long_line, "414", "request line is longer than 8192 bytes"),
    ]
    .map(|(req, status, message)| {
        (slow_client(gw.port, req.into_bytes(), Vec::new(), Duration::ZERO), status, message)
    });
    served_promptly(gw.port, &key).await;
    for (attack, status, message) in attacks {
        let (answer, _) = attack.join().unwrap();
        assert_refusal(&answer, status, message);
    }
    // Exactly at the limit is fine: 20 header lines.
    let body = messages_body("m", false, 1);
    let twenty = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {k}\r\nConnection: close\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        (0..16).map(|i| format!("x-h{i}: v\r\n")).collect::<String>()
    );
    let answer = raw(gw.port, twenty.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let m = metrics(&gw).await;
    assert!(m.contains("tollgate_client_refused_total{reason=\"too_many_headers\"} 2\n"), "{m}");
    assert!(m.contains("tollgate_client_refused_total{reason=\"header_too_large\"} 1\n"), "{m}");
    assert!(m.contains("tollgate_client_refused_total{reason=\"uri_too_long\"} 1\n"), "{m}");
    assert_eq!(mock.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_get_408_while_others_are_served() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway_with(
        "body_read_timeout = \"1s\"\nbody_timeout = \"2s\"",
        &one_provider_config(&mock.url(), &key),
    );
    let head = |len: usize| {
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\ncontent-type: application/json\r\nContent-Length: {len}\r\n\r\n{{\"model\"",
            key.key
        )
        .into_bytes()
    };
    // Stalls after a few bytes of body; and sends its body steadily but too slowly.
    let stalled = slow_client(gw.port, head(100), Vec::new(), Duration::ZERO);
    let trickle = slow_client(gw.port, head(1000), vec![b' '; 100], Duration::from_millis(300));
    served_promptly(gw.port, &key).await;
    let (answer, ended) = stalled.join().unwrap();
    assert_refusal(&answer, "408", "sent nothing for 1s");
    assert!(ended < Duration::from_secs(3), "{ended:?}");
    let (answer, ended) = trickle.join().unwrap();
    assert_refusal(&answer, "408", "did not arrive within 2s");
    assert!(ended >= Duration::from_millis(1900) && ended < Duration::from_secs(4), "{ended:?}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    let m = metrics(&gw).await;
    assert!(m.contains("tollgate_client_refused_total{reason=\"body_timeout\"} 2\n"), "{m}");
    // Both are in the audit log as rejected, with the key that sent them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.records().iter().filter(|r| r["status"] == 408).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", gw.records());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gw.records().iter().filter(|r| r["status"] == 408).all(|r| r["key_id"] == "a"));
    assert_eq!(mock.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_answers_503_and_frees_slots_as_connections_close() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // A second listener, uncapped, on the same gateway.
    let second = free_port();
    let listener_extra = format!("max_connections = 3\n[[listener]]\naddress = \"127.0.0.1:{second}\"");
    let gw = start_gateway_full("", &listener_extra, &one_provider_config(&mock.url(), &key));
    // The harness's own connection that found the gateway listening may not have given its
    // slot back yet (on a loaded machine): wait for the listener to be empty.
    let open = format!("tollgate_open_connections{{listener=\"127.0.0.1:{}\"}} 0\n", gw.port);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !metrics(&gw).await.contains(&open) {
        assert!(std::time::Instant::now() < deadline, "{}", metrics(&gw).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Three connections that hold their slot (kept alive after one request each).
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    let answer = raw(gw.port, b"HEAD / HTTP/1.1\r\nHost: gw\r\n\r\n");
    assert_refusal(&answer, "503", "maximum of 3 open connections");
    assert!(answer.contains("\"type\":\"overloaded_error\""), "{answer}");
    served_promptly(second, &key).await;
    let m = metrics(&gw).await;
    assert!(m.contains(&format!("tollgate_open_connections{{listener=\"127.0.0.1:{}\"}} 3\n", gw.port)), "{m}");
    assert!(m.contains("tollgate_client_refused_total{reason=\"connection_limit\"} 1\n"), "{m}");
    // One closes; its slot comes back.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = client()
            .post(gw.url("/v1/messages"))
            .header("x-api-key", &key.key)
            .body(messages_body("m", false, 1))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_not_buffered_for() {
    let mock = MockProvider::start(Behavior { record: false, ..Behavior::default() }).await.unwrap();
    let key = new_key();
    let gw = start_gateway_with("client_write_timeout = \"2s\"", &one_provider_config(&mock.url(), &key));
    served_promptly(gw.port, &key).await;
    let before = rss_kib(gw.pid());
    // About 30 MB of answer, as fast as the mock can send it, to a client that reads 1 KB and
    // then nothing.
    let body = messages_body("m", true, 1);
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\nx-mock-deltas: 200000\r\nContent-Length: {}\r\n\r\n{body}",
        key.key,
        body.len()
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut first = [0u8; 1024];
    s.read_exact(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"));
    // While it stalls: the gateway holds no more than its socket buffers' worth, and serves others.
    let mut peak = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        peak = peak.max(rss_kib(gw.pid()));
    }
    served_promptly(gw.port, &key).await;
    assert!(peak < before + 8 * 1024, "RSS grew from {before} KiB to {peak} KiB for a stalled client");
    // After client_write_timeout the client is dropped, the upstream cut, and the partial answer
    // recorded as incomplete with the usage read so far.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let record = loop {
        if let Some(r) = gw.records().into_iter().find(|r| r["outcome"] == "incomplete") {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "{:?}", gw.records());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record["key_id"], "a");
    assert!(record["usage"]["input_tokens"].as_u64().unwrap() > 0, "{record}");
    assert!(record["error"].as_str().unwrap_or_default().contains("client"), "{record}");
    // What the client received stops well short of the 30 MB sent its way.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    eprintln!("RSS {before} KiB before, {peak} KiB at most while stalled; the client got {} bytes", 1024 + rest.len());
    assert!(rest.len() < 20 << 20, "the client got {} bytes", rest.len());
    assert!(!String::from_utf8_lossy(&rest).contains("message_stop"), "the answer was cut, not finished");
}
