//! `kill -9` under load loses at most the ledger rows of requests that ended within the last
//! `store.flush_interval` (50 ms in the harness) before the kill, never a row committed
//! earlier, and never invents one. Start-up after the crash is clean and spend continues from
//! the ledger.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// How late a row may be, beyond the flush interval: a commit of a few hundred rows and the
/// scheduling slack of a 2-core machine running the gateway, the mock and the clients.
const SLACK: Duration = Duration::from_millis(250);
const FLUSH: Duration = Duration::from_millis(50);

fn ledger_ids(gw: &Gateway) -> HashSet<String> {
    let db = rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap();
    let mut stmt = db.prepare("SELECT request_id FROM ledger").unwrap();
    let ids = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_at_most_the_flush_window() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start_gateway(&one_provider_config(&mock.url(), &key));

    // Eight clients send requests back to back; each answer seen whole is noted with the time
    // it was seen.
    let seen: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (seen, stop, url, k) = (seen.clone(), stop.clone(), gw.url("/v1/messages"), key.key.clone());
        let stream = i % 2 == 0;
        clients.push(tokio::spawn(async move {
            let http = client();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(resp) = http.post(&url).header("x-api-key", &k).body(messages_body("m", stream, 1)).send().await
                else {
                    continue;
                };
                let id = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
                // Whole: a streamed answer ends with message_stop, a JSON one parses.
                let whole = match resp.text().await {
                    Ok(text) if stream => text.contains("event: message_stop"),
                    Ok(text) => serde_json::from_str::<serde_json::Value>(&text).is_ok(),
                    Err(_) => false,
                };
                if whole {
                    seen.lock().unwrap().push((id, Instant::now()));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.signal("KILL");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let seen = seen.lock().unwrap().clone();
    let seen_ids: HashSet<String> = seen.iter().map(|(id, _)| id.clone()).collect();
    assert!(seen.len() > 100, "the load was too light to mean anything: {}", seen.len());
    let ledger = ledger_ids(&gw);
    // Every answer seen before the window is in the ledger.
    let must = seen.iter().filter(|(_, at)| *at + FLUSH + SLACK < killed).collect::<Vec<_>>();
    let lost: Vec<_> = must.iter().filter(|(id, _)| !ledger.contains(id)).collect();
    assert!(lost.is_empty(), "{} of {} answers seen before the window are not in the ledger", lost.len(), must.len());
    // Nothing in the ledger that no client started: a row is either an answer seen, or one of
    // the at most eight in flight at the kill (answered, but not yet read whole by its client).
    let unseen = ledger.difference(&seen_ids).count();
    assert!(unseen <= 8, "{unseen} ledger rows for answers no client saw");
    let missing: Vec<Duration> = seen
        .iter()
        .filter(|(id, _)| !ledger.contains(id))
        .map(|(_, at)| killed.saturating_duration_since(*at))
        .collect();
    eprintln!(
        "answers seen: {}, ledger rows: {}, seen but not in the ledger: {} (the oldest seen {:?} before the kill)",
        seen.len(),
        ledger.len(),
        missing.len(),
        missing.iter().max().copied().unwrap_or_default()
    );

    // Start-up after the crash is clean: the same store opens, requests are served and recorded.
    let _child = respawn(&gw, &[]);
    let resp = messages_request(&gw, &key).body(messages_body("m", false, 1)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ledger_ids(&gw).contains(&id) {
        assert!(Instant::now() < deadline, "the request after the restart never reached the ledger");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ledger_ids(&gw).is_superset(&ledger), "rows committed before the crash are all still there");
}
