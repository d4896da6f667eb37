//! The ledger and keys of a fleet, in PostgreSQL. Every gateway writes its ledger rows to the
//! same tables and reads every key from them, so reports and keys are the fleet's whichever
//! gateway is asked.
//!
//! As with SQLite, the request path only queues a row: a writer task commits the queue in
//! batches (multi-row inserts, idempotent by request id). While the database cannot be
//! reached, rows go to a spool file on local disk (appended and synced), replayed in order
//! when it is back. The schema is migrated at start (and by `tollgate migrate`) under an
//! advisory lock, so gateways starting together apply each migration once.
//!
//! The connection lives on a runtime of its own; the store's methods are synchronous (the
//! [`Store`] trait is) and wait on it through a channel, so they may be called from any
//! thread, an admin worker included, without nesting runtimes.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use super::pg_tls::Rustls;

use super::{
    AlertMark, Group, LedgerRow, SsoSession, Store, StoreError, StoreResult, StoredKey, UsageLine, UsageQuery,
};
use crate::limits::ScopeKind;

/// Each migration once, in order; the version table says which ran.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE tollgate_keys (
        id TEXT PRIMARY KEY,
        hash BYTEA NOT NULL UNIQUE,
        user_id TEXT,
        team TEXT,
        models TEXT,
        budget TEXT,
        limits TEXT,
        expires_ms BIGINT,
        disabled BOOLEAN NOT NULL DEFAULT FALSE,
        metadata TEXT,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL
    );
    CREATE TABLE tollgate_ledger (
        request_id TEXT PRIMARY KEY,
        ts_ms BIGINT NOT NULL,
        key_id TEXT,
        user_id TEXT,
        team TEXT,
        model TEXT,
        provider TEXT,
        provider_model TEXT,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        stream BOOLEAN NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cache_read_tokens BIGINT NOT NULL,
        cache_write_5m_tokens BIGINT NOT NULL,
        cache_write_1h_tokens BIGINT NOT NULL,
        cost_nanos BIGINT NOT NULL,
        priced BOOLEAN NOT NULL,
        estimated TEXT
    );
    CREATE INDEX tollgate_ledger_ts ON tollgate_ledger (ts_ms);
    CREATE INDEX tollgate_ledger_key ON tollgate_ledger (key_id, ts_ms);
    CREATE INDEX tollgate_ledger_user ON tollgate_ledger (user_id, ts_ms);
    CREATE INDEX tollgate_ledger_team ON tollgate_ledger (team, ts_ms);",
    ),
    (
        2,
        // Every write to a key takes a number from one sequence: gateways learn of changes by it,
        // whatever their clocks say. Reports by day group by 15-minute buckets: statistics on
        // that expression let the planner size the grouping (2-4x faster at 10 million rows).
        "CREATE SEQUENCE tollgate_keys_change;
    ALTER TABLE tollgate_keys ADD COLUMN change BIGINT NOT NULL DEFAULT nextval('tollgate_keys_change');
    CREATE STATISTICS tollgate_ledger_bucket ON (ts_ms / 900000) FROM tollgate_ledger;
    ANALYZE tollgate_ledger;",
    ),
    (
        3,
        // Spend alerts: the primary key makes the first gateway to insert one its only sender.
        "CREATE TABLE tollgate_alerts (
        scope TEXT NOT NULL,
        id TEXT NOT NULL,
        period_start_ms BIGINT NOT NULL,
        alert TEXT NOT NULL,
        payload TEXT NOT NULL,
        claimed_ms BIGINT NOT NULL,
        renewed_ms BIGINT NOT NULL,
        delivered_ms BIGINT,
        PRIMARY KEY (scope, id, period_start_ms, alert)
    );",
    ),
    (
        4,
        // Sign-ins through the identity provider, and people disabled in the gateway.
        "CREATE TABLE tollgate_sso_sessions (
        id TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        \"user\" TEXT NOT NULL,
        groups TEXT NOT NULL,
        refresh_hash TEXT NOT NULL UNIQUE,
        idp_refresh BYTEA,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        revoked_ms BIGINT
    );
    CREATE INDEX tollgate_sso_sessions_user ON tollgate_sso_sessions (\"user\");
    CREATE TABLE tollgate_sso_people (
        \"user\" TEXT PRIMARY KEY,
        disabled BOOLEAN NOT NULL,
        changed_ms BIGINT NOT NULL
    );",
    ),
];

const SESSION_COLUMNS: &str =
    "id, subject, \"user\", groups, refresh_hash, idp_refresh, created_ms, expires_ms, last_seen_ms, revoked_ms";

fn session_from_row(r: &tokio_postgres::Row) -> SsoSession {
    SsoSession {
        id: r.get(0),
        subject: r.get(1),
        user: r.get(2),
        groups: serde_json::from_str(r.get::<_, &str>(3)).unwrap_or_default(),
        refresh_hash: r.get(4),
        idp_refresh: r.get(5),
        created_ms: r.get(6),
        expires_ms: r.get(7),
        last_seen_ms: r.get(8),
        revoked_ms: r.get(9),
    }
}

/// Any number above the highest migration's: a lock id of Tollgate's own.
const MIGRATION_LOCK: i64 = 0x7011_6a7e;

/// Rows per insert statement (19 parameters each, under PostgreSQL's 65,535).
const BATCH: usize = 1000;

/// The longest a write pass (spool replay and queue) may wait on the database; past it the
/// connection is dropped and the rows go to the spool.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a read (a report, the keys) may wait; the server cancels statements at the same
/// bound (`statement_timeout`), the client stops waiting for a silent connection.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Spooled rows written per transaction when the spool is replayed.
const REPLAY_PAGE: usize = 10_000;

/// Pages of the spool a writer pass replays at most: a pass never runs long, whatever the
/// spool's size (each page has its own [`WRITE_TIMEOUT`]).
const REPLAY_PAGES: usize = 5;

