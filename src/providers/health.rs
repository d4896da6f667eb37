//! Whether an endpoint or a credential may take traffic: passive health from live traffic
//! (consecutive failures put it in a cool-down that grows on repeated failure), and the active
//! probe that runs in the background and costs no tokens.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::Connector;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora_load_balancing::health_check::HealthCheck;
use pingora_load_balancing::Backend;

use super::endpoint::EndpointRef;
use crate::config::{HealthConfig, ProbeKind};

/// Milliseconds since the first call: a clock that fits in an atomic.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How live traffic moves an endpoint in and out of rotation.
#[derive(Debug, Clone)]
pub struct HealthPolicy {
    /// Consecutive failures that start a cool-down.
    pub failures: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl From<&HealthConfig> for HealthPolicy {
    fn from(c: &HealthConfig) -> Self {
        HealthPolicy { failures: c.failures.max(1), cooldown: c.cooldown, max_cooldown: c.max_cooldown }
    }
}

/// Passive health state, updated from live traffic without locks.
#[derive(Debug, Default)]
pub struct PassiveHealth {
    consecutive_failures: AtomicU32,
    /// How many cool-downs in a row (0: healthy); each one is twice as long as the last.
    level: AtomicU32,
    cooldown_until_ms: AtomicU64,
    cooldowns: AtomicU64,
}

impl PassiveHealth {
    pub fn available(&self, now_ms: u64) -> bool {
        self.cooldown_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub fn cooling_down_for(&self, now_ms: u64) -> Option<Duration> {
        let until = self.cooldown_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then(|| Duration::from_millis(until - now_ms))
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn cooldowns(&self) -> u64 {
        self.cooldowns.load(Ordering::Relaxed)
    }

    /// A success: the failure count restarts, and an endpoint cooling down after failures
    /// (say, one that answered a last-resort attempt) is back at once. A 429's pause stays.
    pub fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.level.swap(0, Ordering::Relaxed) > 0 {
            self.cooldown_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; returns the cool-down it started, if it started one. Failures while
    /// cooling down (requests that were already in flight) are not counted again. An endpoint
    /// just back from a cool-down (level still raised) goes back out on its first failure,
    /// for twice as long.
    pub fn failure(&self, policy: &HealthPolicy) -> Option<Duration> {
        let now = now_ms();
        let until = self.cooldown_until_ms.load(Ordering::Relaxed);
        if until > now {
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let on_probation = self.level.load(Ordering::Relaxed) > 0;
        if failures < policy.failures && !on_probation {
            return None;
        }
        let level = self.level.load(Ordering::Relaxed) + 1;
        let d = jitter(policy.cooldown.saturating_mul(1 << (level - 1).min(16))).min(policy.max_cooldown);
        // Only the thread that moves the deadline starts the cool-down.
        let new_until = now + d.as_millis() as u64;
        if self.cooldown_until_ms.compare_exchange(until, new_until, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return None;
        }
        self.level.store(level, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.cooldowns.fetch_add(1, Ordering::Relaxed);
        Some(d)
    }

    /// Takes the endpoint or credential out for `d` (a 429's `retry-after`, say), without
    /// touching the failure count.
    pub fn cool_down(&self, d: Duration) {
        self.cooldown_until_ms.fetch_max(now_ms() + d.as_millis() as u64, Ordering::Relaxed);
        self.cooldowns.fetch_add(1, Ordering::Relaxed);
    }
}

/// ±20%, so endpoints that failed together do not come back together.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + rand::random::<f64>() * 0.4)
}

/// The active probe: a TCP (and TLS) connect, or an unauthenticated `GET` whose answer, any
/// answer, shows the endpoint is up. Neither sends a Messages request nor spends a token.
pub struct Probe {
    pub kind: ProbeKind,
    pub path: String,
    pub connector: Connector,
    pub threshold: usize,
    pub provider: String,
}

#[async_trait]
impl HealthCheck for Probe {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let Some(endpoint) = target.ext.get::<EndpointRef>() else {
            return Ok(());
        };
        let peer = endpoint.0.peer().map_err(|e| pingora::Error::explain(pingora::ErrorType::ConnectError, e))?;
        let (mut session, _) = self.connector.session(&peer).await?;
        if self.kind == ProbeKind::Tcp {
            // Connected (and TLS handshaken): that is the whole check.
            return Ok(());
        }
        let path = format!("{}{}", endpoint.0.url.path_prefix, self.path);
        let mut req = RequestHeader::build("GET", path.as_bytes(), Some(2))?;
        req.insert_header(http::header::HOST, endpoint.0.host_header.clone())?;
        req.insert_header(http::header::USER_AGENT, "tollgate-health")?;
        session.set_read_timeout(Some(Duration::from_secs(5)));
        session.write_request_header(Box::new(req)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        Ok(())
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        if let Some(e) = target.ext.get::<EndpointRef>() {
            tracing::warn!(provider = %self.provider, endpoint = %e.0.label, up = healthy, "probe changed an endpoint's state");
        }
    }

    fn health_threshold(&self, _success: bool) -> usize {
        self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldown_after_n_failures_grows_and_resets() {
        let p = HealthPolicy { failures: 3, cooldown: Duration::from_secs(10), max_cooldown: Duration::from_secs(25) };
        let h = PassiveHealth::default();
        assert_eq!(h.failure(&p), None);
        assert_eq!(h.failure(&p), None);
        let first = h.failure(&p).unwrap();
        assert!(first >= Duration::from_secs(8) && first <= Duration::from_secs(12), "{first:?}");
        assert!(!h.available(now_ms()));
        // Back on probation (simulate the cool-down ending): one failure is enough, and the
        // cool-down doubles, capped.
        h.cooldown_until_ms.store(0, Ordering::Relaxed);
        let second = h.failure(&p).unwrap();
        assert!(second >= Duration::from_secs(16) && second <= Duration::from_secs(24), "{second:?}");
        h.success();
        assert!(h.available(now_ms()), "a success ends a failure cool-down");
        assert_eq!(h.consecutive_failures(), 0);
        assert_eq!(h.failure(&p), None, "and probation");
    }

    #[test]
    fn failures_during_a_cooldown_do_not_escalate_it() {
        let p = HealthPolicy { failures: 1, cooldown: Duration::from_secs(10), max_cooldown: Duration::from_secs(300) };
        let h = PassiveHealth::default();
        let first = h.failure(&p).unwrap();
        for _ in 0..8 {
            assert_eq!(h.failure(&p), None, "requests already in flight fail too");
        }
        assert!(first <= Duration::from_secs(12));
        assert_eq!(h.cooldowns(), 1);
        assert!(h.cooling_down_for(now_ms()).unwrap() <= Duration::from_secs(12));
    }
}
