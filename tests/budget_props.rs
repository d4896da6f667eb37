//! Property test of budgets against a model ledger: random interleavings of admissions,
//! settlements, time passing (across period ends), period changes and reloads, over random
//! budgets. After every step the limiter's spend for the current period equals the ledger's sum
//! for that period (as a flush would show it), and no admission takes spend and reservations
//! past the budget.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use tollgate::limits::{Actual, Budget, Demand, Limiter, LocalLimiter, Period, Policy, Reservation, Scope, ScopeKind};

#[derive(Debug, Clone)]
enum Op {
    /// A request with this worst case on the key alone, or on the key and its team.
    Admit { worst: u64, team: bool },
    /// Settles the n-th request in flight at this per-mille of its worst case.
    Settle { nth: usize, permille: u64 },
    /// Time passes (milliseconds; up to two days, so periods end).
    Advance(i64),
    /// The key's budget moves to another period; the runtime then seeds it from the ledger.
    ChangePeriod(Period),
    /// A reload that changes nothing: the runtime seeds only what it does not track (a scope
    /// whose period ended since it was last used).
    Reload,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..400_000_000, any::<bool>()).prop_map(|(worst, team)| Op::Admit { worst, team }),
        4 => (0usize..8, 0u64..=1000).prop_map(|(nth, permille)| Op::Settle { nth, permille }),
        2 => (0i64..2 * 86_400_000).prop_map(Op::Advance),
        1 => prop_oneof![Just(Period::Daily), Just(Period::Weekly), Just(Period::Monthly), Just(Period::None)]
            .prop_map(Op::ChangePeriod),
        1 => Just(Op::Reload),
    ]
}

struct InFlight {
    reservation: Reservation,
    worst: u64,
    /// When it was admitted: its ledger row's time.
    at_ms: i64,
    team: bool,
}

fn scope(kind: ScopeKind, id: &str, limit_nanos: u64, period: Period) -> Scope {
    Scope { kind, id: id.into(), policy: Policy { budget: Some(Budget { limit_nanos, period }), ..Default::default() } }
}

/// What the runtime does on a reload: seed a scope it does not track from the ledger.
fn seed_if_untracked(limiter: &LocalLimiter, s: &Scope, rows: &[(i64, u64)], now: i64) -> Option<u64> {
    if limiter.tracks(s) {
        return None;
    }
    let (start, _) = s.policy.budget.unwrap().period.bounds(chrono_tz::Tz::UTC, now);
    let spent: u64 = rows.iter().filter(|(at, _)| *at >= start).map(|(_, c)| c).sum();
    limiter.seed(s, start, spent);
    Some(spent)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn spend_matches_the_ledger_and_never_passes_the_budget(
        key_limit in 1u64..2_000_000_000,
        team_limit in 1u64..2_000_000_000,
        start in 1_700_000_000_000i64..1_900_000_000_000,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let now = Arc::new(AtomicI64::new(start));
        let clock = now.clone();
        let limiter = Arc::new(LocalLimiter::with_clock(chrono_tz::Tz::UTC, Box::new(move || clock.load(Ordering::SeqCst))));
        let mut key = scope(ScopeKind::Key, "k", key_limit, Period::Daily);
        let team = scope(ScopeKind::Team, "t", team_limit, Period::Monthly);
        // The ledger: (row time, cost) per scope.
        let (mut key_rows, mut team_rows) = (Vec::<(i64, u64)>::new(), Vec::<(i64, u64)>::new());
        let mut flying: Vec<InFlight> = Vec::new();
        // At start the runtime seeds every budget from the (empty) ledger.
        seed_if_untracked(&limiter, &key, &key_rows, start);
        seed_if_untracked(&limiter, &team, &team_rows, start);
        // Spend a seed found already above the budget (a longer period took in older rows).
        let mut key_floor = 0u64;

        for op in ops {
            let t = now.load(Ordering::SeqCst);
            match op {
                Op::Admit { worst, team: with_team } => {
                    let scopes = if with_team { vec![key.clone(), team.clone()] } else { vec![key.clone()] };
                    let before: Vec<_> = scopes.iter().map(|s| limiter.status(s)).collect();
                    let demand = Demand { worst_nanos: worst, ..Default::default() };
                    match limiter.clone().admit(scopes.clone(), demand) {
                        Ok(reservation) => {
                            for (s, b) in scopes.iter().zip(&before) {
                                let limit = s.policy.budget.unwrap().limit_nanos;
                                prop_assert!(b.spent_nanos + b.reserved_nanos + worst <= limit, "admitted past the budget of {s}");
                            }
                            flying.push(InFlight { reservation, worst, at_ms: t, team: with_team });
                        }
                        Err(_) => {
                            // Refused only when some scope had no room.
                            let full = scopes.iter().zip(&before).any(|(s, b)| {
                                b.spent_nanos + b.reserved_nanos + worst > s.policy.budget.unwrap().limit_nanos
                            });
                            prop_assert!(full, "refused with room in every scope");
                        }
                    }
                }
                Op::Settle { nth, permille } => {
                    if flying.is_empty() {
                        continue;
                    }
                    let f = flying.remove(nth % flying.len());
                    let cost = f.worst * permille / 1000;
                    // The ledger row is written before the settlement, at the request's time.
                    key_rows.push((f.at_ms, cost));
                    if f.team {
                        team_rows.push((f.at_ms, cost));
                    }
                    f.reservation.settle(Actual { cost_nanos: cost, at_ms: f.at_ms, ..Default::default() });
                }
                Op::Advance(ms) => {
                    now.fetch_add(ms, Ordering::SeqCst);
                }
                Op::ChangePeriod(p) => {
                    key = scope(ScopeKind::Key, "k", key_limit, p);
                    if let Some(seeded) = seed_if_untracked(&limiter, &key, &key_rows, t) {
                        // What a longer period already holds, plus what was in flight, may be
                        // above the budget: no new request gets in then, but those may settle.
                        key_floor = seeded + flying.iter().map(|f| f.worst).sum::<u64>();
                    }
                }
                Op::Reload => {
                    // A scope whose period ended unseen is seeded again; that changes nothing.
                    seed_if_untracked(&limiter, &key, &key_rows, t);
                    seed_if_untracked(&limiter, &team, &team_rows, t);
                }
            }
            // After every step: memory equals the ledger for the current period.
            let t = now.load(Ordering::SeqCst);
            for (s, rows) in [(&key, &key_rows), (&team, &team_rows)] {
                let st = limiter.status(s);
                let (start, end) = s.policy.budget.unwrap().period.bounds(chrono_tz::Tz::UTC, t);
                let ledger: u64 = rows.iter().filter(|(at, _)| (start..end).contains(at)).map(|(_, c)| c).sum();
                prop_assert_eq!(st.spent_nanos, ledger, "{} spend vs ledger", s);
                let limit = s.policy.budget.unwrap().limit_nanos;
                let floor = if s.kind == ScopeKind::Key { key_floor } else { 0 };
                prop_assert!(st.spent_nanos <= limit.max(floor), "{} spent {} over {}", s, st.spent_nanos, limit);
            }
        }
    }
}
