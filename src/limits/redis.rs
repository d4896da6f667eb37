//! The limiter of a fleet: budgets, rate limits and concurrency shared by every gateway, in
//! Redis (or Valkey). Admission is one server-side script that checks every scope of a request
//! and reserves on all of them or none; settlement is one more, sent in the background (it is
//! called from `Drop` and never waits). Reservations are leases: each gateway renews its own
//! while their requests run, and a lease whose gateway died expires and gives its reservation
//! back.
//!
//! Every key shares one hash tag (`{prefix}`), so the limiter lives in a single slot: a
//! script may touch every scope of a request, on one Redis or a Redis Cluster alike.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono_tz::Tz;
use tokio::sync::mpsc;

use super::fallback::{CreditKey, Fallback, Known};
use super::local::{bucket_refusal, budget_refusal, concurrency_refusal, now_ms, Spend};
use super::redis_conn::Conn;
use super::{Actual, Demand, Hold, Refusal, Reservation, Scope, ScopeKind, ScopeStatus, Settle};

/// How the shared limiter is reached, and how it behaves.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// Every key starts with `{prefix}:`.
    pub prefix: String,
    /// The longest admission waits for Redis before refusing (503).
    pub timeout: Duration,
    /// How long a reservation outlives the gateway that made it.
    pub lease: Duration,
    /// While Redis does not answer: count on this gateway's share (true) or refuse (false).
    pub local_fallback: bool,
    /// `url` lists nodes of a Redis Cluster (its slot map is followed).
    pub cluster: bool,
    /// Certificates (PEM) trusted for `rediss://`, instead of the system's roots.
    pub ca: Option<Vec<u8>>,
}

/// Work sent to the background: settlements and releases never wait on Redis.
enum Op {
    Settle {
        ticket: u64,
        scopes: Vec<Scope>,
        demand: Demand,
        actual: Actual,
    },
    Release {
        ticket: u64,
    },
    /// What requests admitted on this gateway's share cost, booked into Redis once it answers
    /// (see fallback.rs); all of one data generation (epoch).
    Credit {
        id: u64,
        credits: Arc<Vec<(CreditKey, u64)>>,
    },
}

