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
}
