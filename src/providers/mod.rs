//! Upstream providers at run time: where they are (resolved in the background, never on a
//! worker), how to reach them (a ready-made Pingora peer) and the credential to present.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use http::HeaderValue;
use pingora::protocols::tls::CaType;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::WrappedX509;

use crate::config::{ProviderConfig, ProviderKind};

mod url;
pub use url::UpstreamUrl;

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub url: UpstreamUrl,
    /// `Host` for upstream requests.
    pub host_header: HeaderValue,
    /// The header that carries the credential, or why there is none.
    credential: Result<(http::HeaderName, HeaderValue), String>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub dns_refresh: Duration,
    ca: Option<Arc<CaType>>,
    peer: ArcSwapOption<HttpPeer>,
    /// The last resolution failure, for `/readyz` and error messages.
    dns_error: ArcSwap<Option<String>>,
}

impl Provider {
    /// Builds the provider and resolves its credential. Name resolution is left to
    /// [`Provider::resolve_blocking`] (start-up) and the background refresher.
    pub fn from_config(c: &ProviderConfig) -> Result<Self, String> {
        let url = UpstreamUrl::parse(c.base_url.get_ref())?;
        let host_header = HeaderValue::from_str(&url.host_header()).map_err(|e| format!("base_url host: {e}"))?;
        let credential = c.credential.get_ref().resolve().and_then(|secret| {
            let (name, value) = match c.kind {
                ProviderKind::Anthropic => (http::HeaderName::from_static("x-api-key"), secret.expose().to_string()),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                format!("credential {} holds characters not allowed in a header", c.credential.get_ref())
            })?;
            value.set_sensitive(true);
            Ok((name, value))
        });
        let ca = match &c.ca_file {
            Some(path) => Some(load_ca(path)?),
            None => None,
        };
        let provider = Provider {
            name: c.name.get_ref().clone(),
            kind: c.kind,
            url,
            host_header,
            credential,
            connect_timeout: c.connect_timeout,
            first_byte_timeout: c.first_byte_timeout,
            idle_timeout: c.idle_timeout,
            pool_idle_timeout: c.pool_idle_timeout,
            dns_refresh: c.dns_refresh,
            ca,
            peer: ArcSwapOption::empty(),
            dns_error: ArcSwap::from_pointee(None),
        };
        if let Ok(ip) = provider.url.host.parse::<IpAddr>() {
            provider.set_address(SocketAddr::new(ip, provider.url.port));
        }
        Ok(provider)
    }

    pub fn credential(&self) -> Result<&(http::HeaderName, HeaderValue), &str> {
        self.credential.as_ref().map_err(|e| e.as_str())
    }

    /// A peer for the current address, or why there is none yet.
    pub fn peer(&self) -> Result<Arc<HttpPeer>, String> {
        self.peer.load_full().ok_or_else(|| match &**self.dns_error.load() {
            Some(e) => format!("cannot resolve {}: {e}", self.url.host),
            None => format!("{} is not resolved yet", self.url.host),
        })
    }

    /// Why this provider cannot take traffic, if it cannot.
    pub fn unready_reason(&self) -> Option<String> {
        if let Err(e) = &self.credential {
            return Some(format!("provider {}: no credential: {e}", self.name));
        }
        self.peer().err().map(|e| format!("provider {}: {e}", self.name))
    }

    fn needs_dns(&self) -> bool {
        self.url.host.parse::<IpAddr>().is_err()
    }

    fn set_address(&self, addr: SocketAddr) {
        if self
            .peer
            .load()
            .as_ref()
            .is_some_and(|p| p._address == pingora::protocols::l4::socket::SocketAddr::Inet(addr))
        {
            return;
        }
        let mut peer = HttpPeer::new(addr, self.url.tls, self.url.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.connect_timeout);
        // TCP and TLS together.
        o.total_connection_timeout = Some(self.connect_timeout * 2);
        o.idle_timeout = Some(self.pool_idle_timeout);
        // Keep NAT and load-balancer state alive while a long answer is being generated.
        o.tcp_keepalive = Some(pingora::protocols::TcpKeepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 6,
            #[cfg(target_os = "linux")]
            user_timeout: Duration::ZERO,
        });
        o.ca = self.ca.clone();
        self.peer.store(Some(Arc::new(peer)));
        self.dns_error.store(Arc::new(None));
    }

    /// Resolves the host once, blocking: for start-up, before any worker runs.
    pub fn resolve_blocking(&self) {
        if !self.needs_dns() {
            return;
        }
        match (self.url.host.as_str(), self.url.port).to_socket_addrs() {
            Ok(addrs) => match pick(addrs) {
                Some(a) => self.set_address(a),
                None => self.dns_error.store(Arc::new(Some("no addresses".into()))),
            },
            Err(e) => self.dns_error.store(Arc::new(Some(e.to_string()))),
        }
    }

    async fn resolve(&self) {
        match tokio::net::lookup_host((self.url.host.as_str(), self.url.port)).await {
            Ok(addrs) => match pick(addrs) {
                Some(a) => self.set_address(a),
                None => self.dns_error.store(Arc::new(Some("no addresses".into()))),
            },
            Err(e) => {
                // Keep the last good address: a failed lookup is no reason to stop serving.
                tracing::warn!(provider = %self.name, host = %self.url.host, error = %e, "DNS refresh failed");
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

fn load_ca(path: &std::path::Path) -> Result<Arc<CaType>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for der in rustls_pemfile::certs(&mut &pem[..]) {
        let der = der.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        // Pingora's wrapper panics on a certificate it cannot parse: check first.
        x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("ca_file {}: not a valid certificate: {e}", path.display()))?;
        certs.push(WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509));
    }
    if certs.is_empty() {
        return Err(format!("ca_file {} holds no certificates", path.display()));
    }
    Ok(Arc::from(certs.into_boxed_slice()))
}

/// Re-resolves provider host names in the background.
pub struct DnsRefresher {
    pub providers: Vec<Arc<Provider>>,
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let targets: Vec<_> = self.providers.iter().filter(|p| p.needs_dns()).cloned().collect();
        if targets.is_empty() {
            return;
        }
        let period = targets.iter().map(|p| p.dns_refresh).min().unwrap_or(Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {
                    for p in &targets {
                        p.resolve().await;
                    }
                }
            }
        }
    }
}
