//! Graceful stop: a stream in flight across SIGTERM finishes and is recorded; new connections
//! are refused; the process exits as soon as nothing is in flight.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A stream of about 1.8 s: 9 events, 200 ms apart.
async fn slow_stream(gw: &Gateway, key: &TestKey) -> reqwest::Response {
    let resp = messages_request(gw, key)
        .header("x-mock-delay-ms", "200")
        .body(messages_body("m", true, 10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_and_refuses_new_connections() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let config = one_provider_config(&mock.url(), &key);
    let mut gw = start_gateway(&config);
    let mut resp = slow_stream(&gw, &key).await;
    let rid = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"event: message_start"));

    gw.signal("TERM");
    // The listener closes: a new connection is refused.
    let port = gw.port;
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "the listener still accepts after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The stream in flight runs to its end.
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(rest.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

    // And the process exits on its own, well before the 5 s grace period, with the record written.
    let started = Instant::now();
    let status = gw.stop();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "exit took {:?}", started.elapsed());
    let records = gw.records();
    let rec = records.iter().find(|r| r["request_id"] == rid.as_str()).expect("the drained stream is recorded");
    assert_eq!(rec["outcome"], "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_hands_over_the_listener_without_dropping_a_stream() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let config = one_provider_config(&mock.url(), &key);
    let mut old = start_gateway(&config);
    let mut stream = slow_stream(&old, &key).await;
    stream.chunk().await.unwrap().unwrap();

    // The new process waits for the sockets; the old one hands them over on SIGQUIT.
    let mut new = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--upgrade", "--config"])
        .arg(&old.config_path)
        .env("TG_TEST_PROVIDER_KEY", PROVIDER_SECRET)
        .env("TOLLGATE_LOG", "warn")
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");

    // Requests keep being answered throughout, now by the new process.
    for _ in 0..10 {
        let r = messages_request(&old, &key).body(messages_body("m", false, 1)).send().await;
        assert_eq!(r.expect("the port keeps accepting").status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stream that started on the old process finishes there.
    let mut rest = Vec::new();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert!(rest.ends_with(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    let status = old.stop();
    assert!(status.success(), "{status:?}");
    let r = messages_request(&old, &key).body(messages_body("m", false, 1)).send().await.unwrap();
    assert_eq!(r.status(), 200, "the new process serves after the old one left");
    let _ = std::process::Command::new("kill").args(["-TERM", &new.id().to_string()]).status();
    let _ = new.wait();
}