/// Days are cut from 15-minute buckets (every time zone's offset is a multiple of them).
const BUCKET_MS: i64 = 15 * 60 * 1000;

/// What `tollgate check` and `/readyz` say about the database.
#[derive(Debug, Default)]
struct Health {
    /// Why the last write failed, while it keeps failing.
    failing: Mutex<Option<String>>,
    /// Rows in the spool file now.
    spooled: AtomicUsize,
}

/// Where the database is and how to reach it: the URL, and TLS when it asks for it.
#[derive(Clone)]
pub struct PgTarget {
    url: String,
    tls: Option<Rustls>,
}

impl PgTarget {
    /// TLS (verified, see pg_tls.rs) when `url` says `sslmode=require`; plain TCP otherwise.
    pub fn new(url: &str, ca_file: Option<&std::path::Path>) -> StoreResult<Self> {
        // libpq's `prefer` falls back to plain text without a word, and its `verify-*` modes
        // are what `require` is here: say so rather than guess.
        let query = url.split_once('?').map_or("", |(_, q)| q);
        for param in query.split('&') {
            match param {
                "sslmode=prefer" | "sslmode=allow" => {
                    return Err(StoreError::Other(format!(
                        "store.url: {param} may fall back to plain text silently: use sslmode=require (TLS, \
                         verified) or sslmode=disable"
                    )))
                }
                "sslmode=verify-full" | "sslmode=verify-ca" => {
                    return Err(StoreError::Other(format!(
                        "store.url: use sslmode=require instead of {param}: Tollgate always verifies the \
                         certificate and the host name"
                    )))
                }
                _ => {}
            }
        }
        let config: tokio_postgres::Config = url.parse().map_err(|e| StoreError::Other(format!("store.url: {e}")))?;
        let tls = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Require => Some(Rustls::new(ca_file).map_err(StoreError::Other)?),
            _ if ca_file.is_some() => {
                return Err(StoreError::Other("store.ca_file is for TLS: add sslmode=require to store.url".into()))
            }
            _ => None,
        };
        Ok(PgTarget { url: url.to_string(), tls })
    }
}

struct Shared {
    target: PgTarget,
    /// Reads and key writes.
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    /// The ledger writer's own connection: its transactions never mix with other statements
    /// (pipelined on a shared connection, they would run inside the writer's transaction).
    writer: tokio::sync::Mutex<Option<Arc<Client>>>,
    queue: Mutex<Vec<LedgerRow>>,
    spool: PathBuf,
    health: Health,
    /// One writer pass at a time (the writer task, or a `flush`).
    pass: tokio::sync::Mutex<()>,
    stopping: AtomicBool,
    metrics: crate::metrics::Backend,
    /// How far into the spool this process has written rows to the database (bytes): a replay
    /// goes on from there in its next pass.
    replayed_to: std::sync::atomic::AtomicU64,
}

pub struct PostgresStore {
    shared: Arc<Shared>,
    rt: tokio::runtime::Runtime,
}

impl PostgresStore {
    /// Sets one of an alert's times (`delivered_ms`, `renewed_ms`).
    fn stamp_alert(&self, m: &AlertMark, column: &'static str, at_ms: i64) -> StoreResult<()> {
        let m = m.clone();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let sql = format!(
                    "UPDATE tollgate_alerts SET {column} = $5
                     WHERE scope = $1 AND id = $2 AND period_start_ms = $3 AND alert = $4"
                );
                client.execute(&sql, &[&m.scope, &m.id, &m.period_start_ms, &m.alert, &at_ms]).await.map_err(pg)?;
                Ok(())
            })
        })
    }

    /// Connects, brings the schema up to date, replays any spool left by a previous run, and
    /// starts the writer.
    pub fn open(
        target: PgTarget,
        spool: PathBuf,
        flush_interval: Duration,
        metrics: crate::metrics::Backend,
    ) -> StoreResult<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-ledger")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Other(format!("the ledger's runtime: {e}")))?;
        if let Some(dir) = spool.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Other(format!("cannot create {}: {e}", dir.display())))?;
        }
        let spooled = count_lines(&spool)?;
        let shared = Arc::new(Shared {
            target,
            client: tokio::sync::Mutex::new(None),
            writer: tokio::sync::Mutex::new(None),
            queue: Mutex::new(Vec::with_capacity(1024)),
            spool,
            health: Health { failing: Mutex::new(None), spooled: AtomicUsize::new(spooled) },
            pass: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            metrics,
            replayed_to: std::sync::atomic::AtomicU64::new(0),
        });
        let s = shared.clone();
        crate::blocking::block_on(rt.handle(), async move {
            let client = s.client().await?;
            migrate(&client).await
        })?;
        let s = shared.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(flush_interval).await;
                s.pass().await;
                if s.stopping.load(Ordering::Acquire) {
                    return;
                }
            }
        });
        Ok(PostgresStore { shared, rt })
    }

    /// Runs a database call on the store's runtime and waits for it, at most [`QUERY_TIMEOUT`]:
    /// a database that stops answering gets its connection dropped, not a caller stuck.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Shared>) -> std::pin::Pin<Box<dyn std::future::Future<Output = StoreResult<T>> + Send>>,
    ) -> StoreResult<T> {
        let shared = self.shared.clone();
        let fut = f(self.shared.clone());
        crate::blocking::block_on(self.rt.handle(), async move {
            match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => {
                    shared.reset().await;
                    Err(StoreError::Other(format!("PostgreSQL gave no answer within {QUERY_TIMEOUT:?}")))
                }
            }
        })
    }

    /// Applies the migrations this build knows (what `tollgate migrate` does), and says which
    /// version the database is at.
    pub fn migrate_only(target: &PgTarget) -> StoreResult<i32> {
        once(target, |client| async move {
            migrate(&client).await?;
            let v: i32 = client.query_one("SELECT MAX(version) FROM tollgate_schema", &[]).await.map_err(pg)?.get(0);
            Ok(v)
        })
    }
}

