//! The embedded store: one SQLite file in WAL mode.
//!
//! Durability: the writer commits the queue every `flush_interval` in one transaction. WAL with
//! `synchronous = NORMAL` keeps every committed transaction through a crash of the process
//! (`kill -9`); a power cut may lose the last transactions before a checkpoint. A crash
//! therefore loses at most the rows of the last `flush_interval`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono_tz::Tz;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::{
    local_day, AlertMark, Group, LedgerRow, SsoSession, Store, StoreError, StoreResult, StoredKey, UsageLine,
    UsageQuery,
};
use crate::limits::ScopeKind;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    user TEXT,
    team TEXT,
    models TEXT,
    budget TEXT,
    limits TEXT,
    expires_ms INTEGER,
    disabled INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    key_id TEXT,
    user TEXT,
    team TEXT,
    model TEXT,
    provider TEXT,
    provider_model TEXT,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    stream INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_write_5m_tokens INTEGER NOT NULL,
    cache_write_1h_tokens INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,
    priced INTEGER NOT NULL,
    estimated TEXT
);
CREATE INDEX IF NOT EXISTS ledger_ts ON ledger (ts_ms);
CREATE INDEX IF NOT EXISTS ledger_key ON ledger (key_id, ts_ms);
CREATE INDEX IF NOT EXISTS ledger_user ON ledger (user, ts_ms);
CREATE INDEX IF NOT EXISTS ledger_team ON ledger (team, ts_ms);
CREATE TABLE IF NOT EXISTS alerts (
    scope TEXT NOT NULL,
    id TEXT NOT NULL,
    period_start_ms INTEGER NOT NULL,
    alert TEXT NOT NULL,
    payload TEXT NOT NULL,
    claimed_ms INTEGER NOT NULL,
    renewed_ms INTEGER NOT NULL,
    delivered_ms INTEGER,
    PRIMARY KEY (scope, id, period_start_ms, alert)
);
CREATE TABLE IF NOT EXISTS sso_sessions (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    user TEXT NOT NULL,
    groups TEXT NOT NULL,
    refresh_hash TEXT NOT NULL UNIQUE,
    idp_refresh BLOB,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE INDEX IF NOT EXISTS sso_sessions_user ON sso_sessions (user);
CREATE TABLE IF NOT EXISTS sso_people (
    user TEXT PRIMARY KEY,
    disabled INTEGER NOT NULL,
    changed_ms INTEGER NOT NULL
);
";

/// The schema version this build writes; older files are brought up to it at open.
const SCHEMA_VERSION: i64 = 2;

/// Brings a store written by an older build up to [`SCHEMA_VERSION`].
fn migrate(conn: &Connection) -> StoreResult<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 2 {
        // Version 1 had no `estimated` column (a fresh file made just now already has it).
        let has: bool =
            conn.query_row("SELECT COUNT(*) > 0 FROM pragma_table_info('ledger') WHERE name = 'estimated'", [], |r| {
                r.get(0)
            })?;
        if !has {
            conn.execute_batch("ALTER TABLE ledger ADD COLUMN estimated TEXT")?;
        }
    }
    // Never lower it: a newer build's file keeps its own number.
    if version < SCHEMA_VERSION {
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(())
}

/// Report days are cut from quarter-hour sums, so every time zone offset in use today
/// (whole, half and quarter hours) lands on the right day.
const BUCKET_MS: i64 = 15 * 60 * 1000;

struct Shared {
    queue: Mutex<Vec<LedgerRow>>,
    /// The connection every write goes through; the writer holds it while it commits, so
    /// `flush` returning means every row taken before it is committed.
    writer: Mutex<Connection>,
    stopping: AtomicBool,
}

pub struct SqliteStore {
    shared: Arc<Shared>,
    reader: Mutex<Connection>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn open(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Other(format!("cannot open the store at {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SqliteStore {
    pub fn open(path: &Path, flush_interval: Duration) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Other(format!("cannot create {}: {e}", dir.display())))?;
        }
        let writer = open(path)?;
        writer.execute_batch(SCHEMA)?;
        migrate(&writer)?;
        // Compiled once here, where a start's other work is, rather than by the first flush
        // that has the rows for them.
        writer.prepare_cached(&INSERT_MANY)?;
        writer.prepare_cached(&INSERT_ONE)?;
        let reader = open(path)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::with_capacity(1024)),
            writer: Mutex::new(writer),
            stopping: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = crate::background::spawn("tollgate-ledger", move || loop {
            std::thread::park_timeout(flush_interval);
            if let Err(e) = commit_queue(&s) {
                // The rows stay queued and are tried again next time: none is lost.
                tracing::error!(error = %e, "cannot write the ledger; will retry");
            }
            if s.stopping.load(Ordering::Acquire) {
                return;
            }
        })
        .map_err(|e| StoreError::Other(format!("cannot start the ledger writer: {e}")))?;
        Ok(SqliteStore { shared, reader: Mutex::new(reader), thread: Mutex::new(Some(thread)) })
    }
}

