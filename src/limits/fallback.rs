//! What a fleet gateway counts while Redis does not answer (`on_unavailable = "local"`): each
//! gateway admits on its own share of what the fleet had left. A budgeted scope gets
//! `(limit - spent and reserved, as this gateway last saw them in Redis) / gateways`, its rate
//! limits and concurrency are divided by the number of gateways (rounded up), and what it spends
//! is credited to Redis once Redis answers again, so the fleet's counters stay whole.
//!
//! The shares hold the fleet to its budget as well as the gateways' last views of Redis allow:
//! spend that another gateway booked after this one last saw the scope is not in its share. The
//! documented bound (docs/fleet.md) is that spend, plus what was in flight when Redis went away.

use std::sync::{Arc, Mutex, Weak};

use super::local::now_ms;
use super::redis::RedisLimiter;
use super::{Actual, Demand, Hold, Limiter, LocalLimiter, RateLimits, Refusal, Reservation, Scope, Settle};

/// The counters of one outage: made when Redis stops answering, dropped when it answers again
/// (requests admitted meanwhile keep theirs until they settle).
pub(super) struct Fallback {
    local: Arc<LocalLimiter>,
    /// Gateways sharing the fleet's limits when Redis went away (this one included).
    fleet: u64,
    /// Redis's data generation then: credits go only into that data.
    epoch: Arc<str>,
    shared: Weak<RedisLimiter>,
    /// One scope seeded at a time (two requests of a new scope must not both seed it).
    seeding: Mutex<()>,
}

impl Fallback {
    pub(super) fn new(shared: &Arc<RedisLimiter>, fleet: u64, epoch: Arc<str>) -> Self {
        Fallback {
            local: Arc::new(LocalLimiter::new(shared.time_zone())),
            fleet: fleet.max(1),
            epoch,
            shared: Arc::downgrade(shared),
            seeding: Mutex::new(()),
        }
    }

    pub(super) fn fleet(&self) -> u64 {
        self.fleet
    }

    /// Admits on this gateway's share. A slot held in Redis before Redis went away is given
    /// back there (when it answers) and taken here afresh.
    pub(super) fn admit(
        self: &Arc<Self>,
        shared: &RedisLimiter,
        scopes: Vec<Scope>,
        demand: Demand,
        held: Option<Hold>,
    ) -> Result<Reservation, Refusal> {
        let held = held.filter(|h| h.ticket() == 0);
        let mut mine = Vec::with_capacity(scopes.len());
        for mut s in scopes {
            s.policy.limits = share_limits(s.policy.limits, self.fleet);
            self.seed(shared, &s)?;
            mine.push(s);
        }
        let reservation = self.local.clone().admit_held(mine, demand, held).map_err(|r| self.refusal(r))?;
        Ok(reservation.rebind(self.clone()))
    }

    pub(super) fn hold(self: &Arc<Self>, scope: &Scope) -> Result<Hold, Refusal> {
        let mut s = scope.clone();
        s.policy.limits = share_limits(s.policy.limits, self.fleet);
        let hold = self.local.clone().hold(&s)?;
        Ok(hold.rebind(self.clone()))
    }

    /// Gives a budgeted scope its share, once per outage (and per period).
    fn seed(&self, shared: &RedisLimiter, scope: &Scope) -> Result<(), Refusal> {
        let Some(b) = scope.policy.budget else { return Ok(()) };
        if self.local.tracks(scope) {
            return Ok(());
        }
        let _one = self.seeding.lock().unwrap_or_else(|p| p.into_inner());
        if self.local.tracks(scope) {
            return Ok(());
        }
        let (start, _) = b.period.bounds(self.local.time_zone(), now_ms());
        // A scope this gateway never admitted in Redis: nothing says what is left of it.
        let used = shared.last_seen(scope, start).ok_or_else(|| {
            super::redis::unavailable_refusal(&format!("{scope}: no share while Redis is away (never seen in Redis)"))
        })?;
        let share = b.limit_nanos.saturating_sub(used) / self.fleet;
        self.local.seed(scope, start, b.limit_nanos - share);
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
            shared.credit(&self.epoch, scopes, actual);
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

    #[test]
    fn limits_are_divided_rounding_up_and_never_to_zero() {
        let l = RateLimits { rpm: Some(30), input_tpm: Some(1000), output_tpm: Some(1), concurrency: Some(3) };
        let s = share_limits(l, 4);
        assert_eq!(s, RateLimits { rpm: Some(8), input_tpm: Some(250), output_tpm: Some(1), concurrency: Some(1) });
        assert_eq!(share_limits(l, 1), l);
        assert_eq!(share_limits(RateLimits::default(), 3), RateLimits::default());
    }
}
