//! Durable state: keys created at run time and the usage ledger.
//!
//! The request path only ever queues a ledger row in memory; a background writer commits the
//! queue in batches. [`Store`] is the seam a shared backend (PostgreSQL for a fleet) implements;
//! [`SqliteStore`] is the embedded default, a single file with nothing to install.

mod import;
mod pg_tls;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use import::{import_sqlite, ImportReport};
pub use postgres::{PgTarget, PostgresStore};
pub use sqlite::SqliteStore;

use crate::config::KeyHash;
use crate::limits::{BudgetConfig, RateLimits, ScopeKind};
use crate::metering::UsageRecord;

/// One ledger row: what a request cost and who pays for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub request_id: String,
    pub time_ms: i64,
    pub key_id: Option<String>,
    pub user: Option<String>,
    pub team: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub provider_model: Option<String>,
    pub status: u16,
    pub outcome: String,
    pub stream: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub cost_nanos: u64,
    pub priced: bool,
    /// The estimate rule, when the usage is not the provider's own count.
    pub estimated: Option<&'static str>,
}

impl LedgerRow {
    pub fn from_record(r: &UsageRecord) -> Self {
        let time_ms = r.time.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
        LedgerRow {
            request_id: r.request_id.clone(),
            time_ms,
            key_id: r.key_id.clone(),
            user: r.user.clone(),
            team: r.team.clone(),
            model: r.model.clone(),
            provider: r.provider.clone(),
            provider_model: r.provider_model.clone(),
            status: r.status,
            outcome: r.outcome.as_str().to_string(),
            stream: r.stream,
            input_tokens: r.usage.input_tokens,
            output_tokens: r.usage.output_tokens,
            cache_read_tokens: r.usage.cache_read_input_tokens,
            cache_write_5m_tokens: r.usage.cache_creation_5m_input_tokens,
            cache_write_1h_tokens: r.usage.cache_creation_1h_input_tokens,
            cost_nanos: r.cost_nanos,
            priced: r.priced,
            estimated: r.usage_estimated.map(|e| e.as_str()),
        }
    }
}

/// A key created through the admin API, as stored. The secret itself is never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    pub id: String,
    pub hash: KeyHash,
    pub user: Option<String>,
    pub team: Option<String>,
    pub models: Option<Vec<String>>,
    pub budget: Option<BudgetConfig>,
    pub limits: RateLimits,
    pub expires_ms: Option<i64>,
    pub disabled: bool,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// What a usage report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Key,
    User,
    Team,
    Model,
    /// The calendar day in the configured time zone.
    Day,
}

impl Group {
    /// The scope a grouping column holds; `None` for the day, which is computed.
    pub fn scope(self) -> Option<ScopeKind> {
        match self {
            Group::Key => Some(ScopeKind::Key),
            Group::User => Some(ScopeKind::User),
            Group::Team => Some(ScopeKind::Team),
            Group::Model => Some(ScopeKind::Model),
            Group::Day => None,
        }
    }

    pub fn parse(s: &str) -> Option<Group> {
        Some(match s {
            "key" => Group::Key,
            "user" => Group::User,
            "team" => Group::Team,
            "model" => Group::Model,
            "day" => Group::Day,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Group::Key => "key",
            Group::User => "user",
            Group::Team => "team",
            Group::Model => "model",
            Group::Day => "day",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub group_by: Vec<Group>,
    /// `[from_ms, to_ms)`; open-ended when absent.
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Only rows whose key, user, team or model equals this value.
    pub filters: Vec<(ScopeKind, String)>,
}

/// One line of a usage report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageLine {
    /// The values of the grouping columns, by name (`"key"`, `"day"`, ...); null for none.
    pub group: BTreeMap<&'static str, Option<String>>,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_5m_tokens: u64,
    pub cache_write_1h_tokens: u64,
    pub cost_nanos: u64,
    /// Requests whose usage is an estimate (see `UsageRecord::usage_estimated`).
    pub estimated: u64,
}

/// A usage report's lines, keyed by their groups' values in `scopes` order (then the day):
/// named, and ordered most expensive first. Shared by every store, so reports read the same.
fn report(
    scopes: &[Group],
    by_day: bool,
    lines: std::collections::HashMap<Vec<Option<String>>, UsageLine>,
) -> Vec<UsageLine> {
    let mut names: Vec<&'static str> = scopes.iter().map(|g| g.name()).collect();
    if by_day {
        names.push("day");
    }
    let mut out: Vec<UsageLine> = lines
        .into_iter()
        .map(|(key, mut line)| {
            line.group = names.iter().copied().zip(key).collect::<BTreeMap<_, _>>();
            line
        })
        .collect();
    out.sort_by(|a, b| b.cost_nanos.cmp(&a.cost_nanos).then_with(|| a.group.cmp(&b.group)));
    out
}

/// `YYYY-MM-DD` of an instant in `tz`.
fn local_day(ms: i64, tz: chrono_tz::Tz) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(&tz)
        .format("%Y-%m-%d")
        .to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a key with id {0:?} already exists")]
    Duplicate(String),
    #[error("store: {0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A spend alert that fired: once per scope, period and alert, whichever gateway saw it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertMark {
    /// `key`, `user` or `team`.
    pub scope: String,
    pub id: String,
    /// The budget period the alert belongs to (its start, Unix milliseconds).
    pub period_start_ms: i64,
    /// `80%`, `100%`, `projected`...
    pub alert: String,
    /// The alert's JSON, kept so that a gateway restarted before delivering it sends it still.
    pub payload: String,
}

pub trait Store: Send + Sync {
    /// Queues a row; returns at once. The writer commits it within the flush interval.
    fn record(&self, row: LedgerRow);
    /// Rows queued and not yet committed.
    fn pending(&self) -> usize;
    /// Commits everything queued so far before returning.
    fn flush(&self) -> StoreResult<()>;
    /// Total cost charged to a key, user or team since `since_ms`.
    fn spend_since(&self, kind: ScopeKind, id: &str, since_ms: i64) -> StoreResult<u64>;
    /// Spend since `since_ms` of every key whose id starts with `prefix` (the principals of a
    /// JWT issuer, `NAME:`), by key id.
    fn spend_by_key_prefix(&self, prefix: &str, since_ms: i64) -> StoreResult<Vec<(String, u64)>>;
    /// Usage summed by the requested groups, most expensive first; `tz` cuts days.
    fn usage(&self, query: &UsageQuery, tz: chrono_tz::Tz) -> StoreResult<Vec<UsageLine>>;