impl PostgresStore {
    /// Connects once and reads the schema version (`None` before the first migration): what
    /// `tollgate check` reports, with the time it took.
    pub fn ping(target: &PgTarget) -> StoreResult<(Duration, Option<i32>)> {
        let started = std::time::Instant::now();
        once(target, |client| async move {
            let exists: bool =
                client.query_one("SELECT to_regclass('tollgate_schema') IS NOT NULL", &[]).await.map_err(pg)?.get(0);
            let version = if exists {
                client.query_one("SELECT MAX(version) FROM tollgate_schema", &[]).await.map_err(pg)?.get(0)
            } else {
                None
            };
            Ok((started.elapsed(), version))
        })
    }
}

impl Shared {
    /// The connection for reads and keys, made again when the last one closed.
    async fn client(&self) -> StoreResult<Arc<Client>> {
        self.connection(&self.client).await
    }

    /// The writer's connection.
    async fn writer(&self) -> StoreResult<Arc<Client>> {
        self.connection(&self.writer).await
    }

    async fn connection(&self, slot: &tokio::sync::Mutex<Option<Arc<Client>>>) -> StoreResult<Arc<Client>> {
        let mut held = slot.lock().await;
        if let Some(c) = held.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let client = connect(&self.target).await?;
        let client = Arc::new(client);
        *held = Some(client.clone());
        Ok(client)
    }

    /// Drops the connection (it may be stuck mid-statement): the next call connects afresh.
    async fn reset(&self) {
        *self.client.lock().await = None;
    }

    async fn reset_writer(&self) {
        *self.writer.lock().await = None;
    }

    /// Writes what waits: the spool first (older rows, at most [`REPLAY_PAGES`] pages a pass),
    /// then the queue. What cannot be written goes to (or stays in) the spool, in order. The
    /// queue is taken only once the spool is done with, so a pass cut short holds no row.
    async fn pass(&self) {
        let _pass = self.pass.lock().await;
        let began = std::time::Instant::now();
        let spool_done =
            if self.health.spooled.load(Ordering::Acquire) > 0 { self.replay_spool().await } else { Ok(true) };
        let rows = std::mem::take(&mut *lock(&self.queue));
        let result = match spool_done {
            Ok(true) if !rows.is_empty() => self.write_bounded(&rows).await.map(|_| ()),
            Ok(true) => Ok(()),
            // More spool to write next pass: the queue goes behind it, keeping the order.
            Ok(false) => {
                lock(&self.health.failing).take();
                if let Err(e) = self.append_spool(&rows) {
                    tracing::error!(error = %e, "cannot write the spool; rows stay queued");
                    let mut q = lock(&self.queue);
                    let newer = std::mem::replace(&mut *q, rows);
                    q.extend(newer);
                }
                return;
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) if !rows.is_empty() => self.metrics.observe("postgres", "write", began.elapsed()),
            Ok(()) => {}
            Err(_) => self.metrics.error("postgres", "write"),
        }
        match result {
            Ok(()) => {
                if lock(&self.health.failing).take().is_some() {
                    tracing::info!("the ledger database is reachable again; the spool is written");
                }
            }
            Err(e) => {
                let first = lock(&self.health.failing).replace(e.to_string()).is_none();
                if first {
                    tracing::error!(error = %e, "cannot write the ledger database; rows go to the spool");
                }
                // Rows not written this pass keep their order behind the spool's.
                if let Err(spool_err) = self.append_spool(&rows) {
                    tracing::error!(error = %spool_err, "cannot write the spool either; rows stay queued");
                    let mut q = lock(&self.queue);
                    let newer = std::mem::replace(&mut *q, rows);
                    q.extend(newer);
                }
            }
        }
    }

    /// Writes one batch on the writer's connection, waiting at most [`WRITE_TIMEOUT`] (the
    /// connection included): a batch cut off mid-transaction is rolled back by the server when
    /// the connection goes, and written again later it is kept once (request ids).
    async fn write_bounded(&self, rows: &[LedgerRow]) -> StoreResult<u64> {
        let write = async {
            let client = self.writer().await?;
            insert_rows(&client, rows).await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(r) => r,
            Err(_) => {
                self.reset_writer().await;
                Err(StoreError::Other(format!("PostgreSQL gave no answer within {WRITE_TIMEOUT:?}")))
            }
        }
    }

