//! The audit log: usage records as JSON lines, written by a dedicated thread.
//!
//! The request path pushes the record onto a bounded in-memory batch under a short mutex: no
//! system call and no wake-up per request. The writer thread wakes every few milliseconds,
//! takes the whole batch and writes it out. When the batch is full (the disk cannot keep up),
//! the record is dropped, counted in `tollgate_audit_dropped_total` and logged: a request never
//! waits on the disk.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::config::AuditConfig;
use crate::metering::UsageRecord;

/// How often the writer takes the batch. Short enough that a full second of traffic never
/// piles up in memory; long enough that waking up costs nothing.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

struct Shared {
    batch: Mutex<Vec<UsageRecord>>,
    capacity: usize,
    stopping: AtomicBool,
}

/// The sending side, shared by all workers.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    dropped: IntCounter,
}

static DROPPED_LOGGED: AtomicU64 = AtomicU64::new(0);

impl AuditLog {
    pub fn submit(&self, record: UsageRecord) {
        let mut batch = self.shared.batch.lock().unwrap_or_else(|p| p.into_inner());
        if batch.len() < self.shared.capacity {
            batch.push(record);
            return;
        }
        drop(batch);
        self.dropped.inc();
        // One log line per thousand drops is enough to be seen without flooding.
        if DROPPED_LOGGED.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
            tracing::error!(total = self.dropped.get(), "audit queue full: usage records dropped");
        }
    }
}

/// The writing side; [`AuditWriter::shutdown`] writes out everything queued and stops.
pub struct AuditWriter {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

impl AuditWriter {
    pub fn shutdown(self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

pub fn start(config: &AuditConfig, dropped: IntCounter) -> std::io::Result<(AuditLog, AuditWriter)> {
    let file =
        OpenOptions::new().create(true).append(true).open(&config.path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open audit log {}: {e}", config.path.display()))
        })?;
    let capacity = config.queue_capacity.max(1);
    let shared =
        Arc::new(Shared { batch: Mutex::new(Vec::with_capacity(1024)), capacity, stopping: AtomicBool::new(false) });
    let interval = config.flush_interval;
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("tollgate-audit".into())
        .spawn(move || write_loop(&s, BufWriter::with_capacity(256 << 10, file), interval))?;
    Ok((AuditLog { shared: shared.clone(), dropped }, AuditWriter { shared, thread }))
}

fn write_loop(shared: &Shared, mut out: BufWriter<std::fs::File>, flush_interval: Duration) {
    let mut spare = Vec::with_capacity(1024);
    let mut dirty = false;
    let mut last_flush = Instant::now();
    loop {
        std::thread::park_timeout(DRAIN_EVERY.min(flush_interval));
        let stopping = shared.stopping.load(Ordering::Acquire);
        std::mem::swap(&mut *shared.batch.lock().unwrap_or_else(|p| p.into_inner()), &mut spare);
        for r in spare.drain(..) {
            let line =
                serde_json::to_writer(&mut out, &r).map_err(std::io::Error::from).and_then(|_| out.write_all(b"\n"));
            if let Err(e) = line {
                tracing::error!(error = %e, request_id = %r.request_id, "cannot write usage record");
            }
            dirty = true;
        }
        if dirty && (stopping || last_flush.elapsed() >= flush_interval) {
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "cannot flush the audit log");
            }
            dirty = false;
            last_flush = Instant::now();
        }
        if stopping {
            return;
        }
    }
}
