//! What a fleet gateway counts while Redis does not answer (`on_unavailable = "local"`): each
//! gateway admits on its own share of what the fleet had left. A budgeted scope gets
//! `(limit - used) / gateways`, where `used` is the scope's spend and reservations as this
//! gateway last saw them in Redis plus what this gateway has spent or reserved on its own since
//! (not yet acknowledged by Redis). Rate limits and concurrency are divided by the number of
//! gateways (rounded up). What it spends is credited to Redis, in batches, once Redis answers,
//! and the gateway returns to Redis only when its credits are in.
//!
//! The bound (docs/fleet.md): spend that *other* gateways booked after this one last saw a scope
//! is not in its view, nor are other gateways' requests admitted locally and still in flight
//! when Redis returns, nor, when only some gateways lose Redis, what the others keep admitting.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use super::local::now_ms;
use super::redis::RedisLimiter;
use super::{
    Actual, Budget, Demand, Hold, Limiter, LocalLimiter, RateLimits, Refusal, Reservation, Scope, ScopeKind, Settle,
};

/// At most this many budgeted scopes are remembered as seen in Redis; past it the memory starts
/// afresh (a scope not remembered gets no share: it is refused while Redis is away).
const MAX_SEEN: usize = 100_000;

type ScopeId = (ScopeKind, Arc<str>);

/// A budgeted scope as Redis last showed it to this gateway.
#[derive(Debug, Clone, Copy)]
struct Seen {
    period: &'static str,
    start: i64,
    /// Spend and reservations, nano-dollars.
    used: u64,
}

/// Spend to book into Redis: per data generation (epoch), scope and budget period.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CreditKey {
    pub epoch: Arc<str>,
    pub kind: ScopeKind,
    pub id: Arc<str>,
    pub period: &'static str,
    pub start: i64,
    pub end: i64,
}

/// What this gateway knows of the fleet's budgets, and what it owes Redis.
#[derive(Default)]
pub(super) struct Known {
    inner: Mutex<KnownInner>,
}

#[derive(Default)]
struct KnownInner {
    epoch: Option<Arc<str>>,
    /// Gateways beating lately, this one included (at least 1).
    fleet: u64,
    seen: HashMap<ScopeId, Seen>,
    /// Per budgeted scope: reserved by local requests in flight plus spent locally and not
    /// acknowledged by Redis yet.
    pending: HashMap<ScopeId, u64>,
    /// Spent locally, to be credited to Redis.
    owed: HashMap<CreditKey, u64>,
    /// Sum of `owed` and of credits sent and not acknowledged: 0 when Redis has it all.
    unacknowledged: u64,
    /// Nano-dollars ever owed, and ever acknowledged: a gateway returns to Redis once what it
    /// owed when Redis came back is acknowledged.
    owed_total: u64,
    acknowledged_total: u64,
}