    fn append_spool(&self, rows: &[LedgerRow]) -> std::io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).read(true).open(&self.spool)?;
        // Another process may share the spool (the old and new binaries of an upgrade): one
        // at a time, and never while it replays.
        f.lock()?;
        let mut buf = Vec::new();
        // A line cut short by a crash must not swallow the next row: start on a line of its own.
        if ends_mid_line(&mut f)? {
            buf.push(b'\n');
        }
        for r in rows {
            serde_json::to_writer(&mut buf, &Spooled::from(r))?;
            buf.push(b'\n');
        }
        f.write_all(&buf)?;
        // Durable before the rows leave memory.
        f.sync_data()?;
        self.health.spooled.fetch_add(rows.len(), Ordering::AcqRel);
        Ok(())
    }

    /// Writes up to [`REPLAY_PAGES`] pages of the spool, from where the last pass stopped.
    /// Whether the spool is done with (written whole, and emptied).
    async fn replay_spool(&self) -> StoreResult<bool> {
        use std::io::{BufRead, Seek, SeekFrom};
        let spool_err = |e: std::io::Error| StoreError::Other(format!("spool {}: {e}", self.spool.display()));
        let mut file = match std::fs::OpenOptions::new().read(true).write(true).open(&self.spool) {
            Ok(f) => f,
            // Another process replayed and emptied it already.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.health.spooled.store(0, Ordering::Release);
                return Ok(true);
            }
            Err(e) => return Err(spool_err(e)),
        };
        // Held while this pass reads and writes, and while the file is emptied: no process
        // appends a row in between that the emptying would lose. Appends (only ever at the end)
        // between passes leave the offset valid.
        file.lock().map_err(spool_err)?;
        let len = file.metadata().map_err(spool_err)?.len();
        let mut offset = self.replayed_to.load(Ordering::Acquire);
        if offset > len {
            // Emptied by another process: from the top.
            offset = 0;
        }
        file.seek(SeekFrom::Start(offset)).map_err(spool_err)?;
        // In pages, each its own transaction: a long outage's spool never sits in memory whole.
        // A replay cut short starts again from the last page written; a page written twice is
        // kept once (request ids).
        let mut reader = std::io::BufReader::new(&file);
        let (mut page, mut pages, mut line) = (Vec::with_capacity(REPLAY_PAGE), 0, String::new());
        loop {
            line.clear();
            let read = reader.read_line(&mut line).map_err(spool_err)?;
            if read > 0 {
                match serde_json::from_str::<Spooled>(line.trim_end()) {
                    Ok(s) => page.push(s.into_row()),
                    // A line cut short by a crash mid-append: nothing else can be made of it.
                    Err(e) => tracing::error!(error = %e, "an unreadable line in the ledger spool is skipped"),
                }
                offset += read as u64;
            }
            if page.len() == REPLAY_PAGE || (read == 0 && !page.is_empty()) {
                self.write_bounded(&page).await?;
                self.replayed_to.store(offset, Ordering::Release);
                page.clear();
                pages += 1;
            }
            if read == 0 {
                break;
            }
            if pages == REPLAY_PAGES {
                tracing::info!(bytes = offset, "the ledger spool is being replayed");
                return Ok(false);
            }
        }
        // Emptied, not removed: a process that opened it meanwhile keeps appending to the
        // same file, which the next replay reads.
        file.set_len(0).map_err(spool_err)?;
        file.sync_all().map_err(spool_err)?;
        self.replayed_to.store(0, Ordering::Release);
        self.health.spooled.store(0, Ordering::Release);
        tracing::info!("the ledger spool was replayed");
        Ok(true)
    }
}

/// One connection for one job, on a runtime of its own (the command line's `migrate` and
/// `check`, which run no other).
pub(super) fn once<T, F: std::future::Future<Output = StoreResult<T>>>(
    target: &PgTarget,
    job: impl FnOnce(Client) -> F,
) -> StoreResult<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Other(e.to_string()))?;
    rt.block_on(async {
        let client = connect(target).await?;
        job(client).await
    })
}

/// Connects, and runs the connection on the current runtime until it closes.
async fn connect(target: &PgTarget) -> StoreResult<Client> {
    let mut config: tokio_postgres::Config =
        target.url.parse().map_err(|e| StoreError::Other(format!("store.url: {e}")))?;
    config.connect_timeout(Duration::from_secs(5));
    config.application_name("tollgate");
    // A peer that vanishes is noticed by TCP; a statement that runs too long is cancelled.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config.options(format!("-c statement_timeout={}", QUERY_TIMEOUT.as_millis()));
    // The TCP connect has its own bound; the whole handshake (a proxy that accepts and says
    // nothing) gets one too.
    let bound = Duration::from_secs(10);
    let timed_out = || StoreError::Other("PostgreSQL: no answer to the connection within 10s".into());
    let closed = |e: tokio_postgres::Error| tracing::warn!(error = %e, "the ledger database connection closed");
    match &target.tls {
        Some(tls) => {
            let (client, conn) =
                tokio::time::timeout(bound, config.connect(tls.clone())).await.map_err(|_| timed_out())?.map_err(pg)?;
            tokio::spawn(async move { conn.await.map_err(closed) });
            Ok(client)
        }
        None => {
            let (client, conn) =
                tokio::time::timeout(bound, config.connect(NoTls)).await.map_err(|_| timed_out())?.map_err(pg)?;
            tokio::spawn(async move { conn.await.map_err(closed) });
            Ok(client)
        }
    }
}

