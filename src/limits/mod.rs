//! Budgets and rate limits: what a request may spend, and how fast.
//!
//! Admission reserves a request's worst case against every scope that applies to it (its key,
//! the key's user and team, the model) and settlement replaces the reservation by what the
//! request really used, on every path. The counters live behind [`Limiter`] so a shared backend
//! can hold them for a fleet; [`LocalLimiter`] keeps them in this process's memory.

mod fallback;
mod local;
mod redis;
mod redis_conn;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use crate::config::{
    rfc3339, Budget, BudgetConfig, Period, RateLimits, DEFAULT_MAX_PRINCIPALS as DEFAULT_MAX_KEYS,
};
pub use local::{now_ms, Clock, LocalLimiter};
pub use redis::{RedisLimiter, RedisSettings};
pub use redis_conn::{ping as ping_redis, redact as redact_url};

/// Budget and limits of one scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub budget: Option<Budget>,
    pub limits: RateLimits,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.budget.is_none() && self.limits.is_empty()
    }
}

/// The budgets and limits of users and teams, from the config.
#[derive(Debug, Default)]
pub struct Owners {
    pub users: std::collections::HashMap<String, (Arc<str>, Policy)>,
    pub teams: std::collections::HashMap<String, (Arc<str>, Policy)>,
}

impl Owners {
    pub fn build(users: &[crate::config::OwnerConfig], teams: &[crate::config::OwnerConfig]) -> Result<Self, String> {
        let table = |list: &[crate::config::OwnerConfig], what: &str| {
            list.iter()
                .map(|o| {
                    o.limits.validate().map_err(|e| format!("{what} {:?}: {e}", o.id.get_ref()))?;
                    let budget = o.budget.map(BudgetConfig::to_budget).transpose()?;
                    let id = o.id.get_ref().clone();
                    Ok((id.clone(), (Arc::from(id), Policy { budget, limits: o.limits })))
                })
                .collect::<Result<std::collections::HashMap<_, _>, String>>()
        };
        Ok(Owners { users: table(users, "user")?, teams: table(teams, "team")? })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Key,
    User,
    Team,
    Model,
}

impl ScopeKind {
    pub const ALL: [ScopeKind; 4] = [ScopeKind::Key, ScopeKind::User, ScopeKind::Team, ScopeKind::Model];

    pub fn name(self) -> &'static str {
        match self {
            ScopeKind::Key => "key",
            ScopeKind::User => "user",
            ScopeKind::Team => "team",
            ScopeKind::Model => "model",
        }
    }
}

/// One scope a request is counted against, with the policy in force for it.
#[derive(Debug, Clone)]
pub struct Scope {
    pub kind: ScopeKind,
    pub id: Arc<str>,
    pub policy: Policy,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.kind.name(), &*self.id)
    }
}

/// What a request may cost at most, and the tokens it is expected to use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Demand {
    /// The worst-case cost in nano-dollars.
    pub worst_nanos: u64,
    /// Input tokens reserved against input-token limits.
    pub input_tokens: u64,
    /// Output tokens reserved against output-token limits (`max_tokens`).
    pub output_tokens: u64,
}

/// What a request really used, known when it ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct Actual {
    pub cost_nanos: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// When the request is booked (its ledger row's time, Unix milliseconds): its cost counts
    /// in the budget period that contains this instant, as it does in the ledger. A request
    /// booked in a period that has ended adds nothing to the current one. 0 means now.
    pub at_ms: i64,
}

/// Why a request was refused; the proxy turns it into the client's error.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// 429 for a limit that frees up soon, 403 for a budget spent until its reset.
    pub status: u16,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// `anthropic-ratelimit-*` headers describing the limit that refused.
    pub headers: Vec<(String, String)>,
    /// For the metric of refusals by reason: `budget`, `rpm`, `input_tpm`, `output_tpm`,
    /// `concurrency`, `budget_reserved`.
    pub reason: &'static str,
}

/// Gives back what admission took. Every [`Hold`] and [`Reservation`] keeps one, so that it
/// can settle or release on any path, even from `Drop`: it never waits.
pub trait Settle: Send + Sync {
    /// Gives back a slot taken by [`Limiter::hold`] that no reservation took over. `ticket`
    /// is what the limiter gave the hold (a shared limiter's lease; 0 for the local one).
    fn release(&self, ticket: u64, scope: &Scope);

    /// Replaces a reservation by what the request used. Called exactly once per reservation.
    fn settle(&self, ticket: u64, scopes: &[Scope], demand: Demand, actual: Actual);
}

