//! How provider traffic leaves the host: directly, or through a corporate HTTP proxy that
//! tunnels with `CONNECT`. Pingora connects to upstream peers itself and has no TCP proxy of
//! its own, so a tunnelled endpoint's peer carries a [`Tunnel`] as its L4 connector: Pingora
//! dials the proxy through it and does the provider's TLS handshake inside the tunnel, exactly
//! as it would on a direct connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::Engine;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{EgressConfig, ProviderConfig, ProxyUrl, SecretRef};

/// A proxy's answer to `CONNECT` longer than this is refused (real ones are a few lines).
const MAX_CONNECT_ANSWER: usize = 16 << 10;

/// One provider's way out: a proxy (or none) and the hosts that bypass it.
#[derive(Debug)]
pub struct Egress {
    proxy: ProxyUrl,
    /// Taken from `HTTPS_PROXY` rather than the config: then, as the variable's name says and
    /// as Go's HTTP client does, only `https` endpoints go through it, and loopback never.
    from_env: bool,
    no_proxy: Vec<NoProxy>,
    /// Where `Proxy-Authorization` comes from: a secret reference (re-read on reload), or the
    /// credentials in `HTTPS_PROXY` itself.
    auth: ProxyAuth,
    authorization: ArcSwapOption<http::HeaderValue>,
}

enum ProxyAuth {
    None,
    Secret(SecretRef),
    FromUrl(String),
}

impl std::fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyAuth::None => f.write_str("None"),
            ProxyAuth::Secret(r) => write!(f, "Secret({r})"),
            ProxyAuth::FromUrl(_) => f.write_str("FromUrl(<redacted>)"),
        }
    }
}

impl Egress {
    /// The egress of provider `p`: its own `proxy` (or `direct`), else `[egress].proxy`, else
    /// `HTTPS_PROXY`. `None` when its traffic goes out directly.
    pub fn for_provider(global: &EgressConfig, p: &ProviderConfig) -> Result<Option<Arc<Egress>>, String> {
        let env = |names: [&str; 2]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()));
        let (proxy, auth, from_env) = match (&p.proxy, &global.proxy) {
            (Some(d), _) if d == "direct" => return Ok(None),
            // A provider's own proxy gets only its own credentials, never the global proxy's.
            (Some(url), _) => (ProxyUrl::parse(url)?, p.proxy_auth.clone(), false),
            (None, Some(url)) => (ProxyUrl::parse(url)?, global.proxy_auth.clone(), false),
            (None, None) => match env(["HTTPS_PROXY", "https_proxy"]) {
                Some(url) => {
                    let proxy = ProxyUrl::parse_env(&url).map_err(|e| format!("HTTPS_PROXY: {e}"))?;
                    (proxy, global.proxy_auth.clone(), true)
                }
                None => return Ok(None),
            },
        };
        let auth = match (auth, &proxy.userinfo) {
            (Some(secret), _) => ProxyAuth::Secret(secret),
            (None, Some(userinfo)) => ProxyAuth::FromUrl(userinfo.clone()),
            (None, None) => ProxyAuth::None,
        };
        let no_proxy = match &global.no_proxy {
            Some(list) => list.iter().map(|s| NoProxy::parse(s)).collect(),
            None => env(["NO_PROXY", "no_proxy"]).map_or_else(Vec::new, |v| v.split(',').map(NoProxy::parse).collect()),
        };
        let egress = Egress { proxy, from_env, no_proxy, auth, authorization: ArcSwapOption::empty() };
        egress.read_auth()?;
        Ok(Some(Arc::new(egress)))
    }

    pub fn proxy(&self) -> &ProxyUrl {
        &self.proxy
    }

    /// Whether connections to `host` go through the proxy: not named by `no_proxy`, and, for
    /// a proxy from `HTTPS_PROXY`, an `https` endpoint off the loopback.
    pub fn tunnels(&self, host: &str, tls: bool) -> bool {
        if self.from_env && (!tls || is_loopback(host)) {
            return false;
        }
        !self.no_proxy.iter().any(|n| n.matches(host))
    }

    /// Reads the proxy credentials again (start-up and reload); on failure the ones held stay.
    pub fn read_auth(&self) -> Result<(), String> {
        let userinfo = match &self.auth {
            ProxyAuth::None => return Ok(()),
            ProxyAuth::Secret(r) => r.resolve().map_err(|e| format!("proxy_auth: {e}"))?.expose().to_string(),
            ProxyAuth::FromUrl(u) => u.clone(),
        };
        if !userinfo.contains(':') {
            return Err("proxy_auth must hold user:password".into());
        }
        let encoded = base64::engine::general_purpose::STANDARD.encode(userinfo.as_bytes());
        let mut value = http::HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|e| e.to_string())?;
        value.set_sensitive(true);
        self.authorization.store(Some(Arc::new(value)));
        Ok(())
    }
}

/// One `NO_PROXY` entry.
#[derive(Debug)]
enum NoProxy {
    All,
    /// `example.com` or `.example.com`: the domain and every subdomain.
    Domain(String),
    Net(IpAddr, u8),
}

