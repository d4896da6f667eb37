//! The limiter of a single gateway: every counter in this process's memory, behind one mutex.
//!
//! One lock for all scopes makes admission atomic across them (a request is either reserved on
//! its key, user, team and model, or on none) and costs well under a microsecond, far below
//! anything else a request does. Budgets are exact under any concurrency: a request is admitted
//! only if the spend so far, every reservation still in flight and its own worst case together
//! fit the budget.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono_tz::Tz;
use std::hash::RandomState;

use hashbrown::HashMap;

use super::{
    rfc3339, Actual, Budget, Demand, Hold, Limiter, Period, RateLimits, Refusal, Reservation, Scope, ScopeKind,
    ScopeStatus, Settle,
};
use crate::metering::usd;

/// A token bucket holding up to one minute's allowance and refilled continuously, the way the
/// provider's own limits work: a burst of the whole minute is allowed, then a steady rate. Its
/// level may go below zero when a request used more than it reserved.
#[derive(Debug, Default)]
struct Bucket {
    level: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, per_minute: u64, now: Instant) -> f64 {
        let cap = per_minute as f64;
        self.level = match self.at {
            None => cap,
            Some(at) => (self.level + now.saturating_duration_since(at).as_secs_f64() * cap / 60.0).min(cap),
        };
        self.at = Some(now);
        self.level
    }

    /// How long until the bucket holds `need`, at most a day (a level far below zero, after
    /// requests that used far more than they reserved, must not overflow a `Duration`).
    fn wait_for(&self, need: f64, per_minute: u64) -> Duration {
        let missing = (need - self.level).max(0.0);
        let secs = (missing * 60.0 / per_minute.max(1) as f64).min(86_400.0);
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(86_400))
    }

    /// Gives back what was reserved and not used (or takes what was used beyond it).
    fn adjust(&mut self, reserved: u64, used: u64, per_minute: u64) {
        self.level = (self.level + reserved as f64 - used as f64).min(per_minute as f64);
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// The budget period the spend below belongs to, once the scope has a budget.
    period: Option<Period>,
    period_start: i64,
    period_end: i64,
    spent: u64,
    reserved: u64,
    requests: Bucket,
    input: Bucket,
    output: Bucket,
    in_flight: u32,
    /// When a request last took or asked for this scope (Unix milliseconds).
    last_ms: i64,
}

impl Counters {
    /// Nothing is lost by forgetting this scope: nothing in flight or reserved, no spend in a
    /// period still running, and no token bucket in use, or idle long enough for every one to
    /// have refilled.
    fn forgettable(&self, now_ms: i64) -> bool {
        let buckets = [&self.requests, &self.input, &self.output];
        let used = buckets.iter().any(|b| b.at.is_some());
        // A bucket in debt (a request used more than it reserved) takes longer than a minute
        // to refill: such a scope is kept.
        let in_debt = buckets.iter().any(|b| b.level < 0.0);
        self.in_flight == 0
            && self.reserved == 0
            && (self.spent == 0 || now_ms >= self.period_end)
            && (!used || (!in_debt && now_ms.saturating_sub(self.last_ms) >= IDLE_MS))
    }

    /// Keeps the spend in step with time: once the period ends, the next one starts from
    /// zero (reservations in flight carry over). The period itself is the scope's own, set at
    /// first use or by a seed from the ledger; a policy that names another period (a request
    /// admitted before a reload) does not change it, so a change of period never erases spend.
    fn roll(&mut self, period: Period, tz: Tz, now_ms: i64) {
        let period = *self.period.get_or_insert(period);
        if now_ms < self.period_end && now_ms >= self.period_start {
            return;
        }
        let (start, end) = period.bounds(tz, now_ms);
        self.period_start = start;
        self.period_end = end;
        self.spent = 0;
    }

    /// Adds a cost booked at `at_ms` to the spend, if that instant is in the current period.
    fn charge(&mut self, cost_nanos: u64, at_ms: i64) {
        if (self.period_start..self.period_end).contains(&at_ms) {
            self.spent = self.spent.saturating_add(cost_nanos);
        }
    }
}

/// A scope idle this long has full token buckets again: forgetting it changes nothing.
const IDLE_MS: i64 = 60_000;