impl Known {
    fn lock(&self) -> std::sync::MutexGuard<'_, KnownInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_fleet(&self, gateways: u64) {
        self.lock().fleet = gateways.max(1);
    }

    pub(super) fn fleet(&self) -> u64 {
        self.lock().fleet.max(1)
    }

    pub(super) fn epoch(&self) -> Option<Arc<str>> {
        self.lock().epoch.clone()
    }

    /// What an admission's answer said: Redis's epoch and, per budgeted scope, its spend and
    /// reservations (this admission's included) for the period `(kind, start)`.
    pub(super) fn saw(&self, epoch: &str, scopes: &[(&Scope, &'static str, i64, u64)]) {
        let mut k = self.lock();
        if k.epoch.as_deref() != Some(epoch) {
            k.epoch = Some(Arc::from(epoch));
        }
        for &(s, period, start, used) in scopes {
            let id = (s.kind, s.id.clone());
            let seen = Seen { period, start, used };
            match k.seen.get_mut(&id) {
                Some(v) => *v = seen,
                None => {
                    if k.seen.len() >= MAX_SEEN {
                        k.seen.clear();
                    }
                    k.seen.insert(id, seen);
                }
            }
        }
    }

    /// An answer this gateway could not read for a scope: it is not known any more.
    pub(super) fn forget(&self, scope: &Scope) {
        self.lock().seen.remove(&(scope.kind, scope.id.clone()));
    }

    /// The budget left of `scope` for the period starting at `start`, as this gateway knows
    /// it: none when it never saw the scope in Redis (or saw it under another kind of period).
    fn remainder(&self, scope: &Scope, budget: Budget, start: i64) -> Option<u64> {
        let k = self.lock();
        let id = (scope.kind, scope.id.clone());
        let seen = k.seen.get(&id)?;
        if seen.period != budget.period.as_str() || seen.start > start {
            return None;
        }
        // A period that began since: nothing booked in it yet, as far as Redis showed.
        let used = if seen.start == start { seen.used } else { 0 };
        let mine = k.pending.get(&id).copied().unwrap_or(0);
        Some(budget.limit_nanos.saturating_sub(used.saturating_add(mine)))
    }

    /// A local admission reserved `worst` on the budgeted `scopes`.
    fn reserve(&self, scopes: &[Scope], worst: u64) {
        let mut k = self.lock();
        for s in scopes.iter().filter(|s| s.policy.budget.is_some()) {
            *k.pending.entry((s.kind, s.id.clone())).or_default() += worst;
        }
    }

    /// A local admission settled: its reservation gives way to its cost, owed to Redis in the
    /// data generation `epoch`.
    fn settle(&self, epoch: &Arc<str>, scopes: &[Scope], worst: u64, actual: Actual, tz: chrono_tz::Tz) {
        let at = if actual.at_ms > 0 { actual.at_ms } else { now_ms() };
        let mut k = self.lock();
        for s in scopes {
            let Some(b) = s.policy.budget else { continue };
            let id = (s.kind, s.id.clone());
            let p = k.pending.entry(id.clone()).or_default();
            *p = p.saturating_sub(worst).saturating_add(actual.cost_nanos);
            if actual.cost_nanos == 0 {
                if *p == 0 {
                    k.pending.remove(&id);
                }
                continue;
            }
            let (start, end) = b.period.bounds(tz, at);
            let key = CreditKey {
                epoch: epoch.clone(),
                kind: s.kind,
                id: s.id.clone(),
                period: b.period.as_str(),
                start,
                end,
            };
            *k.owed.entry(key).or_default() += actual.cost_nanos;
            k.unacknowledged += actual.cost_nanos;
            k.owed_total += actual.cost_nanos;
        }
    }

    /// Credits Redis refused with an error: owed again, sent with the next batch.
    pub(super) fn owe_again(&self, credits: &[(CreditKey, u64)]) {
        let mut k = self.lock();
        for (c, cost) in credits {
            *k.owed.entry(c.clone()).or_default() += *cost;
        }
    }

    /// Takes what is owed, to send.
    pub(super) fn take_owed(&self) -> Vec<(CreditKey, u64)> {
        self.lock().owed.drain().collect()
    }

    /// Redis took `credits`, or refused them because its data is another generation now (the
    /// ledger's seed holds that spend): either way they are owed no more.
    pub(super) fn acknowledged(&self, credits: &[(CreditKey, u64)]) {
        let mut k = self.lock();
        for (c, cost) in credits {
            let id = (c.kind, c.id.clone());
            if let Some(p) = k.pending.get_mut(&id) {
                *p = p.saturating_sub(*cost);
                if *p == 0 {
                    k.pending.remove(&id);
                }
            }
            // Redis holds it now (or the ledger's seed of a newer generation does): the view
            // includes it until the next answer says more. A credit for a later period than the
            // view's starts that period's view.
            if let Some(seen) = k.seen.get_mut(&id).filter(|s| s.period == c.period && s.start <= c.start) {
                if seen.start < c.start {
                    *seen = Seen { period: c.period, start: c.start, used: 0 };
                }
                seen.used = seen.used.saturating_add(*cost);
            }
            k.unacknowledged = k.unacknowledged.saturating_sub(*cost);
            k.acknowledged_total += *cost;
        }
    }

    /// Whether every credit is in Redis.
    #[cfg(test)]
    fn settled_up(&self) -> bool {
        self.lock().unacknowledged == 0
    }

    /// All this gateway has owed so far (a mark to wait for).
    pub(super) fn owed_so_far(&self) -> u64 {
        self.lock().owed_total
    }

    /// Whether Redis has acknowledged at least `mark` of what was owed.
    pub(super) fn acknowledged_up_to(&self, mark: u64) -> bool {
        self.lock().acknowledged_total >= mark
    }
}

/// The counters of one outage: made when Redis stops answering, dropped when the gateway returns
/// to Redis (requests admitted meanwhile keep theirs until they settle).
pub(super) struct Fallback {
    local: Arc<LocalLimiter>,
    /// Gateways sharing the fleet's limits when Redis went away (this one included).
    fleet: u64,
    /// Redis's data generation then: credits go only into that data.
    epoch: Arc<str>,
    shared: Weak<RedisLimiter>,
    /// The scopes (and budget periods) given their share in this outage.
    seeded: Mutex<HashSet<(ScopeId, i64)>>,
}

impl Fallback {
    pub(super) fn new(shared: &Arc<RedisLimiter>, fleet: u64, epoch: Arc<str>) -> Self {
        Fallback {
            local: Arc::new(LocalLimiter::new(shared.time_zone())),
            fleet: fleet.max(1),
            epoch,
            shared: Arc::downgrade(shared),
            seeded: Mutex::new(HashSet::new()),
        }
    }

    pub(super) fn fleet(&self) -> u64 {
        self.fleet
    }

    /// Admits on this gateway's share. A slot held in Redis, or in an earlier outage, is given
    /// back there and taken here afresh.
    pub(super) fn admit(
        self: &Arc<Self>,
        shared: &RedisLimiter,
        scopes: Vec<Scope>,
        demand: Demand,
        held: Option<Hold>,
    ) -> Result<Reservation, Refusal> {
        let held = held.filter(|h| h.ticket() == 0 && h.is_given_back_by(&**self));
        let mut mine = Vec::with_capacity(scopes.len());
        for mut s in scopes {
            s.policy.limits = share_limits(s.policy.limits, self.fleet);
            self.seed(shared, &s)?;
            mine.push(s);
        }
        let reservation = self.local.clone().admit_held(mine, demand, held).map_err(|r| self.refusal(r))?;
        shared.known().reserve(&reservation.scopes, demand.worst_nanos);
        Ok(reservation.rebind(self.clone()))
    }

    pub(super) fn hold(self: &Arc<Self>, scope: &Scope) -> Result<Hold, Refusal> {
        let mut s = scope.clone();
        s.policy.limits = share_limits(s.policy.limits, self.fleet);
        let hold = self.local.clone().hold(&s)?;
        Ok(hold.rebind(self.clone()))
    }

    /// Gives a budgeted scope its share, once per outage and budget period.
    fn seed(&self, shared: &RedisLimiter, scope: &Scope) -> Result<(), Refusal> {
        let Some(b) = scope.policy.budget else { return Ok(()) };
        let (start, _) = b.period.bounds(self.local.time_zone(), now_ms());
        let id = ((scope.kind, scope.id.clone()), start);
        let mut seeded = self.seeded.lock().unwrap_or_else(|p| p.into_inner());
        if seeded.contains(&id) {
            return Ok(());
        }
        let known = shared.known();
        // The view must be of the data the credits will go to: else what is spent here would
        // be refused by Redis and counted nowhere.
        let same_data = !self.epoch.is_empty() && known.epoch().as_deref() == Some(&*self.epoch);
        let left = known.remainder(scope, b, start).filter(|_| same_data).ok_or_else(|| {
            super::redis::unavailable(&format!("{scope}: no share while Redis is away (not seen in Redis this period)"))
        })?;
        let share = left / self.fleet;
        self.local.seed(scope, start, b.limit_nanos - share);
        // A period that ended between the two clock readings: the seed was for no period.
        if self.local.tracks(scope) {
            seeded.insert(id);
        }
        Ok(())
    }

    /// A budget refusal here means this gateway's share is used, not the fleet's budget: the
    /// client is told to retry (the budget may have room on other gateways, or once Redis is
    /// back), not that the budget is spent.
    fn refusal(&self, r: Refusal) -> Refusal {
        if !matches!(r.reason, "budget" | "budget_reserved") {
            return r;
        }
        Refusal {
            status: 503,
            message: format!(
                "the shared limiter (Redis) is unavailable and this gateway's share of the budget is used ({}); \
                 retry shortly",
                r.message
            ),
            retry_after: Some(std::time::Duration::from_secs(5)),
            headers: Vec::new(),
            reason: "budget_share",
        }
    }
}

impl Settle for Fallback {
    fn release(&self, ticket: u64, scope: &Scope) {
        self.local.release(ticket, scope);
    }

    fn settle(&self, ticket: u64, scopes: &[Scope], demand: Demand, actual: Actual) {
        self.local.settle(ticket, scopes, demand, actual);
        if let Some(shared) = self.shared.upgrade() {
            shared.known().settle(&self.epoch, scopes, demand.worst_nanos, actual, self.local.time_zone());
        }
    }
}

/// A gateway's share of a scope's rate limits: each divided by the fleet, rounded up (never 0).
fn share_limits(l: RateLimits, fleet: u64) -> RateLimits {
    if fleet <= 1 {
        return l;
    }
    let part = |v: u64| v.div_ceil(fleet).max(1);
    RateLimits {
        rpm: l.rpm.map(|v| part(u64::from(v)) as u32),
        input_tpm: l.input_tpm.map(part),
        output_tpm: l.output_tpm.map(part),
        concurrency: l.concurrency.map(|v| part(u64::from(v)) as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Period, Policy};

    #[test]
    fn limits_are_divided_rounding_up_and_never_to_zero() {
        let l = RateLimits { rpm: Some(30), input_tpm: Some(1000), output_tpm: Some(1), concurrency: Some(3) };
        let s = share_limits(l, 4);
        assert_eq!(s, RateLimits { rpm: Some(8), input_tpm: Some(250), output_tpm: Some(1), concurrency: Some(1) });
        assert_eq!(share_limits(l, 1), l);
        assert_eq!(share_limits(RateLimits::default(), 3), RateLimits::default());
    }

    fn scope(limit: u64) -> (Scope, Budget) {
        let budget = Budget { limit_nanos: limit, period: Period::Daily };
        let policy = Policy { budget: Some(budget), limits: RateLimits::default() };
        (Scope { kind: ScopeKind::Key, id: Arc::from("k"), policy }, budget)
    }

    /// What this gateway spends on its own counts against its next share until Redis has it,
    /// and then through the view: never a fresh share for spend Redis does not show yet.
    #[test]
    fn own_spend_counts_until_redis_shows_it() {
        let (s, b) = scope(1000);
        let tz = chrono_tz::UTC;
        let (start, _) = b.period.bounds(tz, now_ms());
        let known = Known::default();
        assert_eq!(known.remainder(&s, b, start), None, "never seen");
        known.saw("e1", &[(&s, "daily", start, 300)]);
        assert_eq!(known.remainder(&s, b, start), Some(700));
        known.reserve(std::slice::from_ref(&s), 100);
        assert_eq!(known.remainder(&s, b, start), Some(600), "a local reservation in flight");
        let epoch: Arc<str> = Arc::from("e1");
        known.settle(&epoch, std::slice::from_ref(&s), 100, Actual { cost_nanos: 40, ..Default::default() }, tz);
        assert_eq!(known.remainder(&s, b, start), Some(660), "settled: its cost, owed to Redis");
        assert!(!known.settled_up());
        let owed = known.take_owed();
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].1, 40);
        assert_eq!(known.remainder(&s, b, start), Some(660), "sent, not acknowledged");
        known.acknowledged(&owed);
        assert!(known.settled_up());
        assert_eq!(known.remainder(&s, b, start), Some(660), "in Redis: in the view now");
        // A credit Redis refused with an error is owed again, not lost.
        known.reserve(std::slice::from_ref(&s), 100);
        known.settle(&epoch, std::slice::from_ref(&s), 100, Actual { cost_nanos: 25, ..Default::default() }, tz);
        let owed = known.take_owed();
        known.owe_again(&owed);
        assert_eq!(known.take_owed(), owed);
        // A credit for the next period starts that period's view.
        let next = CreditKey { start: start + 86_400_000, end: start + 2 * 86_400_000, ..owed[0].0.clone() };
        known.acknowledged(&[(next, 25)]);
        assert_eq!(known.remainder(&s, b, start + 86_400_000), Some(975), "the new period's view: 25 spent");
        assert_eq!(known.remainder(&s, b, start), None, "the old period is not known any more");
        // A later period starts from nothing; another kind of period is not known.
        assert_eq!(known.remainder(&s, b, start + 2 * 86_400_000), Some(1000));
        let weekly = Budget { limit_nanos: 1000, period: Period::Weekly };
        assert_eq!(known.remainder(&s, weekly, start), None);
    }
}
