//! The audit log an operator can keep: built-in rotation by size and age with retention and
//! gzip, reopening on SIGHUP for logrotate, and refusals kept out of the ledger on request.
//! Every test counts records against the requests that were sent: none may be lost.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ADMIN: &str = "audit-log-admin-token-5d2e";

fn config(mock: &MockProvider, key: &TestKey, key_extra: &str) -> String {
    format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"mock\", model = \"claude-sonnet-4-5-20250929\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\nteam = \"t\"\n{key_extra}\n",
        url = mock.url(),
        hash = key.hash,
    )
}

fn start(audit: &str, store: &str, config: &str) -> Gateway {
    start_gateway_audit(audit, store, "token = \"env:TG_TEST_ADMIN_TOKEN\"", &[("TG_TEST_ADMIN_TOKEN", ADMIN)], config)
}

/// Sends one request; its status and request id.
async fn send(gw: &Gateway, key: &TestKey, stream: bool) -> (u16, String) {
    let resp = messages_request(gw, key).body(messages_body("m", stream, 0)).send().await.unwrap();
    let status = resp.status().as_u16();
    let id = resp.headers().get("x-tollgate-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let _ = resp.bytes().await.unwrap();
    (status, id)
}

/// The audit log's rotated files (`audit.jsonl.<stamp>` and `.gz`) beside the live one.
fn rotated(gw: &Gateway) -> Vec<PathBuf> {
    let dir = gw.audit_path.parent().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("audit.jsonl."))
        .collect();
    files.sort();
    files
}

fn lines_of(path: &Path) -> Vec<Value> {
    let mut text = String::new();
    let file = std::fs::File::open(path).unwrap();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap();
    } else {
        std::io::BufReader::new(file).read_to_string(&mut text).unwrap();
    }
    assert!(text.is_empty() || text.ends_with('\n'), "{} ends mid-line", path.display());
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()))).collect()
}

/// Every record on disk: rotated files (oldest first), then the live file.
fn all_records(gw: &Gateway) -> Vec<Value> {
    let mut out = Vec::new();
    for f in rotated(gw).iter().filter(|f| !f.to_str().unwrap().ends_with(".tmp")) {
        out.extend(lines_of(f));
    }
    out.extend(lines_of(&gw.audit_path));
    out
}