pub(super) async fn migrate(client: &Client) -> StoreResult<()> {
    client.batch_execute("BEGIN").await.map_err(pg)?;
    let result = async {
        client.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS tollgate_schema (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL)",
            )
            .await
            .map_err(pg)?;
        let current: Option<i32> =
            client.query_one("SELECT MAX(version) FROM tollgate_schema", &[]).await.map_err(pg)?.get(0);
        let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if current.is_some_and(|c| c > known) {
            return Err(StoreError::Other(format!(
                "the ledger database is at schema version {}, newer than this build's {known}: run a newer Tollgate",
                current.unwrap_or_default()
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| Some(*v) > current) {
            client.batch_execute(sql).await.map_err(pg)?;
            client
                .execute(
                    "INSERT INTO tollgate_schema (version, applied_ms) VALUES ($1, $2)",
                    &[version, &crate::limits::now_ms()],
                )
                .await
                .map_err(pg)?;
            tracing::info!(version, "ledger database migrated");
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).await.map_err(pg)?;
    result
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    // The driver's words with their cause (connection refused, …), and the server's when it
    // sent some; never the URL, which is not in them.
    if let Some(db) = e.as_db_error() {
        return StoreError::Other(format!("PostgreSQL: {}: {}", db.code().code(), db.message()));
    }
    let mut why = format!("PostgreSQL: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        why.push_str(": ");
        why.push_str(&c.to_string());
        cause = c.source();
    }
    StoreError::Other(why)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const LEDGER_COLUMNS: &str = "request_id, ts_ms, key_id, user_id, team, model, provider, provider_model, status, \
     outcome, stream, input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, \
     cost_nanos, priced, estimated";

/// Inserts rows in statements of [`BATCH`], in one transaction; a row already there (a
/// replayed spool, a retried batch) is left as it is.
/// Writes `rows` in one transaction; returns how many were new (a row already there, by
/// request id, is kept as it is).
pub(super) async fn insert_rows(client: &Client, rows: &[LedgerRow]) -> StoreResult<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    client.batch_execute("BEGIN").await.map_err(pg)?;
    let result = async {
        let mut new = 0;
        for chunk in rows.chunks(BATCH) {
            let values: Vec<_> = chunk.iter().map(Values::from).collect();
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(chunk.len() * 19);
            let mut tuples = Vec::with_capacity(chunk.len());
            for (i, v) in values.iter().enumerate() {
                let n = i * 19;
                tuples.push(format!("({})", (1..=19).map(|k| format!("${}", n + k)).collect::<Vec<_>>().join(", ")));
                params.extend(v.params());
            }
            let sql = format!(
                "INSERT INTO tollgate_ledger ({LEDGER_COLUMNS}) VALUES {} ON CONFLICT (request_id) DO NOTHING",
                tuples.join(", ")
            );
            new += client.execute(sql.as_str(), &params).await.map_err(pg)?;
        }
        Ok(new)
    }
    .await;
    match result {
        Ok(new) => client.batch_execute("COMMIT").await.map_err(pg).map(|()| new),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// When the key of this id was last changed, if the database has it.
pub(super) async fn key_updated_ms(client: &Client, id: &str) -> StoreResult<Option<i64>> {
    let row = client.query_opt("SELECT updated_ms FROM tollgate_keys WHERE id = $1", &[&id]).await.map_err(pg)?;
    Ok(row.map(|r| r.get(0)))
}

/// Inserts a key unless one of its id is there; whether it was inserted.
pub(super) async fn insert_key_if_absent(client: &Client, key: &StoredKey) -> StoreResult<bool> {
    let v = KeyValues::of(key);
    let sql = format!(
        "INSERT INTO tollgate_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (id) DO NOTHING"
    );
    Ok(client.execute(sql.as_str(), &v.params()).await.map_err(pg)? == 1)
}

/// A row's values as PostgreSQL takes them.
struct Values<'a> {
    r: &'a LedgerRow,
    ints: [i64; 7],
    status: i32,
}

impl<'a> From<&'a LedgerRow> for Values<'a> {
    fn from(r: &'a LedgerRow) -> Self {
        Values {
            r,
            ints: [
                r.time_ms,
                int(r.input_tokens),
                int(r.output_tokens),
                int(r.cache_read_tokens),
                int(r.cache_write_5m_tokens),
                int(r.cache_write_1h_tokens),
                int(r.cost_nanos),
            ],
            status: i32::from(r.status),
        }
    }
}

impl Values<'_> {
    fn params(&self) -> [&(dyn ToSql + Sync); 19] {
        let r = self.r;
        [
            &r.request_id,
            &self.ints[0],
            &r.key_id,
            &r.user,
            &r.team,
            &r.model,
            &r.provider,
            &r.provider_model,
            &self.status,
            &r.outcome,
            &r.stream,
            &self.ints[1],
            &self.ints[2],
            &self.ints[3],
            &self.ints[4],
            &self.ints[5],
            &self.ints[6],
            &r.priced,
            &r.estimated,
        ]
    }
}

/// A ledger row as the spool file holds it.
#[derive(Serialize, Deserialize)]
struct Spooled {
    request_id: String,
    time_ms: i64,
    key_id: Option<String>,
    user: Option<String>,
    team: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    provider_model: Option<String>,
    status: u16,
    outcome: String,
    stream: bool,
    input_tokens: u64,
    output_tokens: u64,
    cache_read_tokens: u64,
    cache_write_5m_tokens: u64,
    cache_write_1h_tokens: u64,
    cost_nanos: u64,
    priced: bool,
    estimated: Option<String>,
}

impl From<&LedgerRow> for Spooled {
    fn from(r: &LedgerRow) -> Self {
        Spooled {
            request_id: r.request_id.clone(),
            time_ms: r.time_ms,
            key_id: r.key_id.clone(),
            user: r.user.clone(),
            team: r.team.clone(),
            model: r.model.clone(),
            provider: r.provider.clone(),
            provider_model: r.provider_model.clone(),
            status: r.status,
            outcome: r.outcome.clone(),
            stream: r.stream,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_read_tokens: r.cache_read_tokens,
            cache_write_5m_tokens: r.cache_write_5m_tokens,
            cache_write_1h_tokens: r.cache_write_1h_tokens,
            cost_nanos: r.cost_nanos,
            priced: r.priced,
            estimated: r.estimated.map(str::to_string),
        }
    }
}

impl Spooled {
    fn into_row(self) -> LedgerRow {
        LedgerRow {
            request_id: self.request_id,
            time_ms: self.time_ms,
            key_id: self.key_id,
            user: self.user,
            team: self.team,
            model: self.model,
            provider: self.provider,
            provider_model: self.provider_model,
            status: self.status,
            outcome: self.outcome,
            stream: self.stream,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_write_5m_tokens: self.cache_write_5m_tokens,
            cache_write_1h_tokens: self.cache_write_1h_tokens,
            cost_nanos: self.cost_nanos,
            priced: self.priced,
            estimated: self.estimated.as_deref().and_then(crate::metering::Estimate::parse).map(|e| e.as_str()),
        }
    }
}

fn ends_mid_line(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

fn count_lines(path: &std::path::Path) -> StoreResult<usize> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(std::io::BufReader::new(f).lines().count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::Other(format!("spool {}: {e}", path.display()))),
    }
}

fn column(kind: ScopeKind) -> &'static str {
    match kind {
        ScopeKind::Key => "key_id",
        ScopeKind::User => "user_id",
        ScopeKind::Team => "team",
        ScopeKind::Model => "model",
    }
}

const KEY_COLUMNS: &str =
    "id, hash, user_id, team, models, budget, limits, expires_ms, disabled, metadata, created_ms, updated_ms";

/// A JSON column of a stored key, read back into its type.
fn json_column<T: serde::de::DeserializeOwned>(row: &tokio_postgres::Row, i: usize) -> StoreResult<Option<T>> {
    row.get::<_, Option<String>>(i)
        .map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Other(format!("a stored key, column {i}: {e}"))))
        .transpose()
}