/// The counters behind admission and settlement, in this process ([`LocalLimiter`]); a shared
/// backend admits asynchronously instead (see [`Limits`]).
pub trait Limiter: Settle {
    /// Checks every scope and, when all have room, reserves `demand` on each of them at once.
    fn admit(self: Arc<Self>, scopes: Vec<Scope>, demand: Demand) -> Result<Reservation, Refusal> {
        self.admit_held(scopes, demand, None)
    }

    /// As [`Limiter::admit`], for a request already holding a concurrency slot of one of the
    /// scopes (taken before its body was read): that scope's slot is not checked or taken
    /// again, and the hold becomes part of the reservation.
    fn admit_held(
        self: Arc<Self>,
        scopes: Vec<Scope>,
        demand: Demand,
        held: Option<Hold>,
    ) -> Result<Reservation, Refusal>;

    /// Takes a concurrency slot of `scope` now, before the request's body is read, so that a
    /// scope's concurrency limit also bounds the bodies it has in memory.
    fn hold(self: Arc<Self>, scope: &Scope) -> Result<Hold, Refusal>;

    /// Spend and headroom of one scope, for status reports and gauges.
    fn status(&self, scope: &Scope) -> ScopeStatus;

    /// Sets the spend of a budgeted scope for its current period (from the ledger, at start or
    /// when the budget first appears or changes its period). Reservations in flight are kept.
    /// This is the only way a scope's period changes: a request admitted under the old period
    /// and settled after the seed counts in the seeded period (if its time falls in it).
    fn seed(&self, scope: &Scope, period_start_ms: i64, spent_nanos: u64);

    /// Whether the scope already tracks spend for the period of `budget`.
    fn tracks(&self, scope: &Scope) -> bool;

    /// The ids of the scopes of `kind` this limiter counts for, starting with `prefix` (the
    /// principals of a JWT issuer, which are known only once they call).
    fn ids_with_prefix(&self, kind: ScopeKind, prefix: &str) -> Vec<String>;
}

/// Spend and headroom of a scope.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScopeStatus {
    pub spent_nanos: u64,
    pub reserved_nanos: u64,
    pub limit_nanos: Option<u64>,
    pub period: Option<&'static str>,
    pub period_start_ms: Option<i64>,
    pub resets_at_ms: Option<i64>,
    pub in_flight: u32,
    pub requests_remaining: Option<u64>,
    pub input_tokens_remaining: Option<i64>,
    pub output_tokens_remaining: Option<i64>,
}

/// A concurrency slot of one scope taken before admission. Dropped (the request was refused
/// or failed before admission), it gives the slot back.
pub struct Hold {
    limiter: Arc<dyn Settle>,
    ticket: u64,
    scope: Scope,
    taken_over: bool,
}

impl Hold {
    pub fn new(limiter: Arc<dyn Settle>, ticket: u64, scope: Scope) -> Self {
        Hold { limiter, ticket, scope, taken_over: false }
    }

    pub fn ticket(&self) -> u64 {
        self.ticket
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Whether `limiter` is the one this slot is given back through.
    fn is_given_back_by(&self, limiter: &dyn Settle) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.limiter), limiter as *const dyn Settle)
    }

    /// The same slot, given back through `limiter` (a limiter that wraps the one that took it).
    fn rebind(mut self, limiter: Arc<dyn Settle>) -> Self {
        self.limiter = limiter;
        self
    }

    /// A reservation now owns the slot (its settlement gives it back).
    pub fn take_over(mut self) {
        self.taken_over = true;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.taken_over {
            self.limiter.release(self.ticket, &self.scope);
        }
    }
}

/// A request's hold on its scopes. Settle it with what the request used; dropped unsettled (a
/// panic, a path that forgot), it releases everything as if the request used nothing, so no
/// slot or reservation is ever stuck.
pub struct Reservation {
    limiter: Arc<dyn Settle>,
    ticket: u64,
    scopes: Vec<Scope>,
    demand: Demand,
    settled: bool,
}

impl Reservation {
    pub fn new(limiter: Arc<dyn Settle>, ticket: u64, scopes: Vec<Scope>, demand: Demand) -> Self {
        Reservation { limiter, ticket, scopes, demand, settled: false }
    }

    pub fn demand(&self) -> Demand {
        self.demand
    }

    /// The same reservation, settled through `limiter` (a limiter that wraps the one that made it).
    fn rebind(mut self, limiter: Arc<dyn Settle>) -> Self {
        self.limiter = limiter;
        self
    }