/// A budget period a scope was seeded for: its kind and start (Unix ms).
type SeededPeriod = (&'static str, i64);

/// How often a gateway counting on its share asks whether Redis answers again.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long Redis must answer again before a gateway counting on its share returns to it
/// (and only once what it owed Redis then is in): a Redis that flaps does not hand out fresh
/// shares, and other gateways' credits arrive meanwhile.
const RECOVERY: Duration = Duration::from_secs(1);

/// The longest a settlement or credit waits between tries while Redis does not take it.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Scopes credited per call.
const CREDITS_PER_CALL: usize = 500;

pub struct RedisLimiter {
    conn: Conn,
    settings: RedisSettings,
    tag: String,
    /// `{prefix}:leases` and `{prefix}:epoch`, made once: every admission names them.
    leases: String,
    epoch: String,
    admit: redis::Script,
    ops: redis::Script,
    /// This process's name in lease ids: leases of different gateways never collide.
    node: String,
    next_ticket: AtomicU64,
    /// Leases this gateway holds now: renewed in the background while they run.
    live: Mutex<HashSet<u64>>,
    queue: mpsc::UnboundedSender<Op>,
    tz: Mutex<Tz>,
    /// Key ids this gateway admitted (JWT principals are known only once they call).
    seen: Mutex<HashSet<String>>,
    /// Set while the data Redis lost is being seeded again from the ledger.
    pub reseeding: AtomicBool,
    /// The scopes this gateway seeded, with the period (kind and start) it seeded them for.
    seeded: Mutex<HashMap<(ScopeKind, String), SeededPeriod>>,
    /// `{prefix}:nodes`: the gateways' heartbeats.
    nodes: String,
    /// What Redis last showed this gateway of each budgeted scope, the fleet's size, and what
    /// this gateway spent on its own and owes Redis: the base of its shares in an outage.
    known: Known,
    /// The counters of an outage, while Redis does not answer (`local_fallback` only).
    fallback: Mutex<Option<Arc<Fallback>>>,
    /// Set by the probe while Redis answers again during an outage: credits may be sent.
    answering: AtomicBool,
    next_credit: AtomicU64,
    /// Operations sent to the background and not yet done (a stopping gateway waits for them).
    queued: Arc<std::sync::atomic::AtomicUsize>,
    rt: tokio::runtime::Handle,
    metrics: crate::metrics::Backend,
}

impl RedisLimiter {
    /// Connects (on `rt`, which then runs the connection, the settlement queue and the lease
    /// renewals) and checks that Redis answers.
    pub fn connect(
        settings: RedisSettings,
        tz: Tz,
        rt: &tokio::runtime::Handle,
        metrics: crate::metrics::Backend,
    ) -> Result<Arc<Self>, String> {
        let (url, cluster, timeout) =
            (settings.url.clone(), settings.cluster, settings.timeout.max(Duration::from_secs(1)));
        let ca = settings.ca.clone();
        let conn =
            crate::blocking::block_on(rt, async move { Conn::open(&url, cluster, timeout, ca.as_deref()).await })?;
        let (queue, work) = mpsc::unbounded_channel();
        let node = format!("{:016x}", rand::random::<u64>());
        let limiter = Arc::new(RedisLimiter {
            tag: format!("{{{}}}", settings.prefix),
            leases: format!("{{{}}}:leases", settings.prefix),
            epoch: format!("{{{}}}:epoch", settings.prefix),
            nodes: format!("{{{}}}:nodes", settings.prefix),
            conn,
            settings,
            admit: redis::Script::new(&format!("{}\n{}", include_str!("redis.lua"), include_str!("redis_admit.lua"))),
            ops: redis::Script::new(&format!("{}\n{}", include_str!("redis.lua"), include_str!("redis_ops.lua"))),
            node,
            next_ticket: AtomicU64::new(1),
            live: Mutex::new(HashSet::new()),
            queue,
            tz: Mutex::new(tz),
            seen: Mutex::new(HashSet::new()),
            reseeding: AtomicBool::new(false),
            seeded: Mutex::new(HashMap::new()),
            known: Known::default(),
            fallback: Mutex::new(None),
            answering: AtomicBool::new(false),
            next_credit: AtomicU64::new(1),
            queued: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            rt: rt.clone(),
            metrics,
        });
        rt.spawn(background(Arc::downgrade(&limiter), work));
        rt.spawn(renew_leases(Arc::downgrade(&limiter)));
        if limiter.settings.local_fallback {
            rt.spawn(send_credits(Arc::downgrade(&limiter)));
        }
        Ok(limiter)
    }

    fn key(&self, kind: ScopeKind, id: &str) -> String {
        format!("{}:s:{}:{id}", self.tag, kind.name())
    }

    fn lease_id(&self, ticket: u64) -> String {
        format!("{}-{ticket}", self.node)
    }

    fn lease_key(&self, ticket: u64) -> String {
        format!("{}:l:{}", self.tag, self.lease_id(ticket))
    }

    pub fn time_zone(&self) -> Tz {
        *self.tz.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_time_zone(&self, tz: Tz) {
        *self.tz.lock().unwrap_or_else(|p| p.into_inner()) = tz;
    }

    /// Key scopes this gateway has admitted.
    pub fn key_scopes(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn ids_with_prefix(&self, kind: ScopeKind, prefix: &str) -> Vec<String> {
        if kind != ScopeKind::Key {
            return Vec::new();
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|id| id.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Reserves `demand` on every scope with a policy, or on none.
    pub async fn admit_held(
        self: &Arc<Self>,
        scopes: Vec<Scope>,
        demand: Demand,
        held: Option<Hold>,
    ) -> Result<Reservation, Refusal> {
        let counted: Vec<&Scope> = scopes.iter().filter(|s| !s.policy.is_empty()).collect();
        if counted.is_empty() {
            // Nothing to count anywhere: no round trip.
            return Ok(Reservation::new(self.clone(), 0, scopes, demand));
        }
        if let Some(f) = self.outage() {
            return f.admit(self, scopes, demand, held);
        }
        // A slot taken on this gateway's share before Redis answered again is given back there.
        let held = held.filter(|h| h.ticket() != 0);
        if let Some(key) = scopes.iter().find(|s| s.kind == ScopeKind::Key) {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if !seen.contains(&*key.id) {
                seen.insert(key.id.to_string());
            }
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let tz = self.time_zone();
        let held_ticket = held.as_ref().map(|h| h.ticket()).filter(|t| *t != 0);
        let is_held = |s: &Scope| held.as_ref().is_some_and(|h| h.scope().kind == s.kind && h.scope().id == s.id);
        let mut inv = self.admit.prepare_invoke();
        let lease_key = self.lease_key(ticket);
        inv.key(&self.epoch).key(&self.leases).key(&lease_key);
        match held_ticket {
            Some(t) => inv.key(self.lease_key(t)),
            None => inv.key(&lease_key),
        };
        for s in &counted {
            inv.key(self.key(s.kind, &s.id));
        }
        inv.arg(self.settings.lease.as_millis() as u64)
            .arg(self.lease_id(ticket))
            .arg(held_ticket.map_or_else(String::new, |t| self.lease_id(t)))
            .arg(demand.worst_nanos)
            .arg(demand.input_tokens)
            .arg(demand.output_tokens)
            .arg(IDLE_TTL_MS);
        for s in &counted {
            let (limit, kind, start, end) = match s.policy.budget {
                Some(b) => {
                    let (start, end) = b.period.bounds(tz, now);
                    (b.limit_nanos.to_string(), b.period.as_str(), start, end)
                }
                None => ("-1".to_string(), "", 0, 0),
            };
            let l = s.policy.limits;
            let or_none = |v: Option<u64>| v.map_or_else(|| "-1".to_string(), |v| v.to_string());
            inv.arg(limit)
                .arg(kind)
                .arg(start)
                .arg(end)
                .arg(or_none(l.rpm.map(u64::from)))
                .arg(or_none(l.input_tpm))
                .arg(or_none(l.output_tpm))
                .arg(or_none(l.concurrency.map(u64::from)))
                .arg(if is_held(s) { "1" } else { "0" });
        }
        // The lease is this gateway's from now on, whatever Redis answers: if the answer is
        // lost, renewing an absent lease does nothing, and releasing one is harmless.
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(ticket);
        let mut conn = self.conn.clone();
        let began = Instant::now();
        let answer = tokio::time::timeout(self.settings.timeout, inv.invoke_async::<Vec<String>>(&mut conn)).await;
        let why = match answer {
            Ok(Ok(a)) => {
                self.metrics.observe("redis", "admit", began.elapsed());
                Ok(a)
            }
            Ok(Err(e)) => Err((format!("{e}"), unreachable(&e))),
            Err(_) => Err((format!("no answer within {:?}", self.settings.timeout), true)),
        };
        let answer = match why {
            Ok(a) => a,
            Err((why, unreachable)) => {
                // The script may have run before the connection failed, or may still run:
                // release in the background, in order after it (harmless if it did not).
                self.metrics.error("redis", "admit");
                self.enqueue(Op::Release { ticket });
                return match self.begin_outage(&why, unreachable) {
                    Some(f) => f.admit(self, scopes, demand, held),
                    None => Err(unavailable(&why)),
                };
            }
        };
        match answer.first().map(String::as_str) {
            Some("ok") => {
                self.remember(&counted, &answer, now, tz);
                if let Some(h) = held {
                    // Its lease is gone in Redis: the admission's lease holds the slot now.
                    self.forget(h.ticket());
                    h.take_over();
                }
                Ok(Reservation::new(self.clone(), ticket, scopes, demand))
            }
            Some("reseed") => {
                self.forget(ticket);
                Err(Refusal {
                    status: 503,
                    message: "the shared limiter lost its counters (a Redis restart); they are being restored from \
                              the ledger: retry in a few seconds"
                        .into(),
                    retry_after: Some(Duration::from_secs(2)),
                    headers: Vec::new(),
                    reason: "limits_reseed",
                })
            }
            Some("refuse") => {
                self.forget(ticket);
                self.remember_refusal(&counted, &answer, now, tz);
                Err(self.refusal(&counted, &answer, demand, now))
            }
            _ => {
                self.forget(ticket);
                Err(unavailable(&format!("unexpected answer {answer:?}")))
            }
        }
    }

    /// Takes a concurrency slot of `scope` before the body is read.
    pub async fn hold(self: &Arc<Self>, scope: &Scope) -> Result<Hold, Refusal> {
        if let Some(f) = self.outage() {
            return f.hold(scope);
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let max = scope.policy.limits.concurrency.map_or(-1, i64::from);
        let mut inv = self.ops.prepare_invoke();
        inv.key(&self.leases).key(self.lease_key(ticket)).key(self.key(scope.kind, &scope.id));
        inv.arg("hold")
            .arg(self.settings.lease.as_millis() as u64)
            .arg(self.lease_id(ticket))
            .arg(max)
            .arg(IDLE_TTL_MS);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(ticket);
        let mut conn = self.conn.clone();
        let began = Instant::now();
        let why = match tokio::time::timeout(self.settings.timeout, inv.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(taken)) => {
                self.metrics.observe("redis", "hold", began.elapsed());
                if taken == 1 {
                    return Ok(Hold::new(self.clone(), ticket, scope.clone()));
                }
                self.forget(ticket);
                return Err(concurrency_refusal(scope, max as u32));
            }
            Ok(Err(e)) => (format!("{e}"), unreachable(&e)),
            Err(_) => (format!("no answer within {:?}", self.settings.timeout), true),
        };
        self.metrics.error("redis", "hold");
        self.enqueue(Op::Release { ticket });
        match self.begin_outage(&why.0, why.1) {
            Some(f) => f.hold(scope),
            None => Err(unavailable(&why.0)),
        }
    }

    /// Spend and headroom of `scope`, as Redis holds them.
    pub async fn status(&self, scope: &Scope) -> ScopeStatus {
        let mut conn = self.conn.clone();
        let fields: Result<Vec<Option<String>>, _> = redis::cmd("HMGET")
            .arg(self.key(scope.kind, &scope.id))
            .arg(&["ps", "pe", "spent", "res", "inf", "rq", "rqt", "it", "itt", "ot", "ott"])
            .query_async(&mut conn)
            .await;
        let f = fields.unwrap_or_else(|e| {
            tracing::warn!(%scope, error = %e, "the shared limiter did not answer a status read; it shows nothing spent");
            Vec::new()
        });
        let get = |i: usize| f.get(i).cloned().flatten();
        let int = |i: usize| get(i).and_then(|v| v.parse::<i64>().ok());
        let now = now_ms();
        let mut st = ScopeStatus { in_flight: int(4).unwrap_or(0).max(0) as u32, ..Default::default() };
        if let Some(b) = scope.policy.budget {
            let (start, end) = b.period.bounds(self.time_zone(), now);
            let current = int(0) == Some(start);
            st.spent_nanos = if current { int(2).unwrap_or(0).max(0) as u64 } else { 0 };
            st.reserved_nanos = int(3).unwrap_or(0).max(0) as u64;
            st.limit_nanos = Some(b.limit_nanos);
            st.period = Some(b.period.as_str());
            st.period_start_ms = Some(start);
            st.resets_at_ms = (end != i64::MAX).then_some(end);
        }
        let level = |l: usize, t: usize, cap: u64| {
            let (Some(level), Some(at)) = (get(l).and_then(|v| v.parse::<f64>().ok()), int(t)) else {
                return cap as f64;
            };
            (level + (now - at).max(0) as f64 * cap as f64 / 60_000.0).min(cap as f64)
        };
        let l = scope.policy.limits;
        if let Some(rpm) = l.rpm {
            st.requests_remaining = Some(level(5, 6, u64::from(rpm)).max(0.0) as u64);
        }
        if let Some(tpm) = l.input_tpm {
            st.input_tokens_remaining = Some(level(7, 8, tpm) as i64);
        }
        if let Some(tpm) = l.output_tpm {
            st.output_tokens_remaining = Some(level(9, 10, tpm) as i64);
        }
        st
    }

    /// Seeds a budgeted scope's spend for the period starting at `period_start_ms`; Redis keeps
    /// what it holds when that is more. Blocking: for start-up and reloads, off the workers.
    pub fn seed(
        &self,
        scope: &Scope,
        period_start_ms: i64,
        spent_nanos: u64,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), String> {
        let Some(b) = scope.policy.budget else { return Ok(()) };
        let (start, end) = b.period.bounds(self.time_zone(), now_ms());
        if start != period_start_ms {
            return Ok(());
        }
        let (script, key, mut conn) = (self.ops.clone(), self.key(scope.kind, &scope.id), self.conn.clone());
        let kind = b.period.as_str();
        let result = crate::blocking::block_on(rt, async move {
            script
                .key(key)
                .arg("seed")
                .arg(kind)
                .arg(start)
                .arg(end)
                .arg(spent_nanos)
                .invoke_async::<i64>(&mut conn)
                .await
        });
        result.map_err(|e| format!("the shared limiter could not be seeded for {scope}: {e}"))?;
        let mut seeded = self.seeded.lock().unwrap_or_else(|p| p.into_inner());
        seeded.insert((scope.kind, scope.id.to_string()), (kind, start));
        Ok(())
    }

    /// Whether this gateway seeded the scope for its current period already. Seeding again
    /// would count twice what Redis holds and the ledger holds both (settlements on their
    /// way): a scope is seeded at start, when its budget or period changes, and after Redis
    /// lost its data.
    pub fn tracks(&self, scope: &Scope) -> bool {
        let Some(b) = scope.policy.budget else { return true };
        let (start, _) = b.period.bounds(self.time_zone(), now_ms());
        let seeded = self.seeded.lock().unwrap_or_else(|p| p.into_inner());
        seeded.get(&(scope.kind, scope.id.to_string())) == Some(&(b.period.as_str(), start))
    }

    /// Forgets which scopes were seeded: after Redis lost its data, all are seeded again.
    pub fn forget_seeds(&self) {
        self.seeded.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Marks Redis as seeded: admission refuses (and asks for a seed) while the mark is absent,
    /// so a Redis that lost its data never grants a budget a second time.
    pub fn mark_seeded(&self, rt: &tokio::runtime::Handle) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let epoch = self.epoch.clone();
        // A new generation each time the data is seeded: a credit meant for data Redis lost
        // must not land in the data seeded after (which holds it already, from the ledger).
        let generation = format!("{}-{:016x}", self.node, rand::random::<u64>());
        crate::blocking::block_on(rt, async move {
            redis::cmd("SET").arg(epoch).arg(generation).arg("NX").query_async::<Option<String>>(&mut conn).await
        })
        .map(|_| ())
        .map_err(|e| format!("Redis: {e}"))
    }

    /// The counters of the outage under way, if Redis is not answering.
    fn outage(&self) -> Option<Arc<Fallback>> {
        self.fallback.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this gateway counts on its own share now (Redis not answering).
    pub fn counting_locally(&self) -> bool {
        self.fallback.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub(super) fn known(&self) -> &Known {
        &self.known
    }

    /// Redis did not answer (`unreachable`: no connection, or no answer in time; an error
    /// answer, such as a Redis out of memory or a read-only replica, is no outage): with
    /// `local_fallback`, counting on this gateway's share begins (once per outage) and a probe
    /// watches for Redis's return; otherwise nothing changes.
    fn begin_outage(self: &Arc<Self>, why: &str, unreachable: bool) -> Option<Arc<Fallback>> {
        if !self.settings.local_fallback || !unreachable {
            return None;
        }
        let mut current = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &*current {
            return Some(f.clone());
        }
        // No answer ever read: no epoch, so nothing is known (no share) and nothing credited.
        let epoch = self.known.epoch().unwrap_or_else(|| Arc::from(""));
        let f = Arc::new(Fallback::new(self, self.known.fleet(), epoch));
        tracing::error!(
            error = %why,
            gateways = f.fleet(),
            "the shared limiter does not answer; counting on this gateway's share until it does"
        );
        *current = Some(f.clone());
        self.answering.store(false, Ordering::Release);
        self.rt.spawn(probe(Arc::downgrade(self)));
        Some(f)
    }

    /// Keeps what Redis said of each budgeted scope (its epoch, and its spend and reservations):
    /// the base of this gateway's share if Redis stops answering.
    fn remember(&self, counted: &[&Scope], answer: &[String], now: i64, tz: Tz) {
        if !self.settings.local_fallback {
            return;
        }
        let Some(epoch) = answer.get(1) else { return };
        let mut seen = Vec::with_capacity(counted.len());
        for (s, used) in counted.iter().zip(answer.iter().skip(2)) {
            let Some(b) = s.policy.budget else { continue };
            match used.parse::<u64>() {
                Ok(used) => {
                    let (start, _) = b.period.bounds(tz, now);
                    seen.push((*s, b.period.as_str(), start, used));
                }
                // Not a number this build reads: not known (no share in an outage).
                Err(_) => self.known.forget(s),
            }
        }
        self.known.saw(epoch, &seen);
    }

    /// A budget refusal carries the scope's spend and reservations (and Redis's epoch): the
    /// view of a scope near its end stays fresh though no admission of it succeeds.
    fn remember_refusal(&self, counted: &[&Scope], answer: &[String], now: i64, tz: Tz) {
        if !self.settings.local_fallback
            || !matches!(answer.get(2).map(String::as_str), Some("budget" | "budget_reserved"))
        {
            return;
        }
        let index = answer.get(1).and_then(|i| i.parse::<usize>().ok()).unwrap_or(0);
        let (Some(s), Some(epoch)) = (index.checked_sub(1).and_then(|i| counted.get(i)), answer.get(6)) else { return };
        let Some(b) = s.policy.budget else { return };
        let int = |i: usize| answer.get(i).and_then(|v| v.parse::<u64>().ok());
        match (int(3), int(4)) {
            (Some(spent), Some(reserved)) => {
                let (start, _) = b.period.bounds(tz, now);
                self.known.saw(epoch, &[(*s, b.period.as_str(), start, spent.saturating_add(reserved))]);
            }
            _ => self.known.forget(s),
        }
    }

    /// Sends what this gateway owes Redis, one operation per data generation.
    fn send_owed(&self) {
        let owed = self.known.take_owed();
        if owed.is_empty() {
            return;
        }
        let mut by_epoch: HashMap<Arc<str>, Vec<(CreditKey, u64)>> = HashMap::new();
        for (c, cost) in owed {
            by_epoch.entry(c.epoch.clone()).or_default().push((c, cost));
        }
        for (_, credits) in by_epoch {
            for chunk in credits.chunks(CREDITS_PER_CALL) {
                let id = self.next_credit.fetch_add(1, Ordering::Relaxed);
                self.enqueue(Op::Credit { id, credits: Arc::new(chunk.to_vec()) });
            }
        }
    }

    fn enqueue(&self, op: Op) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.queue.send(op).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Sends what is owed and waits (at most `within`) until Redis has taken every settlement,
    /// release and credit sent to it. Blocking: for a stopping gateway.
    pub fn flush(&self, within: Duration) {
        self.send_owed();
        let deadline = std::time::Instant::now() + within;
        while self.queued.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = self.queued.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(
                operations = left,
                "stopping with settlements or credits Redis has not taken (the ledger has the rows)"
            );
        }
    }

    fn forget(&self, ticket: u64) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&ticket);
    }

    /// The refusal Redis's answer describes, in the local limiter's words.
    fn refusal(&self, counted: &[&Scope], answer: &[String], demand: Demand, now: i64) -> Refusal {
        let index = answer.get(1).and_then(|i| i.parse::<usize>().ok()).unwrap_or(1).max(1);
        let scope = counted[(index - 1).min(counted.len() - 1)];
        let num = |i: usize| answer.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let l = scope.policy.limits;
        match answer.get(2).map(String::as_str) {
            Some("budget" | "budget_reserved") => {
                let int = |i: usize| answer.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let spend = Spend { spent: int(3), reserved: int(4), period_end: num(5) as i64 };
                let b = scope.policy.budget.expect("a budget refusal is for a budgeted scope");
                budget_refusal(scope, b, &spend, demand).unwrap_or_else(|| unavailable("budget refusal without cause"))
            }
            Some("rpm") => bucket_refusal(scope, "requests", "rpm", num(3), u64::from(l.rpm.unwrap_or(1)), 1.0, now),
            Some("input_tpm") => {
                let tpm = l.input_tpm.unwrap_or(1);
                bucket_refusal(
                    scope,
                    "input-tokens",
                    "input_tpm",
                    num(3),
                    tpm,
                    demand.input_tokens.min(tpm) as f64,
                    now,
                )
            }
            Some("output_tpm") => {
                let tpm = l.output_tpm.unwrap_or(1);
                let need = demand.output_tokens.min(tpm) as f64;
                bucket_refusal(scope, "output-tokens", "output_tpm", num(3), tpm, need, now)
            }
            _ => concurrency_refusal(scope, l.concurrency.unwrap_or(0)),
        }
    }

    async fn run(&self, op: Op) -> Result<(), redis::RedisError> {
        let mut conn = self.conn.clone();
        let began = Instant::now();
        let name = match &op {
            Op::Release { .. } => "release",
            Op::Settle { .. } => "settle",
            Op::Credit { .. } => "credit",
        };
        let result = self.run_on(&mut conn, op).await;
        match &result {
            Ok(()) => self.metrics.observe("redis", name, began.elapsed()),
            Err(_) => self.metrics.error("redis", name),
        }
        result
    }

    async fn run_on(&self, conn: &mut Conn, op: Op) -> Result<(), redis::RedisError> {
        match op {
            Op::Credit { id, credits } => {
                let Some((first, _)) = credits.first() else { return Ok(()) };
                let mut inv = self.ops.prepare_invoke();
                inv.key(&self.epoch).key(format!("{}:c:{}-{id}", self.tag, self.node));
                for (c, _) in credits.iter() {
                    inv.key(self.key(c.kind, &c.id));
                }
                inv.arg("credit").arg(&*first.epoch);
                for (c, cost) in credits.iter() {
                    inv.arg(c.period).arg(c.start).arg(c.end).arg(*cost);
                }
                // 1: booked; 2: booked before (a retry); 0: Redis holds another generation of
                // its data now, seeded from the ledger, which has this spend.
                inv.invoke_async::<i64>(conn).await?;
                self.known.acknowledged(&credits);
            }
            Op::Release { ticket } => {
                let mut inv = self.ops.prepare_invoke();
                inv.key(&self.leases).key(self.lease_key(ticket)).arg("release").arg(self.lease_id(ticket));
                inv.invoke_async::<i64>(conn).await?;
                self.forget(ticket);
            }
            Op::Settle { ticket, scopes, demand, actual } => {
                let counted: Vec<&Scope> = scopes.iter().filter(|s| !s.policy.is_empty()).collect();
                let tz = self.time_zone();
                let now = now_ms();
                let mut inv = self.ops.prepare_invoke();
                inv.key(&self.leases).key(self.lease_key(ticket));
                for s in &counted {
                    inv.key(self.key(s.kind, &s.id));
                }
                inv.arg("settle")
                    .arg(self.lease_id(ticket))
                    .arg(actual.cost_nanos)
                    .arg(actual.at_ms.max(0))
                    .arg(demand.input_tokens)
                    .arg(actual.input_tokens)
                    .arg(demand.output_tokens)
                    .arg(actual.output_tokens);
                for s in &counted {
                    let l = s.policy.limits;
                    let (kind, start, end) = match s.policy.budget {
                        Some(b) => {
                            let (start, end) = b.period.bounds(tz, now);
                            (b.period.as_str(), start, end)
                        }
                        None => ("", 0, 0),
                    };
                    inv.arg(kind)
                        .arg(start)
                        .arg(end)
                        .arg(l.input_tpm.map_or_else(|| "-1".to_string(), |v| v.to_string()))
                        .arg(l.output_tpm.map_or_else(|| "-1".to_string(), |v| v.to_string()));
                }
                inv.invoke_async::<i64>(conn).await?;
                self.forget(ticket);
            }
        }
        Ok(())
    }
}

/// A scope without a budget is forgotten by Redis after this long unused (its buckets full).
const IDLE_TTL_MS: i64 = 3_600_000;

impl Settle for RedisLimiter {
    fn release(&self, ticket: u64, _scope: &Scope) {
        if ticket != 0 {
            self.enqueue(Op::Release { ticket });
        }
    }

    fn settle(&self, ticket: u64, scopes: &[Scope], demand: Demand, actual: Actual) {
        if ticket != 0 {
            self.enqueue(Op::Settle { ticket, scopes: scopes.to_vec(), demand, actual });
        }
    }
}

/// Runs settlements and releases in order, retrying each until Redis takes it: a settlement
/// carries money, and is never dropped while this process lives.
async fn background(limiter: std::sync::Weak<RedisLimiter>, mut work: mpsc::UnboundedReceiver<Op>) {
    while let Some(op) = work.recv().await {
        let Some(l) = limiter.upgrade() else { return };
        let mut op = Some(op);
        let mut wait = Duration::from_millis(50);
        while let Some(o) = op.take() {
            let retry = clone_op(&o);
            match l.run(o).await {
                Ok(()) => {}
                // Redis away or slow: the operation is safe to repeat (a settlement runs once
                // per lease), so it is tried again until Redis takes it.
                Err(e) if unreachable(&e) || passing(&e) => {
                    tracing::warn!(error = %e, "the shared limiter did not take a settlement; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                    op = Some(retry);
                }
                // A credit is money this gateway spent on its own: it goes back to what is owed
                // and is sent again with the next batch, never dropped (the gateway keeps
                // counting on its share until Redis has it).
                Err(e) if matches!(retry, Op::Credit { .. }) => {
                    tracing::error!(error = %e, "the shared limiter refused a credit; kept to send again");
                    if let Op::Credit { credits, .. } = retry {
                        l.known.owe_again(&credits);
                    }
                }
                // A refusal by the script itself would repeat forever and hold up every later
                // settlement: it is logged, loudly, and dropped (the ledger still has the row).
                Err(e) => tracing::error!(error = %e, "the shared limiter refused a settlement; dropped"),
            }
        }
        l.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

fn clone_op(op: &Op) -> Op {
    match op {
        Op::Credit { id, credits } => Op::Credit { id: *id, credits: credits.clone() },
        Op::Release { ticket } => Op::Release { ticket: *ticket },
        Op::Settle { ticket, scopes, demand, actual } => {
            Op::Settle { ticket: *ticket, scopes: scopes.clone(), demand: *demand, actual: *actual }
        }
    }
}

/// While this gateway counts on its share, asks Redis every [`PROBE_EVERY`] whether it answers.
/// Once it has answered for [`RECOVERY`] and has acknowledged what this gateway owed it then,
/// admissions go to Redis again.
async fn probe(limiter: std::sync::Weak<RedisLimiter>) {
    let mut answering_since: Option<(std::time::Instant, Option<u64>)> = None;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(l) = limiter.upgrade() else { return };
        let mut conn = l.conn.clone();
        let ping = redis::cmd("PING");
        let answers =
            matches!(tokio::time::timeout(l.settings.timeout, ping.query_async::<()>(&mut conn)).await, Ok(Ok(())));
        l.answering.store(answers, Ordering::Release);
        if !answers {
            answering_since = None;
            continue;
        }
        let (since, mark) = answering_since.get_or_insert((std::time::Instant::now(), None));
        if since.elapsed() < RECOVERY {
            continue;
        }
        let mark = *mark.get_or_insert_with(|| l.known.owed_so_far());
        l.send_owed();
        if l.known.acknowledged_up_to(mark) {
            *l.fallback.lock().unwrap_or_else(|p| p.into_inner()) = None;
            l.answering.store(false, Ordering::Release);
            tracing::warn!(
                "the shared limiter answers again and holds this gateway's spend; admissions count in Redis"
            );
            return;
        }
    }
}

/// Sends what this gateway owes Redis every [`PROBE_EVERY`], while Redis answers (requests
/// admitted on a share and settled after the gateway returned to Redis owe it too).
async fn send_credits(limiter: std::sync::Weak<RedisLimiter>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(l) = limiter.upgrade() else { return };
        if !l.counting_locally() || l.answering.load(Ordering::Acquire) {
            l.send_owed();
        }
    }
}

/// No connection, or no answer in time: Redis is out of reach.
fn unreachable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// An error answer that passes by itself: a Redis loading its data, out of memory, busy with a
/// script, or a replica that is not (or no longer) the primary.
fn passing(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some(
            "READONLY"
                | "LOADING"
                | "OOM"
                | "BUSY"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "MISCONF"
                | "NOREPLICAS"
        )
    )
}

/// Pushes the expiry of this gateway's leases forward, a third of a lease at a time.
async fn renew_leases(limiter: std::sync::Weak<RedisLimiter>) {
    loop {
        let Some(l) = limiter.upgrade() else { return };
        let every = l.settings.lease / 3;
        let ids: Vec<String> =
            l.live.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|t| l.lease_id(*t)).collect();
        let mut conn = l.conn.clone();
        // One call at least, with no lease in it: the gateway's heartbeat.
        for chunk in ids.chunks(1000).chain(ids.is_empty().then_some(&[][..])) {
            // Expiries are Redis's time plus a lease, like the admissions' own.
            let mut inv = l.ops.prepare_invoke();
            inv.key(&l.leases).key(&l.nodes).arg("renew").arg(l.settings.lease.as_millis() as u64).arg(&l.node);
            for id in chunk {
                inv.arg(id);
            }
            let began = Instant::now();
            match tokio::time::timeout(l.settings.lease / 3, inv.invoke_async::<u64>(&mut conn)).await {
                Ok(Ok(gateways)) => {
                    l.metrics.observe("redis", "renew", began.elapsed());
                    l.known.set_fleet(gateways);
                }
                Ok(Err(e)) => {
                    l.metrics.error("redis", "renew");
                    tracing::warn!(error = %e, "leases not renewed");
                }
                Err(_) => {
                    l.metrics.error("redis", "renew");
                    tracing::warn!("leases not renewed: Redis gave no answer");
                }
            }
        }
        drop(l);
        tokio::time::sleep(every).await;
    }
}

/// The refusal while the shared limiter does not answer.
pub(super) fn unavailable(why: &str) -> Refusal {
    tracing::warn!(error = %why, "the shared limiter is unavailable");
    Refusal {
        status: 503,
        message: "the gateway's shared limiter (Redis) is unavailable; retry shortly".into(),
        retry_after: Some(Duration::from_secs(1)),
        headers: Vec::new(),
        reason: "limits_unavailable",
    }
}
