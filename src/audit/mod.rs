//! The audit log: usage records (and sign-in events, [`AuditEvent`]) as JSON lines, written by
//! a dedicated thread.
//!
//! The request path pushes the record onto a bounded in-memory batch under a short mutex: no
//! system call and no wake-up per request. The writer thread wakes every few milliseconds,
//! takes the whole batch and writes it out. When the batch is full (the disk cannot keep up),
//! the record is dropped, counted in `tollgate_audit_dropped_total` and logged: a request never
//! waits on the disk. The file rotates itself by size and age ([`file`]), or is reopened on
//! SIGHUP for an outside rotator.

mod event;
mod file;
mod line;

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

pub use event::AuditEvent;
pub use file::{rotated_files, Rotation};

/// One line of the log. Usage records are nearly every line: boxing them to even out the
/// variants would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Entry {
    Usage(UsageRecord),
    Event(AuditEvent),
}

struct Shared {
    batch: Mutex<Vec<Entry>>,
    capacity: usize,
    stopping: AtomicBool,
    /// Set by SIGHUP: the writer opens the path again before its next write.
    reopen: AtomicBool,
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
        self.push(Entry::Usage(record));
    }

    /// A sign-in, a revocation: written like a usage record, in order with them.
    pub fn event(&self, event: AuditEvent) {
        self.push(Entry::Event(event));
    }

    fn push(&self, entry: Entry) {
        let mut batch = self.shared.batch.lock().unwrap_or_else(|p| p.into_inner());
        if batch.len() < self.shared.capacity {
            batch.push(entry);
            return;
        }
        drop(batch);
        self.dropped.inc();
        // One log line per thousand drops is enough to be seen without flooding.
        if DROPPED_LOGGED.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
            tracing::error!(total = self.dropped.get(), "audit queue full: usage records dropped");
        }
    }

    /// Makes the writer open its path again (after logrotate moved the file away).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
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
    let rotation = Rotation {
        max_bytes: config.rotate_bytes,
        every: config.rotate_every,
        keep: config.keep,
        compress: config.compress,
    };
    let file = file::LogFile::open(&config.path, rotation)?;
    let capacity = config.queue_capacity.max(1);
    let shared = Arc::new(Shared {
        batch: Mutex::new(Vec::with_capacity(1024)),
        capacity,
        stopping: AtomicBool::new(false),
        reopen: AtomicBool::new(false),
    });
    let interval = config.flush_interval;
    let s = shared.clone();
    let thread =
        std::thread::Builder::new().name("tollgate-audit".into()).spawn(move || write_loop(&s, file, interval))?;
    Ok((AuditLog { shared: shared.clone(), dropped }, AuditWriter { shared, thread }))
}

fn write_loop(shared: &Shared, mut out: file::LogFile, flush_interval: Duration) {
    let mut spare = Vec::with_capacity(1024);
    let mut line = Vec::with_capacity(2048);
    let mut dirty = false;
    let mut last_flush = Instant::now();
    loop {
        std::thread::park_timeout(DRAIN_EVERY.min(flush_interval));
        let stopping = shared.stopping.load(Ordering::Acquire);
        if shared.reopen.swap(false, Ordering::AcqRel) {
            match out.reopen() {
                Ok(()) => tracing::info!("audit log reopened"),
                Err(e) => tracing::error!(error = %e, "cannot reopen the audit log; writing on to the file open"),
            }
        }
        out.tick();
        std::mem::swap(&mut *shared.batch.lock().unwrap_or_else(|p| p.into_inner()), &mut spare);
        dirty |= !spare.is_empty();
        write_batch(&mut out, &mut spare, &mut line);
        if dirty && (stopping || last_flush.elapsed() >= flush_interval) {
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "cannot flush the audit log");
            }
            dirty = false;
            last_flush = Instant::now();
        }
        if stopping {
            out.close();
            return;
        }
    }
}

/// Writes out and empties a batch. Never inlined, so a profile shows the writer's cost per
/// batch under one name.
#[inline(never)]
fn write_batch(out: &mut file::LogFile, batch: &mut Vec<Entry>, line: &mut Vec<u8>) {
    for r in batch.drain(..) {
        line.clear();
        match &r {
            Entry::Usage(u) => line::usage_record(u, line),
            Entry::Event(ev) => serde_json::to_writer(&mut *line, ev).expect("audit events serialize"),
        }
        line.push(b'\n');
        if let Err(e) = out.write_line(line) {
            match &r {
                Entry::Usage(u) => tracing::error!(error = %e, request_id = %u.request_id, "cannot write usage record"),
                Entry::Event(ev) => tracing::error!(error = %e, event = ev.event, "cannot write audit event"),
            }
        }
    }
}