fn key_from_row(row: &tokio_postgres::Row) -> StoreResult<StoredKey> {
    let hash: Vec<u8> = row.get(1);
    Ok(StoredKey {
        id: row.get(0),
        hash: hash.try_into().map_err(|_| StoreError::Other("a stored key's hash is not 32 bytes".into()))?,
        user: row.get(2),
        team: row.get(3),
        models: json_column(row, 4)?,
        budget: json_column(row, 5)?,
        limits: json_column(row, 6)?.unwrap_or_default(),
        expires_ms: row.get(7),
        disabled: row.get(8),
        metadata: json_column(row, 9)?.unwrap_or_default(),
        created_ms: row.get(10),
        updated_ms: row.get(11),
    })
}

/// A key's columns, owned, for a statement.
struct KeyValues {
    id: String,
    hash: Vec<u8>,
    user: Option<String>,
    team: Option<String>,
    models: Option<String>,
    budget: Option<String>,
    limits: Option<String>,
    expires_ms: Option<i64>,
    disabled: bool,
    metadata: String,
    created_ms: i64,
    updated_ms: i64,
}

impl KeyValues {
    fn of(k: &StoredKey) -> Self {
        KeyValues {
            id: k.id.clone(),
            hash: k.hash.to_vec(),
            user: k.user.clone(),
            team: k.team.clone(),
            models: k.models.as_ref().map(|m| serde_json::json!(m).to_string()),
            budget: k.budget.map(|b| serde_json::json!(b).to_string()),
            limits: (!k.limits.is_empty()).then(|| serde_json::json!(k.limits).to_string()),
            expires_ms: k.expires_ms,
            disabled: k.disabled,
            metadata: serde_json::Value::Object(k.metadata.clone()).to_string(),
            created_ms: k.created_ms,
            updated_ms: k.updated_ms,
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.id,
            &self.hash,
            &self.user,
            &self.team,
            &self.models,
            &self.budget,
            &self.limits,
            &self.expires_ms,
            &self.disabled,
            &self.metadata,
            &self.created_ms,
            &self.updated_ms,
        ]
    }
}

impl Store for PostgresStore {
    fn record(&self, mut row: LedgerRow) {
        // PostgreSQL's text holds no NUL (a JWT claim may): one such row would fail every batch.
        for field in [&mut row.key_id, &mut row.user, &mut row.team, &mut row.model, &mut row.provider_model] {
            if let Some(v) = field.as_mut().filter(|v| v.contains('\0')) {
                *v = v.replace('\0', "\u{FFFD}");
            }
        }
        if self.shared.stopping.load(Ordering::Acquire) {
            // After close (requests finishing during shutdown): to the spool, durably, without
            // waiting on the database; the next start replays it.
            if let Err(e) = self.shared.append_spool(std::slice::from_ref(&row)) {
                tracing::error!(error = %e, request_id = %row.request_id, "a ledger row after shutdown is lost");
            }
            return;
        }
        lock(&self.shared.queue).push(row);
    }

    fn pending(&self) -> usize {
        lock(&self.shared.queue).len() + self.shared.health.spooled.load(Ordering::Acquire)
    }

    fn flush(&self) -> StoreResult<()> {
        // Nothing queued is lost either way (what is not written is spooled), but only rows in
        // the database count in the sums read next: a spool left over is an error here.
        self.run(|s| {
            Box::pin(async move {
                // A task of its own: a caller that stops waiting (the query timeout) must not cut
                // a pass that holds rows; it goes on, and the caller gets the timeout.
                let task = tokio::spawn(async move {
                    loop {
                        s.pass().await;
                        if let Some(why) = lock(&s.health.failing).clone() {
                            return Err(StoreError::Other(format!("the ledger is not all in the database: {why}")));
                        }
                        if s.health.spooled.load(Ordering::Acquire) == 0 {
                            return Ok(());
                        }
                    }
                });
                task.await.map_err(|e| StoreError::Other(format!("the ledger writer: {e}")))?
            })
        })
    }