    fn keys(&self) -> StoreResult<Vec<StoredKey>>;
    fn insert_key(&self, key: &StoredKey) -> StoreResult<()>;
    /// Replaces the key with the same id; false when there is none.
    fn update_key(&self, key: &StoredKey) -> StoreResult<bool>;
    fn delete_key(&self, id: &str) -> StoreResult<bool>;

    /// What changes when a key is created, changed or deleted by anyone (a gateway of the same
    /// fleet included): polled to apply those changes here. `None` for a store of this gateway
    /// alone, which learns of its changes as it makes them.
    fn keys_version(&self) -> StoreResult<Option<String>> {
        Ok(None)
    }

    /// Ledger rows held in a local spool, waiting for a shared database.
    fn spooled(&self) -> usize {
        0
    }

    /// Why the store cannot keep up now (a database out of reach), for `/readyz`.
    fn problem(&self) -> Option<String> {
        None
    }

    /// Records `mark` as fired unless it already is: true for the one caller that claimed it
    /// (who then delivers it), false for everyone after.
    fn claim_alert(&self, mark: &AlertMark) -> StoreResult<bool>;
    /// Notes that a claimed alert was delivered.
    fn alert_delivered(&self, mark: &AlertMark) -> StoreResult<()>;
    /// Takes over alerts claimed but not delivered whose claim was last renewed before
    /// `stale_ms` (their gateway stopped, or lost its webhooks for that long) and were claimed
    /// after `since_ms`: their claim is renewed for the caller, who delivers them now.
    fn reclaim_alerts(&self, stale_ms: i64, since_ms: i64) -> StoreResult<Vec<AlertMark>>;
    /// Renews the claim on an alert whose delivery is still being tried, as of `at_ms`; 0
    /// releases it (a gateway stopping with the alert undelivered), for the next to take over.
    fn renew_alert(&self, mark: &AlertMark, at_ms: i64) -> StoreResult<()>;

    /// Saves a new sign-in.
    fn insert_session(&self, session: &SsoSession) -> StoreResult<()>;
    /// Writes what a token refresh learnt (user, groups, the identity provider's refresh token,
    /// last seen) to a sign-in that is not revoked; false when it is (or is gone): a revocation
    /// made while the refresh ran is never undone.
    fn renew_session(&self, session: &SsoSession) -> StoreResult<bool>;
    /// The sign-in whose refresh credential hashes to `refresh_hash`.
    fn session_by_refresh(&self, refresh_hash: &str) -> StoreResult<Option<SsoSession>>;
    /// Sign-ins not expired at `now_ms`, revoked ones included, most recently seen first.
    fn sessions(&self, now_ms: i64) -> StoreResult<Vec<SsoSession>>;
    /// Revokes one sign-in as of `at_ms`, unless it already is; false when it was.
    fn revoke_session(&self, id: &str, at_ms: i64) -> StoreResult<bool>;
    /// Revokes every live sign-in of `user` as of `at_ms`; returns their ids.
    fn revoke_sessions(&self, user: &str, at_ms: i64) -> StoreResult<Vec<String>>;
    /// Ids of every revoked sign-in not yet expired at `now_ms` (a small set: each gateway
    /// reads it whole, so no revocation is missed whatever the clocks say).
    fn revoked_sessions(&self, now_ms: i64) -> StoreResult<Vec<String>>;
    /// Disables (or enables again) a person in the gateway, whatever the identity provider says.
    fn set_person_disabled(&self, user: &str, disabled: bool, at_ms: i64) -> StoreResult<()>;
    fn disabled_people(&self) -> StoreResult<Vec<String>>;

    /// Commits the queue and stops the writer; rows recorded afterwards are written at once.
    fn close(&self);
}

/// A person's sign-in through the identity provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsoSession {
    pub id: String,
    /// The person's subject at the identity provider.
    pub subject: String,
    /// Their name in records (the configured user claim).
    pub user: String,
    /// Their groups as of the last check with the identity provider.
    pub groups: Vec<String>,
    /// SHA-256 (hex) of the refresh credential the person's machine holds; never the credential.
    pub refresh_hash: String,
    /// The identity provider's refresh token, sealed (encrypted and authenticated) with a key
    /// derived from the gateway's signing secret.
    pub idp_refresh: Option<Vec<u8>>,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub last_seen_ms: i64,
    pub revoked_ms: Option<i64>,
}
