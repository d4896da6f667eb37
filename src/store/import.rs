//! Moving an embedded node into a fleet: the keys and ledger of a SQLite store, written into
//! the shared PostgreSQL database (`tollgate migrate --from-sqlite FILE`).
//!
//! Safe to run again: a ledger row already in the database (same request id) is kept as it is,
//! and a key whose id exists there is left alone (and named when it differs). Run it with the
//! embedded node stopped, or once more after it stopped, so that its last rows are moved too.
//! Gateways already running count moved spend for the budgets they seed afterwards (new keys,
//! new periods): restart them after a move so that every budget is seeded from the whole ledger.

use std::path::Path;

use super::postgres::{insert_key_if_absent, insert_rows, key_updated_ms, migrate, once, PgTarget};
use super::sqlite::SqliteExport;
use super::{StoreError, StoreResult};

/// Ledger rows read and written per transaction.
const PAGE: usize = 5_000;

/// What a move did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub keys_added: usize,
    /// Ids already in the database as they are here: nothing to do.
    pub keys_present: Vec<String>,
    /// Ids in the database that were changed here, or there, since (last change times differ):
    /// the database's key is kept; an operator decides (a key disabled on the old node stays
    /// enabled in the fleet until changed there).
    pub keys_differing: Vec<String>,
    /// The SQLite ledger's rows and their total cost (nano-dollars).
    pub rows: u64,
    pub cost_nanos: u64,
    /// Rows written now; the rest were in the database already.
    pub rows_added: u64,
}

/// Copies the store at `sqlite` into the database `target`, bringing its schema up to date
/// first. `progress` is told the rows copied so far after every page.
pub fn import_sqlite(sqlite: &Path, target: &PgTarget, mut progress: impl FnMut(u64)) -> StoreResult<ImportReport> {
    let source = SqliteExport::open(sqlite)?;
    let keys = source.keys()?;
    let (rows, cost_nanos) = source.totals()?;
    once(target, |client| async move {
        migrate(&client).await?;
        let mut report = ImportReport { rows, cost_nanos, ..Default::default() };
        // The ledger first, the keys last: a gateway that sees a moved key (within key_poll)
        // seeds its budget from a ledger that already holds the key's history.
        let (mut after, mut copied) = (0, 0);
        loop {
            let (page, last) = source.ledger_page(after, PAGE)?;
            if page.is_empty() {
                break;
            }
            report.rows_added += insert_rows(&client, &page).await?;
            copied += page.len() as u64;
            after = last;
            progress(copied);
        }
        if copied != rows {
            return Err(StoreError::Other(format!(
                "{} changed while it was read ({rows} rows counted, {copied} copied): stop the gateway using it and \
                 run this again (rows copied are kept once)",
                sqlite.display()
            )));
        }
        for key in &keys {
            if insert_key_if_absent(&client, key).await? {
                report.keys_added += 1;
            } else if key_updated_ms(&client, &key.id).await? != Some(key.updated_ms) {
                report.keys_differing.push(key.id.clone());
            } else {
                report.keys_present.push(key.id.clone());
            }
        }
        Ok(report)
    })
}