/// Waits until `n` records are on disk (the writer flushes every 20 ms).
fn wait_records(gw: &Gateway, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = all_records(gw);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn admin_usage(gw: &Gateway) -> Value {
    client()
        .get(gw.admin_url("/admin/usage?group_by=key"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A soak past the size cap many times over, 8 clients at once: every request's record is in
/// exactly one file, no line is split, and no file is larger than the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_size_loses_no_record() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    const CAP: u64 = 16 * 1024;
    let gw = start(&format!("rotate_bytes = {CAP}\nkeep = 1000"), "", &config(&mock, &key, ""));
    let mut ids = BTreeSet::new();
    for round in 0..50 {
        let sends = (0..8).map(|i| send(&gw, &key, (round + i) % 2 == 0));
        for (status, id) in futures_util::future::join_all(sends).await {
            assert_eq!(status, 200);
            ids.insert(id);
        }
    }
    assert_eq!(ids.len(), 400);
    let records = wait_records(&gw, 400);
    let seen: BTreeSet<String> = records.iter().map(|r| r["request_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(records.len(), 400, "each request once");
    assert_eq!(seen, ids);
    let files = rotated(&gw);
    // About 400 records of some 600 bytes in files of 16 KiB.
    assert!(files.len() >= 10, "{} rotations", files.len());
    for f in files.iter().chain([&gw.audit_path]) {
        let size = std::fs::metadata(f).unwrap().len();
        assert!(size <= CAP, "{} is {size} bytes", f.display());
    }
}

/// With `keep = 2` and gzip: past many rotations, two rotated files stay, each a complete gzip
/// of whole records, the newest ones; the records they and the live file hold are the last
/// ones sent, without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_files_compressed() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start("rotate_bytes = 8192\nkeep = 2\ncompress = true", "", &config(&mock, &key, ""));
    let mut ids = Vec::new();
    for _ in 0..120 {
        let (status, id) = send(&gw, &key, false).await;
        assert_eq!(status, 200);
        ids.push(id);
    }
    // Let the writer flush, then stop: the compressor finishes what is queued.
    wait_records(&gw, 0);
    std::thread::sleep(Duration::from_millis(300));
    let mut gw = gw;
    gw.stop();
    let files = rotated(&gw);
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_str().unwrap().to_string()).collect();
    assert_eq!(files.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".gz")), "{names:?}");
    let kept: Vec<String> = all_records(&gw).iter().map(|r| r["request_id"].as_str().unwrap().to_string()).collect();
    assert!(!kept.is_empty() && kept.len() < ids.len());
    assert_newest_without_a_gap(&kept, &ids);
}

/// `kept` holds the newest of `sent`, in order, with none missing. Each request here goes on a
/// new connection, so the gateway may still be logging one request when the next has arrived:
/// two neighbours' records can be written in either order, and across the boundary retention
/// cut, the older of the two may be the one kept. That much is allowed; a lost, repeated or
/// stray record is not.
fn assert_newest_without_a_gap(kept: &[String], sent: &[String]) {
    let at: Vec<usize> = kept
        .iter()
        .map(|id| sent.iter().position(|s| s == id).unwrap_or_else(|| panic!("{id} was never sent")))
        .collect();
    let mut sorted = at.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), at.len(), "a record written twice: {kept:?}");
    assert_eq!(sorted.last(), Some(&(sent.len() - 1)), "the newest record is kept");
    let missing = sent.len() - sorted[0] - sorted.len();
    let traded_at_the_cut = missing == 1 && sorted.len() > 1 && sorted[1] == sorted[0] + 2;
    assert!(missing == 0 || traded_at_the_cut, "a gap among the kept records: positions {sorted:?} of {}", sent.len());
    for pair in at.windows(2) {
        assert!(pair[0] < pair[1] || pair[0] == pair[1] + 1, "records out of order beyond a neighbour swap: {at:?}");
    }
}

