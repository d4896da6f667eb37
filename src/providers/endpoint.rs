//! One endpoint of a provider: a base URL, its current address and ready-made Pingora peer, and
//! its health.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;

use super::egress::{Egress, Tunnel};
use super::health::PassiveHealth;
use super::UpstreamUrl;

/// What a peer needs besides the address.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub ca: Option<Arc<CaType>>,
    /// The provider's egress proxy, if its traffic goes through one.
    pub egress: Option<Arc<Egress>>,
}

#[derive(Debug)]
pub struct Endpoint {
    /// Position in the provider's list: stable, used in records and labels.
    pub index: usize,
    pub url: UpstreamUrl,
    /// `Host` for upstream requests.
    pub host_header: HeaderValue,
    /// `host[:port]`: how records, metrics and `/status` name the endpoint.
    pub label: String,
    pub weight: usize,
    pub passive: PassiveHealth,
    /// Requests being sent or streamed through this endpoint now.
    pub in_flight: AtomicUsize,
    settings: PeerSettings,
    /// Set when this endpoint is reached through the egress proxy: then the address resolved
    /// and connected to is the proxy's.
    tunnel: Option<Arc<Tunnel>>,
    peer: ArcSwapOption<HttpPeer>,
    /// The last resolution failure, for `/readyz`, `/status` and error messages.
    dns_error: ArcSwap<Option<String>>,
}

/// How a Pingora `Backend` points back at its endpoint (in its `ext`).
#[derive(Debug, Clone)]
pub struct EndpointRef(pub Arc<Endpoint>);

impl Endpoint {
    pub fn new(index: usize, url: UpstreamUrl, weight: usize, settings: PeerSettings) -> Result<Self, String> {
        let label = url.host_header();
        let host_header = HeaderValue::from_str(&label).map_err(|e| format!("endpoint host: {e}"))?;
        let tunnel = settings.egress.as_ref().filter(|g| g.tunnels(&url.host, url.tls)).map(|g| {
            // Connecting includes the CONNECT exchange: give it the TCP connect's time again.
            Arc::new(Tunnel::new(g.clone(), &url.host, url.port, settings.connect_timeout * 2))
        });
        let e = Endpoint {
            index,
            url,
            host_header,
            label,
            weight: weight.max(1),
            passive: PassiveHealth::default(),
            in_flight: AtomicUsize::new(0),
            settings,
            tunnel,
            peer: ArcSwapOption::empty(),
            dns_error: ArcSwap::from_pointee(None),
        };
        let (host, port) = e.dial();
        if let Ok(ip) = host.parse::<IpAddr>() {
            e.set_address(SocketAddr::new(ip, port));
        }
        Ok(e)
    }

    /// A peer for the current address, or why there is none yet.
    pub fn peer(&self) -> Result<Arc<HttpPeer>, String> {
        self.peer.load_full().ok_or_else(|| match &**self.dns_error.load() {
            Some(e) => format!("cannot resolve {}: {e}", self.dial().0),
            None => format!("{} is not resolved yet", self.dial().0),
        })
    }

    pub fn address(&self) -> Option<SocketAddr> {
        self.peer.load().as_ref().and_then(|p| p._address.as_inet().copied())
    }

    pub fn dns_error(&self) -> Option<String> {
        (**self.dns_error.load()).clone()
    }

    pub fn needs_dns(&self) -> bool {
        self.dial().0.parse::<IpAddr>().is_err()
    }

    /// Whether this endpoint is reached through the egress proxy.
    pub fn tunnelled(&self) -> bool {
        self.tunnel.is_some()
    }

    /// The host and port connected to: the endpoint's own, or its proxy's (which resolves the
    /// endpoint's name itself: a host behind a proxy often cannot).
    fn dial(&self) -> (&str, u16) {
        match &self.tunnel {
            Some(t) => (t.proxy_host(), t.proxy_port()),
            None => (&self.url.host, self.url.port),
        }
    }

    fn set_address(&self, addr: SocketAddr) {
        if self.address() == Some(addr) {
            return;
        }
        let mut peer = HttpPeer::new(addr, self.url.tls, self.url.host.clone());
        let o = &mut peer.options;
        // HTTP/1.1 only, said outright: the provider connector is Pingora's HTTP/1 one, which
        // would speak HTTP/1 on a connection a server had agreed to run as h2.
        o.alpn = pingora::protocols::ALPN::H1;
        o.connection_timeout = Some(self.settings.connect_timeout);
        // TCP and TLS together.
        o.total_connection_timeout = Some(self.settings.connect_timeout * 2);
        o.idle_timeout = Some(self.settings.pool_idle_timeout);
        // Keep NAT and load-balancer state alive while a long answer is being generated.
        o.tcp_keepalive = Some(pingora::protocols::TcpKeepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 6,
            #[cfg(target_os = "linux")]
            user_timeout: Duration::ZERO,
        });
        o.ca = self.settings.ca.clone();
        if let Some(t) = &self.tunnel {
            o.custom_l4 = Some(t.clone());
            // Every tunnelled peer has the proxy's address: keep their pooled connections
            // apart by the endpoint each one reaches.
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&self.url.host, self.url.port).hash(&mut h);
            peer.group_key = h.finish();
        }
        self.peer.store(Some(Arc::new(peer)));
        self.dns_error.store(Arc::new(None));
    }

    /// Resolves the host once, blocking: for start-up, before any worker runs.
    pub fn resolve_blocking(&self) {
        if self.needs_dns() {
            let result = self.dial().to_socket_addrs().map(pick);
            self.apply(result);
        }
    }

    /// Resolves the host again, in the background.
    pub async fn resolve(&self) {
        if self.needs_dns() {
            let result = tokio::net::lookup_host(self.dial()).await.map(pick);
            self.apply(result);
        }
    }

    fn apply(&self, result: std::io::Result<Option<SocketAddr>>) {
        match result {
            Ok(Some(a)) => self.set_address(a),
            Ok(None) => self.dns_error.store(Arc::new(Some("no addresses".into()))),
            // Keep the last good address: a failed lookup is no reason to stop serving.
            Err(e) => {
                tracing::warn!(host = %self.dial().0, error = %e, "DNS lookup failed");
                self.dns_error.store(Arc::new(Some(e.to_string())));
            }
        }
    }
}

/// One address to connect to: the first IPv4 one when there is one (a gateway host without
/// IPv6 routes would otherwise fail on an AAAA answer), else the first.
fn pick(addrs: impl Iterator<Item = SocketAddr>) -> Option<SocketAddr> {
    let all: Vec<SocketAddr> = addrs.collect();
    all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
}