/// Commits the queued rows in one transaction; on failure puts them back.
fn commit_queue(shared: &Shared) -> StoreResult<()> {
    let mut conn = lock(&shared.writer);
    let rows = std::mem::take(&mut *lock(&shared.queue));
    if rows.is_empty() {
        return Ok(());
    }
    match insert_rows(&mut conn, &rows) {
        Ok(()) => Ok(()),
        Err(e) => {
            let mut q = lock(&shared.queue);
            let newer = std::mem::replace(&mut *q, rows);
            q.extend(newer);
            Err(e)
        }
    }
}

/// Rows per `INSERT` statement: a statement's own work (starting, halting, the bindings'
/// set-up) is paid once per this many rows of a busy gateway's flush (hundreds of rows). The
/// writer's CPU per row at 3,600 requests a second fell from 9.7 to 7.3 µs with it
/// (docs/benchmarks.md). A quiet gateway's few rows a flush take the one-row statement.
const ROWS_PER_INSERT: usize = 32;

const LEDGER_COLUMNS: &str = "request_id, ts_ms, key_id, user, team, model, provider, provider_model, status, \
     outcome, stream, input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, \
     cost_nanos, priced, estimated";
const LEDGER_PARAMS: usize = 19;

// 999 is the lowest limit on a statement's parameters SQLite has shipped with (a build may
// lower it): past it every flush would fail and the rows would pile up in memory.
const _: () = assert!(ROWS_PER_INSERT * LEDGER_PARAMS <= 999);

static INSERT_MANY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_sql(ROWS_PER_INSERT));
static INSERT_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_sql(1));

/// `INSERT OR IGNORE` of `rows` rows, numbered parameters in column order, row after row.
fn insert_sql(rows: usize) -> String {
    let mut sql = format!("INSERT OR IGNORE INTO ledger ({LEDGER_COLUMNS}) VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..LEDGER_PARAMS {
            let sep = if c == 0 { "" } else { ", " };
            sql.push_str(&format!("{sep}?{}", r * LEDGER_PARAMS + c + 1));
        }
        sql.push(')');
    }
    sql
}

/// Binds `row` as the `index`-th row of a statement from [`insert_sql`].
fn bind_row(stmt: &mut rusqlite::Statement<'_>, index: usize, r: &LedgerRow) -> rusqlite::Result<()> {
    let values: [&dyn rusqlite::ToSql; LEDGER_PARAMS] = [
        &r.request_id,
        &r.time_ms,
        &r.key_id,
        &r.user,
        &r.team,
        &r.model,
        &r.provider,
        &r.provider_model,
        &r.status,
        &r.outcome,
        &r.stream,
        &sql_int(r.input_tokens),
        &sql_int(r.output_tokens),
        &sql_int(r.cache_read_tokens),
        &sql_int(r.cache_write_5m_tokens),
        &sql_int(r.cache_write_1h_tokens),
        &sql_int(r.cost_nanos),
        &r.priced,
        &r.estimated,
    ];
    for (c, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(index * LEDGER_PARAMS + c + 1, v)?;
    }
    Ok(())
}

