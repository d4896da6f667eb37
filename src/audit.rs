//! The audit log: usage records as JSON lines, written by a dedicated thread.
//!
//! The request path only does a non-blocking `try_send` into a bounded queue. When the queue is
//! full (the disk cannot keep up) the record is dropped, counted in
//! `tollgate_audit_dropped_total` and logged; the request itself never waits on the disk.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::config::AuditConfig;
use crate::metering::UsageRecord;

enum Msg {
    Record(Box<UsageRecord>),
    Shutdown,
}

/// The sending side, shared by all workers.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    dropped: IntCounter,
}

static DROPPED_LOGGED: AtomicU64 = AtomicU64::new(0);

impl AuditLog {
    pub fn submit(&self, record: UsageRecord) {
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
                // One log line per thousand drops is enough to be seen without flooding.
                if DROPPED_LOGGED.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                    tracing::error!(total = self.dropped.get(), "audit queue full: usage records dropped");
                }
            }
        }
    }
}

/// The writing side; [`AuditWriter::shutdown`] writes out everything queued and stops.
pub struct AuditWriter {
    tx: SyncSender<Msg>,
    thread: JoinHandle<()>,
}

impl AuditWriter {
    pub fn shutdown(self) {
        let _ = self.tx.send(Msg::Shutdown);
        let _ = self.thread.join();
    }
}

pub fn start(config: &AuditConfig, dropped: IntCounter) -> std::io::Result<(AuditLog, AuditWriter)> {
    let file =
        OpenOptions::new().create(true).append(true).open(&config.path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open audit log {}: {e}", config.path.display()))
        })?;
    let (tx, rx) = sync_channel(config.queue_capacity.max(1));
    let interval = config.flush_interval;
    let thread = std::thread::Builder::new()
        .name("tollgate-audit".into())
        .spawn(move || write_loop(rx, BufWriter::with_capacity(256 << 10, file), interval))?;
    Ok((AuditLog { tx: tx.clone(), dropped }, AuditWriter { tx, thread }))
}

fn write_loop(rx: Receiver<Msg>, mut out: BufWriter<std::fs::File>, interval: Duration) {
    let mut dirty = false;
    let mut last_flush = Instant::now();
    loop {
        match rx.recv_timeout(interval) {
            Ok(Msg::Record(r)) => {
                if let Err(e) =
                    serde_json::to_writer(&mut out, &r).map_err(std::io::Error::from).and_then(|_| out.write_all(b"\n"))
                {
                    tracing::error!(error = %e, request_id = %r.request_id, "cannot write usage record");
                }
                dirty = true;
            }
            Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if dirty && last_flush.elapsed() >= interval {
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "cannot flush the audit log");
            }
            dirty = false;
            last_flush = Instant::now();
        }
    }
    // Whatever is still queued was sent before the stop: write it too.
    while let Ok(Msg::Record(r)) = rx.try_recv() {
        let _ = serde_json::to_writer(&mut out, &r);
        let _ = out.write_all(b"\n");
    }
    if let Err(e) = out.flush() {
        tracing::error!(error = %e, "cannot flush the audit log");
    }
}