impl NoProxy {
    fn parse(s: &str) -> NoProxy {
        let s = s.trim().to_ascii_lowercase();
        if s == "*" {
            return NoProxy::All;
        }
        if let Some((ip, bits)) = s.split_once('/') {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            if let (Ok(ip), Ok(bits)) = (ip.parse::<IpAddr>(), bits.parse::<u8>()) {
                return NoProxy::Net(ip, bits);
            }
        }
        // `[::1]:443`, `[::1]`, `::1`, `10.0.0.1:443`: a port is ignored, as curl does.
        let without_port = match s.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or_default().to_string(),
            None if s.matches(':').count() == 1 => s.split(':').next().unwrap_or_default().to_string(),
            None => s.clone(),
        };
        if let Ok(ip) = without_port.parse::<IpAddr>() {
            return NoProxy::Net(ip, if ip.is_ipv4() { 32 } else { 128 });
        }
        // `.example.com`, `*.example.com` and `example.com` all mean the domain and below.
        let name = without_port.trim_start_matches('*').trim_start_matches('.').trim_end_matches('.');
        NoProxy::Domain(name.to_string())
    }

    fn matches(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
        match self {
            NoProxy::All => true,
            NoProxy::Domain(d) => !d.is_empty() && (host == *d || host.ends_with(&format!(".{d}"))),
            NoProxy::Net(net, bits) => host.parse::<IpAddr>().is_ok_and(|ip| in_net(ip, *net, *bits)),
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let bits = bits.min(32) as u32;
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let bits = bits.min(128) as u32;
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Pingora's L4 connector for one tunnelled endpoint: dials the proxy (at the address the
/// endpoint resolved for it) and asks it to `CONNECT` to the endpoint.
#[derive(Debug)]
pub struct Tunnel {
    egress: Arc<Egress>,
    /// `host:port` of the endpoint, as the proxy is asked to reach it (it resolves the name).
    target: String,
    timeout: Duration,
}

impl Tunnel {
    pub fn new(egress: Arc<Egress>, host: &str, port: u16, timeout: Duration) -> Self {
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        Tunnel { egress, target: format!("{host}:{port}"), timeout }
    }

    pub fn proxy_host(&self) -> &str {
        &self.egress.proxy.host
    }

    pub fn proxy_port(&self) -> u16 {
        self.egress.proxy.port
    }

    async fn open(&self, addr: std::net::SocketAddr) -> Result<TcpStream, String> {
        let proxy = self.egress.proxy.label();
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| format!("egress proxy {proxy}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut ask = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n", t = self.target);
        if let Some(auth) = self.egress.authorization.load().as_ref() {
            ask.push_str("Proxy-Authorization: ");
            ask.push_str(auth.to_str().unwrap_or_default());
            ask.push_str("\r\n");
        }
        ask.push_str("\r\n");
        tcp.write_all(ask.as_bytes()).await.map_err(|e| format!("egress proxy {proxy}: {e}"))?;
        // Read the answer's head byte by byte: a byte past it belongs to the tunnel (the
        // provider speaks only after the TLS client hello, so there is none in practice).
        let mut head = Vec::with_capacity(256);
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_CONNECT_ANSWER {
                return Err(format!("egress proxy {proxy}: its answer to CONNECT is too long"));
            }
            let b = tcp.read_u8().await.map_err(|e| format!("egress proxy {proxy} closed the tunnel: {e}"))?;
            head.push(b);
        }
        let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let status = match (words.next(), words.next()) {
            (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
            _ => None,
        };
        // Only the status is repeated: the proxy's words are not passed on to clients.
        match status {
            Some(200..=299) => Ok(tcp),
            Some(407) => Err(format!("egress proxy {proxy} wants credentials (407): set or check proxy_auth")),
            Some(code) => Err(format!("egress proxy {proxy} refused CONNECT {} with {code}", self.target)),
            None => Err(format!("egress proxy {proxy} did not answer CONNECT in HTTP")),
        }
    }
}

#[async_trait::async_trait]
impl L4Connect for Tunnel {
    async fn connect(&self, addr: &SocketAddr) -> pingora::Result<Stream> {
        let inet = *addr.as_inet().ok_or_else(|| Error::explain(ErrorType::ConnectProxyFailure, "not an IP proxy"))?;
        match tokio::time::timeout(self.timeout, self.open(inet)).await {
            Ok(Ok(tcp)) => Ok(Stream::from(tcp)),
            Ok(Err(why)) => Err(Error::explain(ErrorType::ConnectProxyFailure, why)),
            Err(_) => Err(Error::explain(
                ErrorType::ConnectTimedout,
                format!("egress proxy {}: no tunnel within {:?}", self.egress.proxy.label(), self.timeout),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_entries() {
        let np = |s: &str, host: &str| NoProxy::parse(s).matches(host);
        assert!(np("*", "anything"));
        assert!(np(".internal", "metadata.internal"));
        assert!(np("internal", "a.b.internal"));
        assert!(np("example.com", "example.com"));
        assert!(!np("example.com", "notexample.com"));
        assert!(np("10.0.0.0/8", "10.1.2.3"));
        assert!(!np("10.0.0.0/8", "11.0.0.1"));
        assert!(np("169.254.169.254", "169.254.169.254"));
        assert!(np("::1", "[::1]"));
        assert!(np("Example.COM:443", "api.example.com"));
        assert!(np("*.example.com", "api.example.com"));
        assert!(np("example.com.", "example.com"));
        assert!(np("example.com", "example.com."));
        assert!(np("[::1]:443", "::1"));
        assert!(np("[fd00::]/8", "fd12::1"));
        assert!(np("10.0.0.1:443", "10.0.0.1"));
        assert!(!np("", "example.com"));
    }

    #[test]
    fn loopback() {
        assert!(is_loopback("localhost") && is_loopback("api.localhost") && is_loopback("127.0.0.9"));
        assert!(is_loopback("[::1]") && !is_loopback("10.0.0.1") && !is_loopback("localhost.corp"));
    }
}
