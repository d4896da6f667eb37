/// A provider's base URL, split into what a connection and a request line need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path before the API path, without a trailing slash ("" or "/proxy").
    pub path_prefix: String,
}

impl UpstreamUrl {
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("base_url {s:?} must start with https:// or http://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(format!("base_url {s:?} must not have a query or fragment"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(|| format!("base_url {s:?}: unclosed IPv6 bracket"))?;
            let port = match &v6[end + 1..] {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("base_url {s:?}: bad port"))?,
            };
            (v6[..end].to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("base_url {s:?}: bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || host.contains('@') {
            return Err(format!("base_url {s:?} needs a host (and no user info)"));
        }
        Ok(UpstreamUrl { tls, host, port, path_prefix: path.trim_end_matches('/').to_string() })
    }

    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// An egress proxy: `http://host[:port]` (port 80 if unset). The proxy is spoken to in plain
/// HTTP and asked to `CONNECT`; what goes through the tunnel is the provider's own TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    /// `user:password` found in the URL itself (only accepted from `HTTPS_PROXY`: a config
    /// file holds secret references, never secrets).
    pub userinfo: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = if self.userinfo.is_some() { "<redacted>@" } else { "" };
        write!(f, "ProxyUrl(http://{auth}{})", self.label())
    }
}

impl ProxyUrl {
    /// A proxy URL from the config: no credentials in it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let p = Self::parse_env(s)?;
        if p.userinfo.is_some() {
            return Err("the proxy URL holds credentials: give them as proxy_auth (a secret reference)".into());
        }
        Ok(p)
    }

    /// A proxy URL from `HTTPS_PROXY`, which may carry `user:password@` (percent-encoded).
    pub fn parse_env(s: &str) -> Result<Self, String> {
        let rest = s.trim().strip_prefix("http://").ok_or_else(|| {
            "the proxy must be an http:// URL (Tollgate speaks plain HTTP to it and tunnels TLS with CONNECT)"
                .to_string()
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') || authority.contains('?') {
            return Err("the proxy URL takes no path".into());
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(percent_decode(u)), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, rest) = v6.split_once(']').ok_or("unclosed [ in the proxy host")?;
            (h.to_string(), rest.strip_prefix(':'))
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err("the proxy URL has no host".into());
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| format!("proxy port {p:?} is not a port number"))?,
            None => 80,
        };
        Ok(ProxyUrl { host, port, userinfo })
    }

    /// `host:port` as the proxy is named in logs and errors.
    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u = UpstreamUrl::parse("https://api.anthropic.com").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path_prefix.as_str()), (true, "api.anthropic.com", 443, ""));
        assert_eq!(u.host_header(), "api.anthropic.com");
        let u = UpstreamUrl::parse("http://127.0.0.1:9000/prefix/").unwrap();
        assert_eq!((u.port, u.path_prefix.as_str()), (9000, "/prefix"));
        assert_eq!(u.host_header(), "127.0.0.1:9000");
        assert!(UpstreamUrl::parse("ftp://x").is_err());
        assert!(UpstreamUrl::parse("https://").is_err());
    }

    #[test]
    fn proxy_urls() {
        let p = ProxyUrl::parse("http://proxy.corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.userinfo), ("proxy.corp", 3128, None));
        assert_eq!(ProxyUrl::parse("http://10.0.0.1/").unwrap().port, 80);
        assert_eq!(ProxyUrl::parse("http://[::1]:8080").unwrap().label(), "[::1]:8080");
        assert!(ProxyUrl::parse("https://proxy:3128").is_err());
        assert!(ProxyUrl::parse("http://u:p@proxy:3128").is_err(), "no literal credentials in the config");
        let e = ProxyUrl::parse_env("http://svc%40corp:p%3Ass@proxy:3128").unwrap();
        assert_eq!(e.userinfo.as_deref(), Some("svc@corp:p:ss"));
        assert!(ProxyUrl::parse("http://proxy:99999").is_err());
        assert!(ProxyUrl::parse("http://proxy:3128/path").is_err());
    }
}