struct Inner {
    tz: Tz,
    /// By scope kind, then id. Key ids include JWT principals, whose names come from token
    /// claims: the maps hash with a per-process random key (std's SipHash), so no one can
    /// choose names that collide. hashbrown's `entry_ref` finds or makes a scope with one hash
    /// and no allocation when it exists: admission and settlement look scopes up ten times a
    /// request.
    scopes: [HashMap<String, Counters, RandomState>; 4],
    /// The most key scopes counted at once; past it, idle ones are forgotten, and a new one is
    /// refused while none is idle.
    max_keys: usize,
    /// Key scopes forgotten so far, for the metric.
    forgotten: u64,
    /// When a pass to forget idle key scopes last freed nothing: another waits a second, so a
    /// full table of busy scopes costs a refusal, not a scan, per new caller.
    fruitless_at: Option<i64>,
}

impl Inner {
    /// The counters of a scope, made on first use.
    fn counters(&mut self, kind: ScopeKind, id: &str) -> &mut Counters {
        self.scopes[kind as usize].entry_ref(id).or_default()
    }

    /// As [`Inner::counters`], for a request that is being admitted: a new key scope must fit
    /// under `max_keys`, after idle ones are forgotten if need be.
    fn admit_counters(&mut self, kind: ScopeKind, id: &str, now_ms: i64) -> Result<&mut Counters, Refusal> {
        let known = self.scopes[kind as usize].contains_key(id);
        if !known && kind == ScopeKind::Key && self.scopes[kind as usize].len() >= self.max_keys {
            if self.fruitless_at.is_none_or(|at| now_ms.saturating_sub(at) >= 1000) {
                self.forget_idle_keys(now_ms);
            }
            if self.scopes[kind as usize].len() >= self.max_keys {
                return Err(Refusal {
                    status: 429,
                    message: format!(
                        "the gateway is counting its maximum of {} keys and principals, none idle; retry shortly",
                        self.max_keys
                    ),
                    retry_after: Some(Duration::from_secs(5)),
                    headers: Vec::new(),
                    reason: "principals",
                });
            }
        }
        let c = self.counters(kind, id);
        c.last_ms = now_ms;
        Ok(c)
    }

    /// Forgets idle key scopes, a tenth of the cap at least when there are that many, so the
    /// scan runs once per many new principals rather than once per request.
    fn forget_idle_keys(&mut self, now_ms: i64) {
        let map = &mut self.scopes[ScopeKind::Key as usize];
        let before = map.len();
        let mut room = (self.max_keys / 10).max(1);
        map.retain(|_, c| {
            if room > 0 && c.forgettable(now_ms) {
                room -= 1;
                false
            } else {
                true
            }
        });
        let freed = before - map.len();
        self.forgotten += freed as u64;
        self.fruitless_at = (freed == 0).then_some(now_ms);
    }
}

/// Unix milliseconds now: the system clock, or a test's.
pub type Clock = Box<dyn Fn() -> i64 + Send + Sync>;

pub struct LocalLimiter {
    inner: Mutex<Inner>,
    clock: Clock,
}

impl LocalLimiter {
    pub fn new(tz: Tz) -> Self {
        Self::with_clock(tz, Box::new(now_ms))
    }

    /// A limiter whose budget periods follow `clock` (tests move time across period ends).
    pub fn with_clock(tz: Tz, clock: Clock) -> Self {
        let inner = Inner {
            tz,
            scopes: Default::default(),
            max_keys: crate::config::DEFAULT_MAX_PRINCIPALS,
            forgotten: 0,
            fruitless_at: None,
        };
        LocalLimiter { inner: Mutex::new(inner), clock }
    }

    /// Counts at most `max` key scopes (keys and JWT principals) at once.
    pub fn set_max_keys(&self, max: usize) {
        self.lock().max_keys = max.max(1);
    }

    /// Key scopes counted now, and how many were forgotten since the start.
    pub fn key_scopes(&self) -> (usize, u64) {
        let g = self.lock();
        (g.scopes[ScopeKind::Key as usize].len(), g.forgotten)
    }

    /// Budget periods from now on are cut in `tz`.
    pub fn set_time_zone(&self, tz: Tz) {
        self.lock().tz = tz;
    }