/// `rotate_every`: a file with records is rotated once it is that old, counted from when it was
/// opened; an empty one is not. The test waits for each rotation rather than sleeping for a set
/// time: when the gateway opened its first file is not known here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_age() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start("rotate_bytes = 0\nrotate_every = \"1s\"", "", &config(&mock, &key, ""));
    let (_, first) = send(&gw, &key, false).await;
    wait_rotated(&gw, 1);
    // The live file was opened at that rotation: a record sent now lands in it.
    let (_, second) = send(&gw, &key, false).await;
    let files = wait_rotated(&gw, 2);
    let ids = |f: &Path| lines_of(f).iter().map(|r| r["request_id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(ids(&files[0]), [first]);
    assert_eq!(ids(&files[1]), [second]);
    assert!(lines_of(&gw.audit_path).is_empty());
    let age = stamp(&files[1]) - stamp(&files[0]);
    assert!(age >= chrono::TimeDelta::seconds(1), "the second file was rotated {age} after it was opened");
    // Idle for longer than the age: the empty file stays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rotated(&gw).len(), 2, "an empty file is not rotated");
}

/// Waits (up to 5 s) until `n` files have been rotated; the rotated files.
fn wait_rotated(gw: &Gateway, n: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let files = rotated(gw);
        assert!(files.len() <= n, "more rotations than expected: {files:?}");
        if files.len() == n {
            return files;
        }
        assert!(Instant::now() < deadline, "{} of {n} rotations after 5 s", files.len());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When a file was rotated, from its name (`audit.jsonl.20261201T145333.711Z`).
fn stamp(path: &Path) -> chrono::NaiveDateTime {
    let name = path.file_name().unwrap().to_str().unwrap();
    let stamp = name.trim_start_matches("audit.jsonl.").trim_end_matches(".gz");
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%S%.3fZ").unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// logrotate's way: it moves the file, then sends SIGHUP; records go to a new file at the path
/// from then on, and none is lost between the move and the signal (they land in the moved
/// file, which the gateway still has open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_file_an_outside_rotator_moved() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start("rotate_bytes = 0", "", &config(&mock, &key, ""));
    for _ in 0..3 {
        send(&gw, &key, false).await;
    }
    gw.wait_for_records(3);
    let moved = gw.audit_path.with_extension("jsonl.1");
    std::fs::rename(&gw.audit_path, &moved).unwrap();
    // Before the signal: still the moved file.
    send(&gw, &key, false).await;
    wait_lines(&moved, 4);
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.audit_path.exists() {
        assert!(Instant::now() < deadline, "no new file after SIGHUP\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..2 {
        send(&gw, &key, false).await;
    }
    wait_lines(&gw.audit_path, 2);
    assert_eq!(lines_of(&moved).len(), 4);
    assert_eq!(lines_of(&gw.audit_path).len(), 2);
}

/// Waits (up to 10 s) until the file at `path` holds `n` whole lines.
fn wait_lines(path: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() || lines_of(path).len() < n {
        assert!(Instant::now() < deadline, "{} never held {n} lines", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `store.record_refused = false`: a key hammering on its rate limit leaves ledger rows only
/// for what it was served; the refusals are in the audit log and the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_can_stay_out_of_the_ledger() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start("", "record_refused = false", &config(&mock, &key, "limits = { rpm = 2 }"));
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(send(&gw, &key, false).await.0);
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429, 429, 429, 429, 429]);
    // Every request's record is written after its row is queued: then the ledger has them all.
    wait_records(&gw, 10);
    let usage = admin_usage(&gw).await;
    assert_eq!(usage["rows"][0]["requests"], 2, "{usage}");
    assert_eq!(usage["rows"].as_array().unwrap().len(), 1, "{usage}");
    let records = wait_records(&gw, 10);
    assert_eq!(records.len(), 10);
    assert_eq!(records.iter().filter(|r| r["outcome"] == "rejected").count(), 8);
    let metrics = client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_refused_total{reason=\"rpm\"} 8"), "{metrics}");

    // The default keeps them: ten rows.
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let gw = start("", "", &config(&mock, &key, "limits = { rpm = 2 }"));
    for _ in 0..10 {
        send(&gw, &key, false).await;
    }
    wait_records(&gw, 10);
    assert_eq!(admin_usage(&gw).await["rows"][0]["requests"], 10);
}

/// A refused request's record leaves out what it does not have (no `null` fields), and a
/// served one's is unchanged in content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_leave_out_absent_fields() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw = start("", "", &config(&mock, &key, "limits = { rpm = 1 }"));
    let (_, served) = send(&gw, &key, false).await;
    let (_, refused) = send(&gw, &key, false).await;
    gw.wait_for_records(2);
    let raw = std::fs::read_to_string(&gw.audit_path).unwrap();
    assert!(!raw.contains("null"), "{raw}");
    let served = gw.record(&served);
    for field in ["key_id", "team", "model", "provider", "provider_model", "upstream_status", "ttfb_ms"] {
        assert!(!served[field].is_null(), "{field}: {served}");
    }
    let refused_line = raw.lines().find(|l| l.contains(&refused)).unwrap();
    let v: Value = serde_json::from_str(refused_line).unwrap();
    assert_eq!(v["status"], 429);
    // Refused after routing: the provider it would have gone to is known, no answer is.
    assert_eq!(v["provider"], "mock");
    assert!(v.get("upstream_status").is_none() && v.get("ttfb_ms").is_none() && v.get("user").is_none(), "{v}");
    eprintln!("served record {} bytes, refused {} bytes", raw.lines().next().unwrap().len(), refused_line.len());
}

/// The retention test's order check allows a neighbour swap and nothing more.
#[test]
fn the_newest_records_check_allows_a_neighbour_swap_only() {
    let sent: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let ids = |v: &[usize]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
    assert_newest_without_a_gap(&ids(&[6, 7, 8, 9]), &sent);
    assert_newest_without_a_gap(&ids(&[6, 8, 7, 9]), &sent);
    assert_newest_without_a_gap(&ids(&[5, 7, 8, 9]), &sent);
    for bad in [&[6, 7, 9][..], &[5, 6, 7, 9], &[6, 7, 8], &[7, 8, 9, 9], &[4, 7, 8, 9], &[8, 6, 7, 9]] {
        let caught = std::panic::catch_unwind(|| assert_newest_without_a_gap(&ids(bad), &sent));
        assert!(caught.is_err(), "{bad:?} passed");
    }
}