fn insert_rows(conn: &mut Connection, rows: &[LedgerRow]) -> StoreResult<()> {
    let tx = conn.transaction()?;
    {
        let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
        if chunks.len() > 0 {
            let mut stmt = tx.prepare_cached(&INSERT_MANY)?;
            // Unbound parameters would be NULLs, and `OR IGNORE` drops a row with a NULL where
            // none may be: every parameter is bound for every statement.
            debug_assert_eq!(stmt.parameter_count(), ROWS_PER_INSERT * LEDGER_PARAMS);
            for chunk in &mut chunks {
                for (i, r) in chunk.iter().enumerate() {
                    bind_row(&mut stmt, i, r)?;
                }
                stmt.raw_execute()?;
            }
        }
        let mut one = tx.prepare_cached(&INSERT_ONE)?;
        debug_assert_eq!(one.parameter_count(), LEDGER_PARAMS);
        for r in chunks.remainder() {
            bind_row(&mut one, 0, r)?;
            one.raw_execute()?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// SQLite integers are signed 64-bit; counts beyond that are clamped rather than wrapped.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn column(kind: ScopeKind) -> &'static str {
    match kind {
        ScopeKind::Key => "key_id",
        ScopeKind::User => "user",
        ScopeKind::Team => "team",
        ScopeKind::Model => "model",
    }
}

fn key_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredKey> {
    let json_err = |i: usize, e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let hash: Vec<u8> = row.get(1)?;
    let models: Option<String> = row.get(4)?;
    let budget: Option<String> = row.get(5)?;
    let limits: Option<String> = row.get(6)?;
    let metadata: Option<String> = row.get(9)?;
    Ok(StoredKey {
        id: row.get(0)?,
        hash: hash.try_into().map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, "hash is not 32 bytes".into())
        })?,
        user: row.get(2)?,
        team: row.get(3)?,
        models: models.map(|m| serde_json::from_str(&m)).transpose().map_err(|e| json_err(4, e))?,
        budget: budget.map(|b| serde_json::from_str(&b)).transpose().map_err(|e| json_err(5, e))?,
        limits: limits.map(|l| serde_json::from_str(&l)).transpose().map_err(|e| json_err(6, e))?.unwrap_or_default(),
        expires_ms: row.get(7)?,
        disabled: row.get(8)?,
        metadata: metadata
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| json_err(9, e))?
            .unwrap_or_default(),
        created_ms: row.get(10)?,
        updated_ms: row.get(11)?,
    })
}

fn key_params(k: &StoredKey) -> [Box<dyn rusqlite::ToSql + '_>; 12] {
    let json = |v: serde_json::Value| v.to_string();
    [
        Box::new(&k.id),
        Box::new(&k.hash[..]),
        Box::new(&k.user),
        Box::new(&k.team),
        Box::new(k.models.as_ref().map(|m| json(serde_json::json!(m)))),
        Box::new(k.budget.map(|b| json(serde_json::json!(b)))),
        Box::new((!k.limits.is_empty()).then(|| json(serde_json::json!(k.limits)))),
        Box::new(k.expires_ms),
        Box::new(k.disabled),
        Box::new(json(serde_json::Value::Object(k.metadata.clone()))),
        Box::new(k.created_ms),
        Box::new(k.updated_ms),
    ]
}

const KEY_COLUMNS: &str =
    "id, hash, user, team, models, budget, limits, expires_ms, disabled, metadata, created_ms, updated_ms";

/// An embedded store's file read for a move into a shared database: its keys, and its ledger
/// in pages (by row order, so a page never holds the same row twice).
pub(super) struct SqliteExport {
    conn: Connection,
}

impl SqliteExport {
    /// Opens `path` read-only: a file that is not a Tollgate store, or is missing, is an error.
    pub(super) fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StoreError::Other(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let tables: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('keys', 'ledger')",
            [],
            |r| r.get(0),
        )?;
        if tables != 2 {
            return Err(StoreError::Other(format!(
                "{} is not a Tollgate store (no keys and ledger tables)",
                path.display()
            )));
        }
        Ok(SqliteExport { conn })
    }

    pub(super) fn keys(&self) -> StoreResult<Vec<StoredKey>> {
        let mut stmt = self.conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY id"))?;
        let keys = stmt.query_map([], key_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    /// The ledger's row count and total cost.
    pub(super) fn totals(&self) -> StoreResult<(u64, u64)> {
        let (n, cost): (i64, i64) =
            self.conn.query_row("SELECT COUNT(*), COALESCE(SUM(cost_nanos), 0) FROM ledger", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        Ok((n as u64, cost as u64))
    }

    /// Up to `n` ledger rows after SQLite's row number `after`, with the last one's number.
    pub(super) fn ledger_page(&self, after: i64, n: usize) -> StoreResult<(Vec<LedgerRow>, i64)> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT rowid, request_id, ts_ms, key_id, user, team, model, provider, provider_model, status, outcome, \
             stream, input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, cache_write_1h_tokens, \
             cost_nanos, priced, estimated FROM ledger WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
        )?;
        let mut last = after;
        let mut rows = Vec::with_capacity(n);
        let mut q = stmt.query(rusqlite::params![after, n as i64])?;
        while let Some(r) = q.next()? {
            last = r.get(0)?;
            let estimated: Option<String> = r.get(19)?;
            // A rule this build does not know (a newer build's) would turn an estimate into an
            // exact count: refuse rather than drop it.
            let estimated = match estimated.as_deref() {
                None | Some("") => None,
                Some(rule) => Some(crate::metering::Estimate::parse(rule).map(|e| e.as_str()).ok_or_else(|| {
                    StoreError::Other(format!("a ledger row's estimate rule {rule:?} is unknown to this build"))
                })?),
            };
            let int = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
            rows.push(LedgerRow {
                request_id: r.get(1)?,
                time_ms: r.get(2)?,
                key_id: r.get(3)?,
                user: r.get(4)?,
                team: r.get(5)?,
                model: r.get(6)?,
                provider: r.get(7)?,
                provider_model: r.get(8)?,
                status: r.get::<_, i64>(9)?.clamp(0, i64::from(u16::MAX)) as u16,
                outcome: r.get(10)?,
                stream: r.get(11)?,
                input_tokens: int(12)?,
                output_tokens: int(13)?,
                cache_read_tokens: int(14)?,
                cache_write_5m_tokens: int(15)?,
                cache_write_1h_tokens: int(16)?,
                cost_nanos: int(17)?,
                priced: r.get(18)?,
                estimated,
            });
        }
        Ok((rows, last))
    }
}