    pub fn time_zone(&self) -> Tz {
        self.lock().tz
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Counters stay consistent at every step, so a panic elsewhere cannot leave them torn.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The spend of a budgeted scope as admission sees it.
pub(super) struct Spend {
    pub spent: u64,
    pub reserved: u64,
    pub period_end: i64,
}

/// Why `demand` does not fit budget `b` (403 when the spend alone leaves no room, 429 while
/// reservations in flight hold it), or `None` when it fits. Shared by every limiter, so a
/// refusal reads the same whichever one counts.
pub(super) fn budget_refusal(scope: &Scope, b: Budget, c: &Spend, demand: Demand) -> Option<Refusal> {
    // The words of a refusal are built only when there is one: this runs on every request.
    let resets = || match b.period {
        Period::None => "it does not reset".to_string(),
        _ => format!("it resets at {}", rfc3339(c.period_end)),
    };
    let budget = || format!("the {} budget of {scope} (${})", b.period.name(), usd(b.limit_nanos));
    if c.spent.saturating_add(demand.worst_nanos) > b.limit_nanos {
        let (budget, resets) = (budget(), resets());
        let left = b.limit_nanos.saturating_sub(c.spent);
        let message = if c.spent >= b.limit_nanos {
            format!("{budget} is spent: ${} used; {resets}", usd(c.spent))
        } else {
            format!(
                "this request may cost up to ${} (prompt size and max_tokens at the model's prices) and only ${} \
                 of {budget} is left; lower max_tokens or wait: {resets}",
                usd(demand.worst_nanos),
                usd(left)
            )
        };
        return Some(Refusal { status: 403, message, retry_after: None, headers: Vec::new(), reason: "budget" });
    }
    if c.spent.saturating_add(c.reserved).saturating_add(demand.worst_nanos) > b.limit_nanos {
        let budget = budget();
        let message = format!(
            "{budget} is held by requests in flight: ${} spent, ${} reserved, this request may cost up to ${}; \
             retry when they finish",
            usd(c.spent),
            usd(c.reserved),
            usd(demand.worst_nanos)
        );
        return Some(Refusal {
            status: 429,
            message,
            retry_after: Some(Duration::from_secs(2)),
            headers: Vec::new(),
            reason: "budget_reserved",
        });
    }
    None
}

/// A refusal by a token bucket at `level`, with the `anthropic-ratelimit-*` headers of that
/// limit.
pub(super) fn bucket_refusal(
    scope: &Scope,
    what: &'static str,
    reason: &'static str,
    level: f64,
    per_minute: u64,
    need: f64,
    now_ms: i64,
) -> Refusal {
    let bucket = Bucket { level, at: None };
    let wait = bucket.wait_for(need, per_minute).max(Duration::from_millis(1));
    let full = bucket.wait_for(per_minute as f64, per_minute);
    let remaining = bucket.level.max(0.0).floor() as u64;
    Refusal {
        status: 429,
        message: format!("rate limit of {scope}: {per_minute} {what} per minute; retry in {:.1} s", wait.as_secs_f64()),
        retry_after: Some(wait),
        headers: vec![
            (format!("anthropic-ratelimit-{what}-limit"), per_minute.to_string()),
            (format!("anthropic-ratelimit-{what}-remaining"), remaining.to_string()),
            (format!("anthropic-ratelimit-{what}-reset"), rfc3339(now_ms + full.as_millis() as i64)),
        ],
        reason,
    }
}

pub(super) fn concurrency_refusal(scope: &Scope, max: u32) -> Refusal {
    Refusal {
        status: 429,
        message: format!("concurrency limit of {scope}: {max} requests at a time"),
        retry_after: Some(Duration::from_secs(1)),
        headers: vec![
            ("anthropic-ratelimit-concurrency-limit".into(), max.to_string()),
            ("anthropic-ratelimit-concurrency-remaining".into(), "0".into()),
        ],
        reason: "concurrency",
    }
}

/// `held`: the request already holds this scope's concurrency slot.
fn check(
    scope: &Scope,
    c: &mut Counters,
    demand: Demand,
    tz: Tz,
    now: Instant,
    now_ms: i64,
    held: bool,
) -> Result<(), Refusal> {
    if let Some(b) = scope.policy.budget {
        c.roll(b.period, tz, now_ms);
        let spend = Spend { spent: c.spent, reserved: c.reserved, period_end: c.period_end };
        if let Some(r) = budget_refusal(scope, b, &spend, demand) {
            return Err(r);
        }
    }
    let RateLimits { rpm, input_tpm, output_tpm, concurrency } = scope.policy.limits;
    if let Some(rpm) = rpm {
        if c.requests.refill(u64::from(rpm), now) < 1.0 {
            return Err(bucket_refusal(scope, "requests", "rpm", c.requests.level, u64::from(rpm), 1.0, now_ms));
        }
    }
    // A request larger than the whole minute's allowance needs a full bucket, not a bigger one.
    if let Some(tpm) = input_tpm {
        let need = demand.input_tokens.min(tpm) as f64;
        if c.input.refill(tpm, now) < need {
            return Err(bucket_refusal(scope, "input-tokens", "input_tpm", c.input.level, tpm, need, now_ms));
        }
    }
    if let Some(tpm) = output_tpm {
        let need = demand.output_tokens.min(tpm) as f64;
        if c.output.refill(tpm, now) < need {
            return Err(bucket_refusal(scope, "output-tokens", "output_tpm", c.output.level, tpm, need, now_ms));
        }
    }
    if let Some(max) = concurrency.filter(|_| !held) {
        if c.in_flight >= max {
            return Err(concurrency_refusal(scope, max));
        }
    }
    Ok(())
}

impl Limiter for LocalLimiter {
    fn admit_held(
        self: Arc<Self>,
        scopes: Vec<Scope>,
        demand: Demand,
        held: Option<Hold>,
    ) -> Result<Reservation, Refusal> {
        let now = Instant::now();
        let now_ms = (self.clock)();
        let is_held = |s: &Scope| held.as_ref().is_some_and(|h| h.scope().kind == s.kind && h.scope().id == s.id);
        {
            let mut g = self.lock();
            let tz = g.tz;
            for s in &scopes {
                check(s, g.admit_counters(s.kind, &s.id, now_ms)?, demand, tz, now, now_ms, is_held(s))?;
            }
            // Every scope has room: take it on all of them under the same lock.
            for s in &scopes {
                let c = g.counters(s.kind, &s.id);
                if s.policy.budget.is_some() {
                    c.reserved = c.reserved.saturating_add(demand.worst_nanos);
                }
                let l = s.policy.limits;
                if l.rpm.is_some() {
                    c.requests.level -= 1.0;
                }
                if l.input_tpm.is_some() {
                    c.input.level -= demand.input_tokens as f64;
                }
                if l.output_tpm.is_some() {
                    c.output.level -= demand.output_tokens as f64;
                }
                if !is_held(s) {
                    c.in_flight += 1;
                }
            }
        }
        // The held slot is the reservation's now: its settlement gives it back.
        if let Some(h) = held {
            h.take_over();
        }
        Ok(Reservation::new(self, 0, scopes, demand))
    }

    fn hold(self: Arc<Self>, scope: &Scope) -> Result<Hold, Refusal> {
        {
            let now_ms = (self.clock)();
            let mut g = self.lock();
            let c = g.admit_counters(scope.kind, &scope.id, now_ms)?;
            if let Some(max) = scope.policy.limits.concurrency {
                if c.in_flight >= max {
                    return Err(concurrency_refusal(scope, max));
                }
            }
            c.in_flight += 1;
        }
        Ok(Hold::new(self, 0, scope.clone()))
    }

    fn status(&self, scope: &Scope) -> ScopeStatus {
        self.status_now(scope)
    }

    fn seed(&self, scope: &Scope, period_start_ms: i64, spent_nanos: u64) {
        self.seed_now(scope, period_start_ms, spent_nanos)
    }

    fn ids_with_prefix(&self, kind: ScopeKind, prefix: &str) -> Vec<String> {
        self.lock().scopes[kind as usize].keys().filter(|id| id.starts_with(prefix)).cloned().collect()
    }

    fn tracks(&self, scope: &Scope) -> bool {
        let Some(b) = scope.policy.budget else { return true };
        let g = self.lock();
        let (start, _) = b.period.bounds(g.tz, (self.clock)());
        g.scopes[scope.kind as usize]
            .get(&*scope.id)
            .is_some_and(|c| c.period == Some(b.period) && c.period_start == start)
    }
}

impl Settle for LocalLimiter {
    fn release(&self, _ticket: u64, scope: &Scope) {
        // A held scope has a request in flight, so it cannot have been forgotten.
        if let Some(c) = self.lock().scopes[scope.kind as usize].get_mut(&*scope.id) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    fn settle(&self, _ticket: u64, scopes: &[Scope], demand: Demand, actual: Actual) {
        let now_ms = (self.clock)();
        let mut g = self.lock();
        let tz = g.tz;
        for s in scopes {
            let c = g.counters(s.kind, &s.id);
            if let Some(b) = s.policy.budget {
                c.roll(b.period, tz, now_ms);
                c.reserved = c.reserved.saturating_sub(demand.worst_nanos);
                c.charge(actual.cost_nanos, if actual.at_ms == 0 { now_ms } else { actual.at_ms });
            }
            let l = s.policy.limits;
            if let Some(tpm) = l.input_tpm {
                c.input.adjust(demand.input_tokens, actual.input_tokens, tpm);
            }
            if let Some(tpm) = l.output_tpm {
                c.output.adjust(demand.output_tokens, actual.output_tokens, tpm);
            }
            c.in_flight = c.in_flight.saturating_sub(1);
            // Idle from when it last finished, not from when it started.
            c.last_ms = now_ms;
        }
    }
}

impl LocalLimiter {
    fn status_now(&self, scope: &Scope) -> ScopeStatus {
        let now = Instant::now();
        let now_ms = (self.clock)();
        let mut g = self.lock();
        let tz = g.tz;
        // A report does not count a scope: one never seen reads as fresh counters.
        let mut fresh = Counters::default();
        let c = g.scopes[scope.kind as usize].get_mut(&*scope.id).unwrap_or(&mut fresh);
        let mut st = ScopeStatus { in_flight: c.in_flight, ..Default::default() };
        if let Some(b) = scope.policy.budget {
            c.roll(b.period, tz, now_ms);
            st.spent_nanos = c.spent;
            st.reserved_nanos = c.reserved;
            st.limit_nanos = Some(b.limit_nanos);
            st.period = Some(b.period.as_str());
            st.period_start_ms = Some(c.period_start);
            st.resets_at_ms = (c.period_end != i64::MAX).then_some(c.period_end);
        }
        let l = scope.policy.limits;
        if let Some(rpm) = l.rpm {
            st.requests_remaining = Some(c.requests.refill(u64::from(rpm), now).max(0.0) as u64);
        }
        if let Some(tpm) = l.input_tpm {
            st.input_tokens_remaining = Some(c.input.refill(tpm, now) as i64);
        }
        if let Some(tpm) = l.output_tpm {
            st.output_tokens_remaining = Some(c.output.refill(tpm, now) as i64);
        }
        st
    }

    fn seed_now(&self, scope: &Scope, period_start_ms: i64, spent_nanos: u64) {
        let Some(b) = scope.policy.budget else { return };
        let mut g = self.lock();
        let tz = g.tz;
        let c = g.counters(scope.kind, &scope.id);
        let (start, end) = b.period.bounds(tz, (self.clock)());
        if start != period_start_ms {
            tracing::warn!(%scope, "seeded spend is for another period; ignored");
            return;
        }
        c.period = Some(b.period);
        c.period_start = start;
        c.period_end = end;
        c.spent = spent_nanos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Policy;

    fn scope(kind: ScopeKind, id: &str, policy: Policy) -> Scope {
        Scope { kind, id: id.into(), policy }
    }

    fn budget(usd: u64) -> Policy {
        Policy {
            budget: Some(Budget { limit_nanos: usd * 1_000_000_000, period: Period::Daily }),
            ..Default::default()
        }
    }

    fn demand(nanos: u64) -> Demand {
        Demand { worst_nanos: nanos, input_tokens: 100, output_tokens: 100 }
    }

    #[test]
    fn budget_counts_reservations_in_flight() {
        let l = Arc::new(LocalLimiter::new(Tz::UTC));
        let s = vec![scope(ScopeKind::Team, "t", budget(1))];
        let a = l.clone().admit(s.clone(), demand(600_000_000)).unwrap();
        let refused = l.clone().admit(s.clone(), demand(600_000_000)).err().unwrap();
        assert_eq!((refused.status, refused.reason), (429, "budget_reserved"));
        a.settle(Actual { cost_nanos: 100_000_000, ..Default::default() });
        let b = l.clone().admit(s.clone(), demand(600_000_000)).unwrap();
        b.settle(Actual { cost_nanos: 850_000_000, ..Default::default() });
        let too_dear = l.clone().admit(s.clone(), demand(100_000_000)).err().unwrap();
        assert_eq!((too_dear.status, too_dear.reason), (403, "budget"));
        assert!(
            too_dear.message.contains("only $0.05 of the daily budget of team \"t\" ($1) is left"),
            "{}",
            too_dear.message
        );
        let fits = l.clone().admit(s.clone(), demand(50_000_000)).unwrap();
        fits.settle(Actual { cost_nanos: 60_000_000, ..Default::default() }); // used more than reserved
        let spent = l.clone().admit(s.clone(), demand(0)).err().unwrap();
        assert!(spent.message.contains("is spent: $1.01 used; it resets at "), "{}", spent.message);
        assert_eq!(l.status(&s[0]).spent_nanos, 1_010_000_000);
    }

    #[test]
    fn all_scopes_or_none() {
        let l = Arc::new(LocalLimiter::new(Tz::UTC));
        let key = scope(ScopeKind::Key, "k", budget(10));
        let team = scope(ScopeKind::Team, "t", budget(1));
        assert!(l.clone().admit(vec![key.clone(), team.clone()], demand(2_000_000_000)).is_err());
        // The refused request left nothing reserved on the key.
        assert_eq!(l.status(&key).reserved_nanos, 0);
        assert_eq!(l.status(&key).in_flight, 0);
    }

    #[test]
    fn rpm_and_concurrency() {
        let l = Arc::new(LocalLimiter::new(Tz::UTC));
        let limits = RateLimits { rpm: Some(3), concurrency: Some(2), ..Default::default() };
        let s = vec![scope(ScopeKind::Key, "k", Policy { budget: None, limits })];
        let a = l.clone().admit(s.clone(), demand(0)).unwrap();
        let _b = l.clone().admit(s.clone(), demand(0)).unwrap();
        let c = l.clone().admit(s.clone(), demand(0)).err().unwrap();
        assert_eq!(c.reason, "concurrency");
        drop(a); // released even unsettled
        let _c = l.clone().admit(s.clone(), demand(0)).unwrap();
        // Two in flight again, and the minute's three requests are used.
        let d = l.clone().admit(s.clone(), demand(0)).err().unwrap();
        assert_eq!(d.reason, "rpm");
        assert!(d.headers.iter().any(|(k, v)| k == "anthropic-ratelimit-requests-remaining" && v == "0"));
        assert_eq!(l.status(&s[0]).requests_remaining, Some(0));
    }

    #[test]
    fn key_scopes_are_capped_and_idle_ones_forgotten() {
        let now = Arc::new(std::sync::atomic::AtomicI64::new(now_ms()));
        let clock = now.clone();
        let l = Arc::new(LocalLimiter::with_clock(
            Tz::UTC,
            Box::new(move || clock.load(std::sync::atomic::Ordering::SeqCst)),
        ));
        l.set_max_keys(10);
        let s = |i: usize| vec![scope(ScopeKind::Key, &format!("idp:user{i}"), budget(1))];
        // Ten principals in flight: an eleventh cannot be counted.
        let held: Vec<_> = (0..10).map(|i| l.clone().admit(s(i), demand(1)).unwrap()).collect();
        let refused = l.clone().admit(s(10), demand(1)).err().unwrap();
        assert_eq!((refused.status, refused.reason), (429, "principals"));
        // Settled at no cost, they are idle and forgettable. Within a second of a fruitless
        // pass no new pass is made; after it, new principals fit again.
        for r in held {
            r.settle(Actual::default());
        }
        assert_eq!(l.clone().admit(s(10), demand(1)).err().unwrap().reason, "principals");
        now.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
        for i in 10..1000 {
            l.clone().admit(s(i), demand(1)).unwrap().settle(Actual::default());
        }
        let (counted, forgotten) = l.key_scopes();
        assert!(counted <= 10, "{counted}");
        assert_eq!(counted as u64 + forgotten, 1000);
        // A principal with spend this period is kept.
        let l = Arc::new(LocalLimiter::new(Tz::UTC));
        l.set_max_keys(1);
        l.clone().admit(s(0), demand(5)).unwrap().settle(Actual { cost_nanos: 5, ..Default::default() });
        assert_eq!(l.clone().admit(s(1), demand(1)).err().unwrap().reason, "principals");
        assert_eq!(l.status(&s(0)[0]).spent_nanos, 5);
    }

    #[test]
    fn token_bucket_settles_to_real_use() {
        let l = Arc::new(LocalLimiter::new(Tz::UTC));
        let limits = RateLimits { output_tpm: Some(1000), ..Default::default() };
        let s = vec![scope(ScopeKind::Model, "m", Policy { budget: None, limits })];
        let r = l.clone().admit(s.clone(), Demand { output_tokens: 800, ..Default::default() }).unwrap();
        let refused = l.clone().admit(s.clone(), Demand { output_tokens: 800, ..Default::default() }).err().unwrap();
        assert_eq!(refused.status, 429);
        assert!(refused.headers.iter().any(|(k, v)| k == "anthropic-ratelimit-output-tokens-limit" && v == "1000"));
        r.settle(Actual { output_tokens: 50, ..Default::default() });
        assert!(l.clone().admit(s, Demand { output_tokens: 800, ..Default::default() }).is_ok());
    }
}
