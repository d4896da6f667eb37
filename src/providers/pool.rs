//! A provider's endpoints as a Pingora `LoadBalancer`: discovery resolves host names in the
//! background, the active probe runs on its own schedule, and selection skips endpoints that
//! are down, cooling down, or already tried by this request.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::services::background::GenBackgroundService;
use pingora::services::ServiceWithDependents;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::HealthCheck;
use pingora_load_balancing::selection::{BackendIter, BackendSelection, Consistent, RoundRobin};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};

use super::endpoint::{Endpoint, EndpointRef};

pub use crate::config::Selection;

/// Turns the endpoint list into Pingora backends, resolving names as it goes.
struct Discovery {
    endpoints: Vec<Arc<Endpoint>>,
    weighted: bool,
}

#[async_trait]
impl ServiceDiscovery for Discovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut set = BTreeSet::new();
        for e in &self.endpoints {
            e.resolve().await;
            if e.address().is_some() {
                // The backend's identity is the endpoint, not its current IP: two endpoints on
                // one address stay two, and a DNS change neither reshuffles session affinity
                // nor resets probe state. Connections use the endpoint's own peer.
                let mut b = Backend { addr: PingoraAddr::Inet(identity(e.index)), weight: 1, ext: Default::default() };
                if self.weighted {
                    b.weight = e.weight;
                }
                b.ext.insert(EndpointRef(e.clone()));
                set.insert(b);
            }
        }
        Ok((set, HashMap::new()))
    }
}

/// A stand-in address that names endpoint `index` for Pingora's balancer.
fn identity(index: usize) -> std::net::SocketAddr {
    let i = index as u32;
    std::net::SocketAddr::from(([0, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1))
}

pub enum Balancer {
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    Consistent(Arc<LoadBalancer<Consistent>>),
}

pub struct Pool {
    pub selection: Selection,
    pub balancer: Balancer,
    /// Spreads requests that have no session key, and ties under least-in-flight.
    turn: std::sync::atomic::AtomicUsize,
}

fn endpoint(b: &Backend) -> Option<&Arc<Endpoint>> {
    b.ext.get::<EndpointRef>().map(|r| &r.0)
}

/// What the pool's background service does, and how often.
pub struct Schedule {
    pub probe: Option<Box<dyn HealthCheck + Send + Sync>>,
    pub probe_interval: Duration,
    pub dns_refresh: Duration,
}

fn balancer<S>(endpoints: &[Arc<Endpoint>], weighted: bool, schedule: Schedule) -> Arc<LoadBalancer<S>>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    let mut backends = Backends::new(Box::new(Discovery { endpoints: endpoints.to_vec(), weighted }));
    if let Some(probe) = schedule.probe {
        backends.set_health_check(probe);
    }
    let mut lb = LoadBalancer::from_backends(backends);
    // One unreachable endpoint must not delay every other probe.
    lb.parallel_health_check = true;
    lb.health_check_frequency = Some(schedule.probe_interval);
    lb.update_frequency = Some(schedule.dns_refresh);
    Arc::new(lb)
}

impl Pool {
    pub fn new(endpoints: &[Arc<Endpoint>], selection: Selection, schedule: Schedule) -> Self {
        let weighted = selection == Selection::Weighted;
        let balancer = match selection {
            Selection::SessionAffinity => Balancer::Consistent(balancer(endpoints, weighted, schedule)),
            _ => Balancer::RoundRobin(balancer(endpoints, weighted, schedule)),
        };
        Pool { selection, balancer, turn: Default::default() }
    }

    /// The background service that keeps addresses and probe results fresh.
    pub fn service(&self, name: &str) -> Box<dyn ServiceWithDependents> {
        let name = format!("tollgate-pool-{name}");
        match &self.balancer {
            Balancer::RoundRobin(lb) => Box::new(GenBackgroundService::new(name, lb.clone())),
            Balancer::Consistent(lb) => Box::new(GenBackgroundService::new(name, lb.clone())),
        }
    }

    fn backends(&self) -> &Backends {
        match &self.balancer {
            Balancer::RoundRobin(lb) => lb.backends(),
            Balancer::Consistent(lb) => lb.backends(),
        }
    }

    /// Runs discovery now (start-up, tests).
    pub async fn update(&self) {
        let r = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.update().await,
            Balancer::Consistent(lb) => lb.update().await,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "endpoint discovery failed");
        }
    }

    /// Whether the active probe considers the endpoint up (always, without a probe).
    pub fn probed_healthy(&self, e: &Endpoint) -> bool {
        self.backends()
            .get_backend()
            .iter()
            .filter(|b| endpoint(b).is_some_and(|x| x.index == e.index))
            .all(|b| self.backends().ready(b))
    }

    /// An endpoint for this request: up, not cooling down, not in `tried`. `key` picks the
    /// endpoint for session affinity. With `last_resort`, health is ignored: better to try an
    /// endpoint that may be down than to refuse a request nobody else can serve.
    pub fn select(&self, key: &[u8], tried: &[usize], now_ms: u64, last_resort: bool) -> Option<Arc<Endpoint>> {
        let accept = |b: &Backend, healthy: bool| {
            endpoint(b)
                .is_some_and(|e| !tried.contains(&e.index) && (last_resort || (healthy && e.passive.available(now_ms))))
        };
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let chosen = match (&self.balancer, self.selection) {
            (_, Selection::LeastInFlight) => {
                let backends = self.backends();
                let all = backends.get_backend();
                let n = all.len().max(1);
                // Fewest in flight; ties go round, not always to the first endpoint.
                all.iter()
                    .enumerate()
                    .filter(|(_, b)| accept(b, backends.ready(b)))
                    .min_by_key(|(i, b)| {
                        (
                            endpoint(b).map_or(usize::MAX, |e| e.in_flight.load(Ordering::Relaxed)),
                            (i + n - turn % n) % n,
                        )
                    })
                    .map(|(_, b)| b.clone())
            }
            // No session to keep together: spread such requests instead of hashing them all
            // to one endpoint.
            (Balancer::Consistent(lb), _) if key.is_empty() => lb.select_with(&turn.to_le_bytes(), 256, accept),
            (Balancer::RoundRobin(lb), _) => lb.select_with(key, 256, accept),
            (Balancer::Consistent(lb), _) => lb.select_with(key, 256, accept),
        };
        chosen.as_ref().and_then(endpoint).cloned()
    }
}