    fn spend_since(&self, kind: ScopeKind, id: &str, since_ms: i64) -> StoreResult<u64> {
        let (sql, id) = (
            format!(
                "SELECT COALESCE(SUM(cost_nanos), 0)::BIGINT FROM tollgate_ledger WHERE {} = $1 AND ts_ms >= $2",
                column(kind)
            ),
            id.to_string(),
        );
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let v: i64 = client.query_one(sql.as_str(), &[&id, &since_ms]).await.map_err(pg)?.get(0);
                Ok(v.max(0) as u64)
            })
        })
    }

    fn spend_by_key_prefix(&self, prefix: &str, since_ms: i64) -> StoreResult<Vec<(String, u64)>> {
        // starts_with, not a range or LIKE: a linguistic collation orders `a:` and `a2:` in ways
        // a byte range does not, and a prefix has no pattern characters to escape this way.
        let prefix = prefix.to_string();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let rows = client
                    .query(
                        "SELECT key_id, SUM(cost_nanos)::BIGINT FROM tollgate_ledger \
                         WHERE starts_with(key_id, $1) AND ts_ms >= $2 GROUP BY key_id",
                        &[&prefix, &since_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64)).collect())
            })
        })
    }

    fn usage(&self, q: &UsageQuery, tz: Tz) -> StoreResult<Vec<UsageLine>> {
        let scopes: Vec<Group> = q.group_by.iter().copied().filter(|g| *g != Group::Day).collect();
        let by_day = q.group_by.contains(&Group::Day);
        let mut select: Vec<String> =
            scopes.iter().filter_map(|g| g.scope()).map(|kind| column(kind).to_string()).collect();
        if by_day {
            select.push(format!("(ts_ms / {BUCKET_MS})"));
        }
        let mut wheres = vec!["TRUE".to_string()];
        let mut ints: Vec<i64> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut order: Vec<bool> = Vec::new(); // true: an int parameter
        if let Some(from) = q.from_ms {
            ints.push(from);
            order.push(true);
            wheres.push(format!("ts_ms >= ${}", order.len()));
        }
        if let Some(to) = q.to_ms {
            ints.push(to);
            order.push(true);
            wheres.push(format!("ts_ms < ${}", order.len()));
        }
        for (kind, value) in &q.filters {
            texts.push(value.clone());
            order.push(false);
            wheres.push(format!("{} = ${}", column(*kind), order.len()));
        }
        let group_clause = if select.is_empty() { String::new() } else { format!("GROUP BY {}", select.join(", ")) };
        let sums = "COUNT(*)::BIGINT, SUM(input_tokens)::BIGINT, SUM(output_tokens)::BIGINT, \
                    SUM(cache_read_tokens)::BIGINT, SUM(cache_write_5m_tokens)::BIGINT, \
                    SUM(cache_write_1h_tokens)::BIGINT, SUM(cost_nanos)::BIGINT, COUNT(estimated)::BIGINT";
        let cols = if select.is_empty() { sums.to_string() } else { format!("{}, {sums}", select.join(", ")) };
        let sql = format!("SELECT {cols} FROM tollgate_ledger WHERE {} {group_clause}", wheres.join(" AND "));
        let n_scopes = scopes.len();
        let rows = self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let (mut i_iter, mut t_iter) = (ints.iter(), texts.iter());
                let params: Vec<&(dyn ToSql + Sync)> = order
                    .iter()
                    .map(|is_int| -> &(dyn ToSql + Sync) {
                        if *is_int {
                            i_iter.next().expect("one per int")
                        } else {
                            t_iter.next().expect("one per text")
                        }
                    })
                    .collect();
                let rows = client.query(sql.as_str(), &params).await.map_err(pg)?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let group: Vec<Option<String>> = (0..n_scopes).map(|i| row.get(i)).collect();
                    let bucket: Option<i64> = by_day.then(|| row.get(n_scopes));
                    let n = n_scopes + usize::from(by_day);
                    let sums: Vec<i64> = (0..8).map(|i| row.get::<_, Option<i64>>(n + i).unwrap_or(0)).collect();
                    out.push((group, bucket, sums));
                }
                Ok(out)
            })
        })?;
        let mut lines: HashMap<Vec<Option<String>>, UsageLine> = HashMap::new();
        for (mut key, bucket, sums) in rows {
            if sums[0] == 0 {
                continue;
            }
            if let Some(b) = bucket {
                key.push(Some(super::local_day(b * BUCKET_MS, tz)));
            }
            let get = |i: usize| sums[i].max(0) as u64;
            let line = lines.entry(key).or_default();
            line.requests += get(0);
            line.input_tokens += get(1);
            line.output_tokens += get(2);
            line.cache_read_tokens += get(3);
            line.cache_write_5m_tokens += get(4);
            line.cache_write_1h_tokens += get(5);
            line.cost_nanos += get(6);
            line.estimated += get(7);
        }
        Ok(super::report(&scopes, by_day, lines))
    }

    fn keys(&self) -> StoreResult<Vec<StoredKey>> {
        self.run(|s| {
            Box::pin(async move {
                let client = s.client().await?;
                let rows = client
                    .query(format!("SELECT {KEY_COLUMNS} FROM tollgate_keys ORDER BY id").as_str(), &[])
                    .await
                    .map_err(pg)?;
                rows.iter().map(key_from_row).collect()
            })
        })
    }

    fn insert_key(&self, key: &StoredKey) -> StoreResult<()> {
        let v = KeyValues::of(key);
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let sql = format!(
                    "INSERT INTO tollgate_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                     ON CONFLICT (id) DO NOTHING"
                );
                let n = client.execute(sql.as_str(), &v.params()).await.map_err(pg)?;
                if n == 0 {
                    return Err(StoreError::Duplicate(v.id.clone()));
                }
                Ok(())
            })
        })
    }

    fn update_key(&self, key: &StoredKey) -> StoreResult<bool> {
        let v = KeyValues::of(key);
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let n = client
                    .execute(
                        "UPDATE tollgate_keys SET hash = $2, user_id = $3, team = $4, models = $5, budget = $6, \
                         limits = $7, expires_ms = $8, disabled = $9, metadata = $10, created_ms = $11, \
                         updated_ms = $12, change = nextval('tollgate_keys_change') WHERE id = $1",
                        &v.params(),
                    )
                    .await
                    .map_err(pg)?;
                Ok(n > 0)
            })
        })
    }

    fn delete_key(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let n = client.execute("DELETE FROM tollgate_keys WHERE id = $1", &[&id]).await.map_err(pg)?;
                Ok(n > 0)
            })
        })
    }

    fn claim_alert(&self, m: &AlertMark) -> StoreResult<bool> {
        let m = m.clone();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let n = client
                    .execute(
                        "INSERT INTO tollgate_alerts (scope, id, period_start_ms, alert, payload, claimed_ms, renewed_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT DO NOTHING",
                        &[&m.scope, &m.id, &m.period_start_ms, &m.alert, &m.payload, &crate::limits::now_ms()],
                    )
                    .await
                    .map_err(pg)?;
                Ok(n == 1)
            })
        })
    }

    fn alert_delivered(&self, m: &AlertMark) -> StoreResult<()> {
        self.stamp_alert(m, "delivered_ms", crate::limits::now_ms())
    }

    fn reclaim_alerts(&self, stale_ms: i64, since_ms: i64) -> StoreResult<Vec<AlertMark>> {
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                // One statement: of two gateways reclaiming at once, each row goes to one.
                let rows = client
                    .query(
                        "UPDATE tollgate_alerts SET renewed_ms = $1
                         WHERE delivered_ms IS NULL AND renewed_ms < $2 AND claimed_ms >= $3
                         RETURNING scope, id, period_start_ms, alert, payload",
                        &[&crate::limits::now_ms(), &stale_ms, &since_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|r| AlertMark {
                        scope: r.get(0),
                        id: r.get(1),
                        period_start_ms: r.get(2),
                        alert: r.get(3),
                        payload: r.get(4),
                    })
                    .collect())
            })
        })
    }

    fn renew_alert(&self, m: &AlertMark, at_ms: i64) -> StoreResult<()> {
        self.stamp_alert(m, "renewed_ms", at_ms)
    }

    fn keys_version(&self) -> StoreResult<Option<String>> {
        self.run(|s| {
            Box::pin(async move {
                let client = s.client().await?;
                let row = client
                    .query_one("SELECT COUNT(*)::BIGINT, COALESCE(MAX(change), 0)::BIGINT FROM tollgate_keys", &[])
                    .await
                    .map_err(pg)?;
                Ok(Some(format!("{}:{}", row.get::<_, i64>(0), row.get::<_, i64>(1))))
            })
        })
    }

    fn spooled(&self) -> usize {
        self.shared.health.spooled.load(Ordering::Acquire)
    }

    fn problem(&self) -> Option<String> {
        let failing = lock(&self.shared.health.failing).clone()?;
        Some(format!(
            "the ledger database cannot be written ({failing}); {} rows wait in the spool {}",
            self.shared.health.spooled.load(Ordering::Acquire),
            self.shared.spool.display()
        ))
    }

    fn insert_session(&self, x: &SsoSession) -> StoreResult<()> {
        let x = x.clone();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let groups = serde_json::to_string(&x.groups).unwrap_or_else(|_| "[]".into());
                client
                    .execute(
                        &format!(
                            "INSERT INTO tollgate_sso_sessions ({SESSION_COLUMNS})
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                        ),
                        &[
                            &x.id,
                            &x.subject,
                            &x.user,
                            &groups,
                            &x.refresh_hash,
                            &x.idp_refresh,
                            &x.created_ms,
                            &x.expires_ms,
                            &x.last_seen_ms,
                            &x.revoked_ms,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
    }

    fn renew_session(&self, x: &SsoSession) -> StoreResult<bool> {
        let x = x.clone();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let groups = serde_json::to_string(&x.groups).unwrap_or_else(|_| "[]".into());
                let n = client
                    .execute(
                        "UPDATE tollgate_sso_sessions SET \"user\" = $2, groups = $3, idp_refresh = $4, last_seen_ms = $5
                         WHERE id = $1 AND revoked_ms IS NULL",
                        &[&x.id, &x.user, &groups, &x.idp_refresh, &x.last_seen_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(n == 1)
            })
        })
    }

    fn revoke_session(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        let id = id.to_string();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let n = client
                    .execute(
                        "UPDATE tollgate_sso_sessions SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL",
                        &[&id, &at_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(n == 1)
            })
        })
    }

    fn session_by_refresh(&self, refresh_hash: &str) -> StoreResult<Option<SsoSession>> {
        let hash = refresh_hash.to_string();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let sql = format!("SELECT {SESSION_COLUMNS} FROM tollgate_sso_sessions WHERE refresh_hash = $1");
                let row = client.query_opt(&sql, &[&hash]).await.map_err(pg)?;
                Ok(row.as_ref().map(session_from_row))
            })
        })
    }

    fn sessions(&self, now_ms: i64) -> StoreResult<Vec<SsoSession>> {
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let sql = format!(
                    "SELECT {SESSION_COLUMNS} FROM tollgate_sso_sessions WHERE expires_ms > $1 ORDER BY last_seen_ms DESC"
                );
                let rows = client.query(&sql, &[&now_ms]).await.map_err(pg)?;
                Ok(rows.iter().map(session_from_row).collect())
            })
        })
    }

    fn revoke_sessions(&self, user: &str, at_ms: i64) -> StoreResult<Vec<String>> {
        let user = user.to_string();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let rows = client
                    .query(
                        "UPDATE tollgate_sso_sessions SET revoked_ms = $2
                         WHERE \"user\" = $1 AND revoked_ms IS NULL AND expires_ms > $2 RETURNING id",
                        &[&user, &at_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
    }

    fn revoked_sessions(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let rows = client
                    .query(
                        "SELECT id FROM tollgate_sso_sessions WHERE revoked_ms IS NOT NULL AND expires_ms > $1",
                        &[&now_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
    }

    fn set_person_disabled(&self, user: &str, disabled: bool, at_ms: i64) -> StoreResult<()> {
        let user = user.to_string();
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                client
                    .execute(
                        "INSERT INTO tollgate_sso_people (\"user\", disabled, changed_ms) VALUES ($1, $2, $3)
                         ON CONFLICT (\"user\") DO UPDATE SET disabled = $2, changed_ms = $3",
                        &[&user, &disabled, &at_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
    }

    fn disabled_people(&self) -> StoreResult<Vec<String>> {
        self.run(move |s| {
            Box::pin(async move {
                let client = s.client().await?;
                let rows = client
                    .query("SELECT \"user\" FROM tollgate_sso_people WHERE disabled ORDER BY \"user\"", &[])
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
    }

    fn close(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let s = self.shared.clone();
        crate::blocking::block_on(self.rt.handle(), async move {
            // A pass in flight may hold rows it took from the queue: it ends (written, or
            // spooled, within a few WRITE_TIMEOUTs) before the process may.
            drop(s.pass.lock().await);
            if lock(&s.health.failing).is_some() {
                // The database is away: the last rows go straight to the spool, without waiting
                // on it again (the next start replays them).
                let rows = std::mem::take(&mut *lock(&s.queue));
                match s.append_spool(&rows) {
                    Ok(()) => {
                        tracing::warn!(rows = rows.len(), "the ledger database is away: the last rows are spooled")
                    }
                    Err(e) => tracing::error!(error = %e, rows = rows.len(), "the ledger's last rows are lost"),
                }
            } else {
                s.pass().await;
            }
        });
    }
}