    pub fn settle(mut self, actual: Actual) {
        self.settled = true;
        self.limiter.settle(self.ticket, &self.scopes, self.demand, actual);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            tracing::warn!(worst_nanos = self.demand.worst_nanos, "a reservation was dropped unsettled; released");
            self.limiter.settle(self.ticket, &self.scopes, self.demand, Actual::default());
        }
    }
}

/// The limiter a gateway runs: its own counters, or the fleet's in Redis. Admission is
/// asynchronous (a shared limiter answers over the network); settling never waits.
#[derive(Clone)]
pub enum Limits {
    Local(Arc<LocalLimiter>),
    Redis { limiter: Arc<RedisLimiter>, rt: tokio::runtime::Handle },
}

impl Limits {
    pub async fn admit_held(
        &self,
        scopes: Vec<Scope>,
        demand: Demand,
        held: Option<Hold>,
    ) -> Result<Reservation, Refusal> {
        match self {
            Limits::Local(l) => l.clone().admit_held(scopes, demand, held),
            Limits::Redis { limiter, .. } => limiter.admit_held(scopes, demand, held).await,
        }
    }

    pub async fn hold(&self, scope: &Scope) -> Result<Hold, Refusal> {
        match self {
            Limits::Local(l) => l.clone().hold(scope),
            Limits::Redis { limiter, .. } => limiter.hold(scope).await,
        }
    }

    pub async fn status(&self, scope: &Scope) -> ScopeStatus {
        match self {
            Limits::Local(l) => l.status(scope),
            Limits::Redis { limiter, .. } => limiter.status(scope).await,
        }
    }

    /// As [`Limits::status`], waiting: for the admin listener, whose threads serve no proxy
    /// traffic (a shared limiter answers in one round trip).
    pub fn status_blocking(&self, scope: &Scope) -> ScopeStatus {
        match self {
            Limits::Local(l) => l.status(scope),
            Limits::Redis { limiter, rt } => {
                let (limiter, scope) = (limiter.clone(), scope.clone());
                crate::blocking::block_on(rt, async move { limiter.status(&scope).await })
            }
        }
    }

    /// Blocking for a shared limiter: for start-up and reloads, never on a worker. A shared
    /// limiter that cannot take the seed says so: Redis must not be marked seeded then.
    pub fn seed(&self, scope: &Scope, period_start_ms: i64, spent_nanos: u64) -> Result<(), String> {
        match self {
            Limits::Local(l) => {
                l.seed(scope, period_start_ms, spent_nanos);
                Ok(())
            }
            Limits::Redis { limiter, rt } => limiter.seed(scope, period_start_ms, spent_nanos, rt),
        }
    }

    /// Whether the scope's spend for its current period is known already (seeded, for a shared
    /// limiter, by this gateway).
    pub fn tracks(&self, scope: &Scope) -> bool {
        match self {
            Limits::Local(l) => l.tracks(scope),
            Limits::Redis { limiter, .. } => limiter.tracks(scope),
        }
    }

    pub fn ids_with_prefix(&self, kind: ScopeKind, prefix: &str) -> Vec<String> {
        match self {
            Limits::Local(l) => l.ids_with_prefix(kind, prefix),
            Limits::Redis { limiter, .. } => limiter.ids_with_prefix(kind, prefix),
        }
    }

    pub fn time_zone(&self) -> chrono_tz::Tz {
        match self {
            Limits::Local(l) => l.time_zone(),
            Limits::Redis { limiter, .. } => limiter.time_zone(),
        }
    }

    pub fn set_time_zone(&self, tz: chrono_tz::Tz) {
        match self {
            Limits::Local(l) => l.set_time_zone(tz),
            Limits::Redis { limiter, .. } => limiter.set_time_zone(tz),
        }
    }

    pub fn set_max_keys(&self, max: usize) {
        if let Limits::Local(l) = self {
            l.set_max_keys(max);
        }
    }

    /// Hands a shared limiter's waiting settlements and credits to Redis, waiting at most
    /// `within` (a stopping gateway's last word). Nothing to do for the local limiter.
    pub fn flush(&self, within: Duration) {
        if let Limits::Redis { limiter, .. } = self {
            limiter.flush(within);
        }
    }

    /// Whether a shared limiter that does not answer has this gateway counting on its share.
    pub fn counting_locally(&self) -> bool {
        match self {
            Limits::Local(_) => false,
            Limits::Redis { limiter, .. } => limiter.counting_locally(),
        }
    }

    /// Key scopes counted by this gateway, and how many it forgot.
    pub fn key_scopes(&self) -> (usize, u64) {
        match self {
            Limits::Local(l) => l.key_scopes(),
            Limits::Redis { limiter, .. } => (limiter.key_scopes(), 0),
        }
    }
}