const SESSION_COLUMNS: &str =
    "id, subject, user, groups, refresh_hash, idp_refresh, created_ms, expires_ms, last_seen_ms, revoked_ms";

fn session_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SsoSession> {
    let groups: String = r.get(3)?;
    Ok(SsoSession {
        id: r.get(0)?,
        subject: r.get(1)?,
        user: r.get(2)?,
        groups: serde_json::from_str(&groups).unwrap_or_default(),
        refresh_hash: r.get(4)?,
        idp_refresh: r.get(5)?,
        created_ms: r.get(6)?,
        expires_ms: r.get(7)?,
        last_seen_ms: r.get(8)?,
        revoked_ms: r.get(9)?,
    })
}

/// Sets one of an alert's times (`delivered_ms`, `renewed_ms`).
fn stamp_alert(shared: &Shared, m: &AlertMark, column: &'static str, at_ms: i64) -> StoreResult<()> {
    lock(&shared.writer).execute(
        &format!(
            "UPDATE alerts SET {column} = ?5 WHERE scope = ?1 AND id = ?2 AND period_start_ms = ?3 AND alert = ?4"
        ),
        rusqlite::params![m.scope, m.id, m.period_start_ms, m.alert, at_ms],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn record(&self, row: LedgerRow) {
        lock(&self.shared.queue).push(row);
        if self.shared.stopping.load(Ordering::Acquire) {
            if let Err(e) = commit_queue(&self.shared) {
                tracing::error!(error = %e, "cannot write the ledger after its writer stopped");
            }
        }
    }

    fn pending(&self) -> usize {
        lock(&self.shared.queue).len()
    }

    fn flush(&self) -> StoreResult<()> {
        commit_queue(&self.shared)
    }

    fn spend_since(&self, kind: ScopeKind, id: &str, since_ms: i64) -> StoreResult<u64> {
        let sql =
            format!("SELECT COALESCE(SUM(cost_nanos), 0) FROM ledger WHERE {} = ?1 AND ts_ms >= ?2", column(kind));
        let total: i64 = lock(&self.reader).query_row(&sql, params![id, since_ms], |r| r.get(0))?;
        Ok(total.max(0) as u64)
    }

    fn spend_by_key_prefix(&self, prefix: &str, since_ms: i64) -> StoreResult<Vec<(String, u64)>> {
        // A range on the key index rather than LIKE, whose wildcards the prefix could contain.
        let upper = format!("{prefix}\u{10FFFF}");
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare(
            "SELECT key_id, SUM(cost_nanos) FROM ledger WHERE key_id >= ?1 AND key_id < ?2 AND ts_ms >= ?3 GROUP BY key_id",
        )?;
        let rows = stmt
            .query_map(params![prefix, upper, since_ms], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn usage(&self, q: &UsageQuery, tz: Tz) -> StoreResult<Vec<UsageLine>> {
        let scopes: Vec<Group> = q.group_by.iter().copied().filter(|g| *g != Group::Day).collect();
        let by_day = q.group_by.contains(&Group::Day);
        let mut select: Vec<String> =
            scopes.iter().filter_map(|g| g.scope()).map(|kind| column(kind).to_string()).collect();
        if by_day {
            select.push(format!("ts_ms / {BUCKET_MS}"));
        }
        let mut wheres = vec!["1 = 1".to_string()];
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(from) = q.from_ms {
            args.push(from.into());
            wheres.push(format!("ts_ms >= ?{}", args.len()));
        }
        if let Some(to) = q.to_ms {
            args.push(to.into());
            wheres.push(format!("ts_ms < ?{}", args.len()));
        }
        for (kind, value) in &q.filters {
            args.push(value.clone().into());
            wheres.push(format!("{} = ?{}", column(*kind), args.len()));
        }
        let group_clause = if select.is_empty() { String::new() } else { format!("GROUP BY {}", select.join(", ")) };
        let sums = "COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens), \
                    SUM(cache_write_5m_tokens), SUM(cache_write_1h_tokens), SUM(cost_nanos), \
                    COUNT(estimated)";
        let cols = if select.is_empty() { sums.to_string() } else { format!("{}, {sums}", select.join(", ")) };
        let sql = format!("SELECT {cols} FROM ledger WHERE {} {group_clause}", wheres.join(" AND "));

        let conn = lock(&self.reader);
        let mut stmt = conn.prepare(&sql)?;
        let mut lines: HashMap<Vec<Option<String>>, UsageLine> = HashMap::new();
        let mut rows = stmt.query(params_from_iter(args))?;
        while let Some(row) = rows.next()? {
            let mut key: Vec<Option<String>> = Vec::with_capacity(q.group_by.len());
            for i in 0..scopes.len() {
                key.push(row.get(i)?);
            }
            let mut n = scopes.len();
            if by_day {
                let bucket: i64 = row.get(n)?;
                key.push(Some(local_day(bucket * BUCKET_MS, tz)));
                n += 1;
            }
            let count: i64 = row.get(n)?;
            if count == 0 {
                continue;
            }
            let get = |i: usize| -> rusqlite::Result<u64> {
                Ok(row.get::<_, Option<i64>>(n + i)?.unwrap_or(0).max(0) as u64)
            };
            let line = lines.entry(key).or_default();
            line.requests += count as u64;
            line.input_tokens += get(1)?;
            line.output_tokens += get(2)?;
            line.cache_read_tokens += get(3)?;
            line.cache_write_5m_tokens += get(4)?;
            line.cache_write_1h_tokens += get(5)?;
            line.cost_nanos += get(6)?;
            line.estimated += get(7)?;
        }
        Ok(super::report(&scopes, by_day, lines))
    }

    fn keys(&self) -> StoreResult<Vec<StoredKey>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY id"))?;
        let keys = stmt.query_map([], key_from_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    fn insert_key(&self, key: &StoredKey) -> StoreResult<()> {
        let conn = lock(&self.shared.writer);
        let exists: Option<i64> =
            conn.query_row("SELECT 1 FROM keys WHERE id = ?1", [&key.id], |r| r.get(0)).optional()?;
        if exists.is_some() {
            return Err(StoreError::Duplicate(key.id.clone()));
        }
        let p = key_params(key);
        conn.execute(
            &format!("INSERT INTO keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params_from_iter(p.iter().map(|b| b.as_ref())),
        )?;
        Ok(())
    }

    fn update_key(&self, key: &StoredKey) -> StoreResult<bool> {
        let conn = lock(&self.shared.writer);
        let p = key_params(key);
        let n = conn.execute(
            "UPDATE keys SET hash = ?2, user = ?3, team = ?4, models = ?5, budget = ?6, limits = ?7,
             expires_ms = ?8, disabled = ?9, metadata = ?10, created_ms = ?11, updated_ms = ?12 WHERE id = ?1",
            params_from_iter(p.iter().map(|b| b.as_ref())),
        )?;
        Ok(n == 1)
    }

    fn delete_key(&self, id: &str) -> StoreResult<bool> {
        let n = lock(&self.shared.writer).execute("DELETE FROM keys WHERE id = ?1", [id])?;
        Ok(n == 1)
    }

    fn claim_alert(&self, m: &AlertMark) -> StoreResult<bool> {
        let n = lock(&self.shared.writer).execute(
            "INSERT OR IGNORE INTO alerts (scope, id, period_start_ms, alert, payload, claimed_ms, renewed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            rusqlite::params![m.scope, m.id, m.period_start_ms, m.alert, m.payload, crate::limits::now_ms()],
        )?;
        Ok(n == 1)
    }

    fn alert_delivered(&self, m: &AlertMark) -> StoreResult<()> {
        stamp_alert(&self.shared, m, "delivered_ms", crate::limits::now_ms())
    }

    fn reclaim_alerts(&self, stale_ms: i64, since_ms: i64) -> StoreResult<Vec<AlertMark>> {
        let conn = lock(&self.shared.writer);
        let mut stmt = conn.prepare(
            "UPDATE alerts SET renewed_ms = ?1
             WHERE delivered_ms IS NULL AND renewed_ms < ?2 AND claimed_ms >= ?3
             RETURNING scope, id, period_start_ms, alert, payload",
        )?;
        let rows = stmt.query_map(rusqlite::params![crate::limits::now_ms(), stale_ms, since_ms], |r| {
            Ok(AlertMark {
                scope: r.get(0)?,
                id: r.get(1)?,
                period_start_ms: r.get(2)?,
                alert: r.get(3)?,
                payload: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn renew_alert(&self, m: &AlertMark, at_ms: i64) -> StoreResult<()> {
        stamp_alert(&self.shared, m, "renewed_ms", at_ms)
    }

    fn insert_session(&self, x: &SsoSession) -> StoreResult<()> {
        let groups = serde_json::to_string(&x.groups).unwrap_or_else(|_| "[]".into());
        lock(&self.shared.writer).execute(
            &format!("INSERT INTO sso_sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
            rusqlite::params![
                x.id,
                x.subject,
                x.user,
                groups,
                x.refresh_hash,
                x.idp_refresh,
                x.created_ms,
                x.expires_ms,
                x.last_seen_ms,
                x.revoked_ms
            ],
        )?;
        Ok(())
    }

    fn renew_session(&self, x: &SsoSession) -> StoreResult<bool> {
        let groups = serde_json::to_string(&x.groups).unwrap_or_else(|_| "[]".into());
        let n = lock(&self.shared.writer).execute(
            "UPDATE sso_sessions SET user = ?2, groups = ?3, idp_refresh = ?4, last_seen_ms = ?5
             WHERE id = ?1 AND revoked_ms IS NULL",
            rusqlite::params![x.id, x.user, groups, x.idp_refresh, x.last_seen_ms],
        )?;
        Ok(n == 1)
    }

    fn revoke_session(&self, id: &str, at_ms: i64) -> StoreResult<bool> {
        let n = lock(&self.shared.writer).execute(
            "UPDATE sso_sessions SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            rusqlite::params![id, at_ms],
        )?;
        Ok(n == 1)
    }

    fn session_by_refresh(&self, refresh_hash: &str) -> StoreResult<Option<SsoSession>> {
        let conn = lock(&self.reader);
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sso_sessions WHERE refresh_hash = ?1"))?;
        let mut rows = stmt.query_map([refresh_hash], session_from_row)?;
        Ok(rows.next().transpose()?)
    }

    fn sessions(&self, now_ms: i64) -> StoreResult<Vec<SsoSession>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare(&format!(
            "SELECT {SESSION_COLUMNS} FROM sso_sessions WHERE expires_ms > ?1 ORDER BY last_seen_ms DESC"
        ))?;
        let rows = stmt.query_map([now_ms], session_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_sessions(&self, user: &str, at_ms: i64) -> StoreResult<Vec<String>> {
        let conn = lock(&self.shared.writer);
        let mut stmt = conn.prepare(
            "UPDATE sso_sessions SET revoked_ms = ?2 WHERE user = ?1 AND revoked_ms IS NULL AND expires_ms > ?2
             RETURNING id",
        )?;
        let rows = stmt.query_map(rusqlite::params![user, at_ms], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoked_sessions(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare("SELECT id FROM sso_sessions WHERE revoked_ms IS NOT NULL AND expires_ms > ?1")?;
        let rows = stmt.query_map([now_ms], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_person_disabled(&self, user: &str, disabled: bool, at_ms: i64) -> StoreResult<()> {
        lock(&self.shared.writer).execute(
            "INSERT OR REPLACE INTO sso_people (user, disabled, changed_ms) VALUES (?1, ?2, ?3)",
            rusqlite::params![user, disabled, at_ms],
        )?;
        Ok(())
    }

    fn disabled_people(&self) -> StoreResult<Vec<String>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare("SELECT user FROM sso_people WHERE disabled = 1 ORDER BY user")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn close(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(t) = lock(&self.thread).take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let Err(e) = commit_queue(&self.shared) {
            tracing::error!(error = %e, "cannot write the ledger on the way out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, key: &str, team: &str, ts_ms: i64, cost: u64) -> LedgerRow {
        LedgerRow {
            request_id: id.into(),
            time_ms: ts_ms,
            key_id: Some(key.into()),
            user: None,
            team: Some(team.into()),
            model: Some("m".into()),
            provider: Some("p".into()),
            provider_model: None,
            status: 200,
            outcome: "complete".into(),
            stream: true,
            input_tokens: 10,
            output_tokens: 20,
            cache_read_tokens: 0,
            cache_write_5m_tokens: 0,
            cache_write_1h_tokens: 0,
            cost_nanos: cost,
            priced: true,
            estimated: None,
        }
    }

    #[test]
    fn a_revoked_sign_in_stays_revoked_whatever_a_refresh_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Duration::from_secs(3600)).unwrap();
        let mut s = SsoSession {
            id: "s1".into(),
            subject: "sub-1".into(),
            user: "alice@example.com".into(),
            groups: vec!["eng".into()],
            refresh_hash: "h1".into(),
            idp_refresh: Some(vec![1, 2, 3]),
            created_ms: 1_000,
            expires_ms: 10_000,
            last_seen_ms: 1_000,
            revoked_ms: None,
        };
        store.insert_session(&s).unwrap();
        assert_eq!(store.session_by_refresh("h1").unwrap().as_ref(), Some(&s));
        // A refresh that read the row before the revocation writes after it: refused.
        s.groups = vec!["data".into()];
        s.last_seen_ms = 2_000;
        assert!(store.renew_session(&s).unwrap());
        assert!(store.revoke_session("s1", 3_000).unwrap());
        assert!(!store.revoke_session("s1", 4_000).unwrap(), "revoked once");
        s.last_seen_ms = 5_000;
        assert!(!store.renew_session(&s).unwrap());
        let stored = store.session_by_refresh("h1").unwrap().unwrap();
        assert_eq!(
            (stored.revoked_ms, stored.last_seen_ms, stored.groups),
            (Some(3_000), 2_000, vec!["data".to_string()])
        );
        assert_eq!(store.revoked_sessions(9_999).unwrap(), vec!["s1".to_string()]);
        // Expired sign-ins leave the revoked set.
        assert!(store.revoked_sessions(10_000).unwrap().is_empty());
        assert_eq!(store.sessions(9_999).unwrap().len(), 1);
    }

    #[test]
    fn rows_written_by_the_statement_are_every_column_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Duration::from_secs(3600)).unwrap();
        // Two whole statements' worth and a remainder, each row's values its own.
        let n = 2 * ROWS_PER_INSERT + 5;
        let full = |i: usize| LedgerRow {
            request_id: format!("req-{i:03}"),
            time_ms: 1_000 + i as i64,
            key_id: Some(format!("k{i}")),
            user: (i % 2 == 0).then(|| format!("u{i}")),
            team: Some(format!("t{i}")),
            model: Some(format!("m{i}")),
            provider: Some(format!("p{i}")),
            provider_model: (i % 3 == 0).then(|| format!("pm{i}")),
            status: 200 + i as u16,
            outcome: format!("o{i}"),
            stream: i % 2 == 1,
            input_tokens: 10 + i as u64,
            output_tokens: 20 + i as u64,
            cache_read_tokens: 30 + i as u64,
            cache_write_5m_tokens: 40 + i as u64,
            cache_write_1h_tokens: 50 + i as u64,
            cost_nanos: if i == 7 { u64::MAX } else { 60 + i as u64 },
            priced: i % 4 != 0,
            estimated: (i % 5 == 0).then_some("output_from_stream"),
        };
        // The queue in order: row 3 again inside the first statement, row 40 again after the
        // second (in the remainder), the last row again last. The first of each wins.
        let mut queued = Vec::new();
        for i in 0..n {
            queued.push(full(i));
            if i == 5 {
                queued.push(LedgerRow { cost_nanos: 999, ..full(3) });
            }
        }
        queued.push(LedgerRow { cost_nanos: 999, ..full(40) });
        queued.push(LedgerRow { cost_nanos: 999, ..full(n - 1) });
        for r in queued {
            store.record(r);
        }
        // A flush that fails part-way (here in the second statement) writes nothing and keeps
        // every row queued; the next writes each once.
        lock(&store.shared.writer)
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON ledger WHEN new.request_id = 'req-040'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END",
            )
            .unwrap();
        assert!(store.flush().is_err());
        assert_eq!(store.pending(), n + 3);
        let count =
            |s: &SqliteStore| lock(&s.reader).query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get::<_, i64>(0));
        assert_eq!(count(&store).unwrap(), 0);
        lock(&store.shared.writer).execute_batch("DROP TRIGGER refuse").unwrap();
        store.flush().unwrap();
        assert_eq!(store.pending(), 0);
        let conn = lock(&store.reader);
        let order: Vec<String> = conn
            .prepare("SELECT request_id FROM ledger ORDER BY rowid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(order, (0..n).map(|i| format!("req-{i:03}")).collect::<Vec<_>>(), "written in the queue's order");
        let mut stmt = conn.prepare(&format!("SELECT {LEDGER_COLUMNS} FROM ledger ORDER BY request_id")).unwrap();
        let read: Vec<String> = stmt
            .query_map([], |r| {
                (0..LEDGER_PARAMS)
                    .map(|c| r.get_ref(c).map(|v| format!("{v:?}")))
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map(|v| v.join("|"))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(read.len(), n, "a request recorded twice is one row");
        for (i, line) in read.iter().enumerate() {
            let r = full(i);
            let text =
                |v: &Option<String>| v.as_ref().map_or("Null".to_string(), |s| format!("Text({:?})", s.as_bytes()));
            let want = [
                format!("Text({:?})", r.request_id.as_bytes()),
                format!("Integer({})", r.time_ms),
                text(&r.key_id),
                text(&r.user),
                text(&r.team),
                text(&r.model),
                text(&r.provider),
                text(&r.provider_model),
                format!("Integer({})", r.status),
                format!("Text({:?})", r.outcome.as_bytes()),
                format!("Integer({})", i64::from(r.stream)),
                format!("Integer({})", r.input_tokens),
                format!("Integer({})", r.output_tokens),
                format!("Integer({})", r.cache_read_tokens),
                format!("Integer({})", r.cache_write_5m_tokens),
                format!("Integer({})", r.cache_write_1h_tokens),
                format!("Integer({})", sql_int(r.cost_nanos)),
                format!("Integer({})", i64::from(r.priced)),
                text(&r.estimated.map(str::to_string)),
            ]
            .join("|");
            assert_eq!(line, &want, "row {i}");
        }
    }

    #[test]
    fn ledger_sums_and_days() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Duration::from_secs(3600)).unwrap();
        let day = 86_400_000;
        store.record(row("a", "k1", "t", 10 * day + 1000, 5));
        store.record(row("b", "k2", "t", 10 * day + 2000, 7));
        store.record(row("c", "k1", "u", 11 * day + 1000, 11));
        store.record(row("c", "k1", "u", 11 * day + 1000, 11)); // the same request twice counts once
        assert_eq!(store.spend_since(ScopeKind::Key, "k1", 0).unwrap(), 0, "not flushed yet");
        store.flush().unwrap();
        assert_eq!(store.spend_since(ScopeKind::Key, "k1", 0).unwrap(), 16);
        assert_eq!(store.spend_since(ScopeKind::Team, "t", 10 * day + 1500).unwrap(), 7);
        let q = UsageQuery { group_by: vec![Group::Team, Group::Day], ..Default::default() };
        let lines = store.usage(&q, Tz::UTC).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].group["team"].as_deref(), Some("t"));
        assert_eq!(lines[0].group["day"].as_deref(), Some("1970-01-11"));
        assert_eq!((lines[0].requests, lines[0].cost_nanos, lines[0].output_tokens), (2, 12, 40));
        // In Tokyo (UTC+9) all three fall on one local day per team.
        let lines = store.usage(&q, "Asia/Tokyo".parse().unwrap()).unwrap();
        assert_eq!(lines[1].group["day"].as_deref(), Some("1970-01-12"));
        store.close();
    }

    #[test]
    fn keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Duration::from_millis(10)).unwrap();
        let mut k = StoredKey {
            id: "alice-laptop".into(),
            hash: [7; 32],
            user: Some("alice".into()),
            team: None,
            models: Some(vec!["claude-*".into()]),
            budget: Some(crate::limits::BudgetConfig { usd: 12.5, period: crate::limits::Period::Weekly }),
            limits: crate::limits::RateLimits { rpm: Some(5), ..Default::default() },
            expires_ms: Some(1),
            disabled: false,
            metadata: serde_json::json!({"laptop": "mbp-14"}).as_object().unwrap().clone(),
            created_ms: 1,
            updated_ms: 2,
        };
        store.insert_key(&k).unwrap();
        assert!(matches!(store.insert_key(&k), Err(StoreError::Duplicate(_))));
        assert_eq!(store.keys().unwrap(), vec![k.clone()]);
        k.disabled = true;
        assert!(store.update_key(&k).unwrap());
        assert!(store.keys().unwrap()[0].disabled);
        assert!(store.delete_key("alice-laptop").unwrap());
        assert!(!store.delete_key("alice-laptop").unwrap());
        store.close();
    }
}
