//! Reading the file and checking what serde cannot: addresses, references between tables,
//! duplicates. Every error carries the place in the file it is about.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use super::Config;
use super::ProviderKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error is about the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read the config file: {e}"),
    })?;
    load_str(&text, &file)
}

/// Parses and validates config text; `file` names it in errors.
pub fn load_str(text: &str, file: &str) -> Result<Config, ConfigError> {
    let at = |span: Option<Range<usize>>, message: String| {
        let (line, column) = span.map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        ConfigError { file: file.to_string(), line, column, message }
    };
    let config: Config = toml::from_str(text).map_err(|e| at(e.span(), e.message().to_string()))?;
    validate(&config).map_err(|(span, msg)| at(Some(span), msg))?;
    Ok(config)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}

type Invalid = (Range<usize>, String);

fn validate(c: &Config) -> Result<(), Invalid> {
    if c.listeners.is_empty() {
        return Err((0..0, "at least one [[listener]] is needed".into()));
    }
    let mut addresses = HashSet::new();
    let admin = c.admin.iter().map(|a| &a.address);
    for addr in c.listeners.iter().map(|l| &l.address).chain(admin) {
        let parsed: SocketAddr = addr
            .get_ref()
            .parse()
            .map_err(|_| (addr.span(), format!("{:?} is not an IP:port address", addr.get_ref())))?;
        if !addresses.insert(parsed) {
            return Err((addr.span(), format!("address {parsed} is used twice")));
        }
    }
    if c.server.threads == 0 {
        return Err((0..0, "server.threads must be at least 1".into()));
    }
    // Below about 1 KiB no real client's head fits (Claude Code's are 1 to 2 KiB).
    // Above Pingora's own limits (1 MiB, 256 lines) Pingora would refuse first, with an empty 400.
    if !(1024..=1 << 20).contains(&c.server.max_header_bytes) || !(16..=256).contains(&c.server.max_headers) {
        return Err((
            0..0,
            "server.max_header_bytes must be from 1024 to 1048576, and server.max_headers from 16 to 256".into(),
        ));
    }
    if let Some(l) = c.listeners.iter().find(|l| l.max_connections == 0) {
        return Err((l.address.span(), "max_connections must be at least 1".into()));
    }

    let mut providers = HashSet::new();
    for p in &c.providers {
        if !providers.insert(p.name.get_ref().as_str()) {
            return Err((p.name.span(), format!("provider {:?} is defined twice", p.name.get_ref())));
        }
        let endpoints = p.endpoint_list();
        let region_only = p.kind != ProviderKind::Anthropic && p.region.is_some() && p.endpoints.is_empty();
        if p.base_url.is_some() && !p.endpoints.is_empty() || endpoints.is_empty() && !region_only {
            let or_region = if p.kind != ProviderKind::Anthropic { ", or a region" } else { "" };
            return Err((
                p.name.span(),
                format!("provider {:?} needs either base_url or endpoints{or_region}", p.name.get_ref()),
            ));
        }
        for (url, _) in endpoints {
            super::UpstreamUrl::parse(url.get_ref()).map_err(|e| (url.span(), e))?;
        }
        if p.credential.is_some() && !p.credentials.is_empty() {
            return Err((
                p.name.span(),
                format!("provider {:?}: credential or credentials, not both", p.name.get_ref()),
            ));
        }
        match p.kind {
            ProviderKind::Anthropic if p.credential_list().is_empty() => {
                return Err((
                    p.name.span(),
                    format!("provider {:?} needs either credential or credentials", p.name.get_ref()),
                ));
            }
            ProviderKind::Anthropic if p.aws.is_some() || p.region.is_some() || p.project.is_some() => {
                return Err((
                    p.name.span(),
                    format!("provider {:?}: aws, region and project are for Bedrock and Vertex", p.name.get_ref()),
                ));
            }
            ProviderKind::Vertex if p.region.is_none() || p.project.is_none() => {
                return Err((
                    p.name.span(),
                    format!("provider {:?}: Vertex needs a project and a region", p.name.get_ref()),
                ));
            }
            ProviderKind::Vertex
                if [p.service_account.is_some(), p.google_credentials.is_some(), !p.credential_list().is_empty()]
                    .iter()
                    .filter(|set| **set)
                    .count()
                    > 1 =>
            {
                return Err((
                    p.name.span(),
                    format!(
                        "provider {:?}: Vertex takes one of service_account, google_credentials or a token as \
                         credential (none: Application Default Credentials)",
                        p.name.get_ref()
                    ),
                ));
            }
            ProviderKind::Bedrock if p.region.is_none() => {
                return Err((p.name.span(), format!("provider {:?}: Bedrock needs a region", p.name.get_ref())));
            }
            ProviderKind::Bedrock if p.aws.is_some() && !p.credential_list().is_empty() => {
                return Err((
                    p.name.span(),
                    format!(
                        "provider {:?}: sign with aws or send a Bedrock API key as credential, not both",
                        p.name.get_ref()
                    ),
                ));
            }
            _ => {}
        }
        if p.kind != ProviderKind::Vertex && p.google_credentials.is_some() {
            return Err((p.name.span(), format!("provider {:?}: google_credentials is for Vertex", p.name.get_ref())));
        }
        if let Some(a) = &p.aws {
            check_aws(a).map_err(|e| (p.name.span(), format!("provider {:?}: aws: {e}", p.name.get_ref())))?;
        }
        match (&p.proxy, &p.proxy_auth) {
            (Some(direct), Some(_)) if direct == "direct" => {
                return Err((p.name.span(), format!("provider {:?}: proxy_auth with proxy = \"direct\"", p.name.get_ref())))
            }
            (None, Some(_)) => {
                return Err((
                    p.name.span(),
                    format!(
                        "provider {:?}: proxy_auth is for the provider's own proxy: set proxy too (or use egress.proxy_auth)",
                        p.name.get_ref()
                    ),
                ))
            }
            (Some(proxy), _) if proxy != "direct" => {
                super::ProxyUrl::parse(proxy)
                    .map_err(|e| (p.name.span(), format!("provider {:?}: proxy: {e}", p.name.get_ref())))?;
            }
            _ => {}
        }
    }
    match (&c.store.backend, &c.store.url) {
        (super::StoreBackend::Postgres, None) => return Err((0..0, "store: backend = \"postgres\" needs url".into())),
        (super::StoreBackend::Sqlite, Some(_)) => {
            return Err((0..0, "store: url is for backend = \"postgres\"".into()))
        }
        _ => {}
    }
    if c.store.backend == super::StoreBackend::Sqlite && c.store.ca_file.is_some() {
        return Err((0..0, "store: ca_file is for backend = \"postgres\"".into()));
    }
    if c.store.key_poll < Duration::from_millis(100) {
        return Err((0..0, "store: key_poll must be at least 100ms".into()));
    }
    match (&c.limits.backend, &c.limits.url) {
        (super::LimitsBackend::Redis, None) => return Err((0..0, "limits: backend = \"redis\" needs url".into())),
        (super::LimitsBackend::Local, Some(_)) => return Err((0..0, "limits: url is for backend = \"redis\"".into())),
        _ => {}
    }
    if (c.limits.cluster || c.limits.ca_file.is_some()) && c.limits.backend != super::LimitsBackend::Redis {
        return Err((0..0, "limits: cluster and ca_file are for backend = \"redis\"".into()));
    }
    if c.limits.lease < Duration::from_secs(3) || c.limits.timeout.is_zero() {
        return Err((0..0, "limits: lease must be at least 3s and timeout more than 0".into()));
    }
    if c.limits.prefix.is_empty() || c.limits.prefix.contains(['{', '}']) {
        return Err((0..0, "limits: prefix must be non-empty, without { or }".into()));
    }
    if let Some(proxy) = &c.egress.proxy {
        super::ProxyUrl::parse(proxy).map_err(|e| (0..0, format!("egress.proxy: {e}")))?;
    }
    if c.audit.keep == 0 {
        return Err((0..0, "audit.keep must be at least 1 (rotated files kept)".into()));
    }
    let a = &c.alerts;
    if a.thresholds.iter().any(|&t| t == 0 || t > 1000) {
        return Err((0..0, "alerts.thresholds are percentages of a budget, from 1 to 1000".into()));
    }
    if let Some(s) = a.scopes.iter().find(|s| !["key", "user", "team"].contains(&s.as_str())) {
        return Err((0..0, format!("alerts.scopes: {s:?} is not one of key, user, team")));
    }
    if a.check_every < Duration::from_millis(100) {
        return Err((0..0, "alerts.check_every must be at least 100ms".into()));
    }
    let t = &c.telemetry;
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        return Err((0..0, format!("telemetry.sample_ratio must be between 0 and 1, not {}", t.sample_ratio)));
    }
    if let Some(url) = &t.otlp_endpoint {
        let parsed: http::Uri =
            url.parse().map_err(|e| (0..0, format!("telemetry.otlp_endpoint {url:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            return Err((0..0, format!("telemetry.otlp_endpoint {url:?}: an http:// or https:// URL is needed")));
        }
    }
    for name in t.headers.keys() {
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| (0..0, format!("telemetry.headers: {name:?} is not a header name")))?;
    }
    if t.queue_capacity == 0 || t.export_interval.is_zero() || t.export_timeout.is_zero() {
        return Err((0..0, "telemetry: queue_capacity, export_interval and export_timeout must be more than 0".into()));
    }

    let mut names = HashSet::new();
    for m in &c.models {
        for n in std::iter::once(&m.name).chain(&m.aliases) {
            if !names.insert(n.get_ref().as_str()) {
                return Err((n.span(), format!("model name {:?} is used twice", n.get_ref())));
            }
        }
        if m.deployments.is_empty() {
            return Err((m.name.span(), format!("model {:?} has no deployments", m.name.get_ref())));
        }
        if m.max_attempts == 0 {
            return Err((m.name.span(), format!("model {:?}: max_attempts must be at least 1", m.name.get_ref())));
        }
        for d in &m.deployments {
            if !providers.contains(d.provider.get_ref().as_str()) {
                return Err((
                    d.provider.span(),
                    format!("deployment names provider {:?}, which is not defined", d.provider.get_ref()),
                ));
            }
        }
    }

    for m in &c.models {
        if let Some(f) = &m.context_fallback {
            if !names.contains(f.get_ref().as_str()) {
                return Err((
                    f.span(),
                    format!("context_fallback names model {:?}, which is not defined", f.get_ref()),
                ));
            }
        }
    }

    for l in &c.listeners {
        if let Some(id) = &l.anonymous_key {
            if !c.keys.iter().any(|k| k.id.get_ref() == id.get_ref()) {
                return Err((
                    id.span(),
                    format!("anonymous_key names key {:?}, which is not a [[key]] in this file", id.get_ref()),
                ));
            }
        }
    }
    if let Some(h) = &c.server.key_header {
        http::HeaderName::try_from(h.as_str())
            .map_err(|_| (0..0, format!("server.key_header {h:?} is not a header name")))?;
    }
    for h in &c.server.response_headers {
        let name = http::HeaderName::try_from(h.as_str())
            .map_err(|_| (0..0, format!("server.response_headers: {h:?} is not a header name")))?;
        // The gateway frames each answer itself; a provider's framing headers would contradict it.
        let framing = ["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"];
        if framing.contains(&name.as_str()) {
            return Err((
                0..0,
                format!("server.response_headers: {h:?} is a hop-by-hop header the gateway sets itself"),
            ));
        }
    }
    for p in &c.providers {
        for h in &p.allow_headers {
            http::HeaderName::try_from(h.as_str()).map_err(|_| {
                (p.name.span(), format!("provider {:?}: allow_headers: {h:?} is not a header name", p.name.get_ref()))
            })?;
        }
    }

    let mut ids = HashSet::new();
    for k in &c.keys {
        if !ids.insert(k.id.get_ref().as_str()) {
            return Err((k.id.span(), format!("key id {:?} is used twice", k.id.get_ref())));
        }
        if k.id.get_ref().starts_with("sso:") {
            return Err((
                k.id.span(),
                "key ids starting with \"sso:\" are reserved for people signed in with [sso]".into(),
            ));
        }
        super::parse_key_hash(k.hash.get_ref()).map_err(|e| (k.hash.span(), e))?;
        if let Some(exp) = &k.expires {
            super::parse_expiry(exp.get_ref()).map_err(|e| (exp.span(), e))?;
        }
    }

    c.controls.timezone.get_ref().parse::<chrono_tz::Tz>().map_err(|_| {
        (
            c.controls.timezone.span(),
            format!("{:?} is not an IANA time zone (e.g. \"Europe/Paris\")", c.controls.timezone.get_ref()),
        )
    })?;
    let budgets = c.keys.iter().map(|k| (k.id.span(), k.budget, k.limits));
    let owners = c.teams.iter().chain(&c.users).map(|o| (o.id.span(), o.budget, o.limits));
    let models = c.models.iter().map(|m| (m.name.span(), None, m.limits));
    for (span, budget, limits) in budgets.chain(owners).chain(models) {
        if let Some(b) = budget {
            b.to_budget().map_err(|e| (span.clone(), e))?;
        }
        limits.validate().map_err(|e| (span, e))?;
    }
    for (what, list) in [("team", &c.teams), ("user", &c.users)] {
        let mut seen = HashSet::new();
        for o in list {
            if !seen.insert(o.id.get_ref().as_str()) {
                return Err((o.id.span(), format!("{what} {:?} is defined twice", o.id.get_ref())));
            }
        }
    }

    let mut issuers = HashSet::new();
    for j in &c.jwt_issuers {
        let name = j.name.get_ref();
        if !issuers.insert(name.as_str()) {
            return Err((j.name.span(), format!("JWT issuer {name:?} is defined twice")));
        }
        // Its principals would be `sso:<user>`, the key ids of people signed in with [sso]; and
        // a `:` would let one issuer's principals take another's ids.
        if name == "sso" || name.contains(':') {
            return Err((
                j.name.span(),
                format!("JWT issuer name {name:?}: \"sso\" is reserved for [sso], and names have no ':'"),
            ));
        }
        for a in &j.algorithms {
            super::parse_algorithm(a).map_err(|e| (j.name.span(), format!("JWT issuer {name:?}: {e}")))?;
        }
        if j.algorithms.is_empty() {
            return Err((j.name.span(), format!("JWT issuer {name:?}: list the accepted algorithms")));
        }
        if j.secrets.is_empty() && j.public_keys.is_empty() && j.jwks_url.is_none() {
            return Err((j.name.span(), format!("JWT issuer {name:?} needs secrets, public_keys or jwks_url")));
        }
        if let Some(url) = &j.jwks_url {
            check_jwks_url(url, j.jwks_allow_http).map_err(|e| (j.name.span(), format!("JWT issuer {name:?}: {e}")))?;
        }
        if c.jwt_issuers.len() > 1 && j.issuer.is_none() {
            return Err((
                j.name.span(),
                format!("JWT issuer {name:?}: with several issuers, each needs `issuer` (the iss claim that picks it)"),
            ));
        }
    }

    if let Some(sso) = &c.sso {
        check_sso(sso).map_err(|e| (0..0, format!("sso: {e}")))?;
        let mut groups = HashSet::new();
        for g in &sso.groups {
            if !groups.insert(g.name.get_ref().as_str()) {
                return Err((g.name.span(), format!("sso group {:?} is listed twice", g.name.get_ref())));
            }
        }
    }

    for p in &c.prices {
        let mut rates = vec![p.input, p.output, p.cache_read, p.cache_write_5m, p.cache_write_1h];
        if let Some(l) = &p.long_context {
            rates.extend([l.input, l.output, l.cache_read, l.cache_write_5m, l.cache_write_1h]);
        }
        // A million dollars per million tokens is far beyond any real price: a typo.
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0 || *r > 1e6) {
            return Err((0..0, format!("price for {:?}: rates must be numbers from 0 to 1000000", p.pattern)));
        }
    }

    let positive = [
        ("audit.flush_interval", c.audit.flush_interval),
        ("store.flush_interval", c.store.flush_interval),
        ("server.client_write_timeout", c.server.client_write_timeout),
        ("server.client_idle_timeout", c.server.client_idle_timeout),
        ("server.header_timeout", c.server.header_timeout),
        ("server.body_read_timeout", c.server.body_read_timeout),
        ("server.body_timeout", c.server.body_timeout),
    ]
    .into_iter()
    .chain(c.models.iter().map(|m| ("deadline", m.deadline)))
    .chain(c.providers.iter().flat_map(|p| {
        [
            ("health.interval", p.health.interval),
            ("health.cooldown", p.health.cooldown),
            ("connect_timeout", p.connect_timeout),
            ("first_byte_timeout", p.first_byte_timeout),
            ("idle_timeout", p.idle_timeout),
            ("pool_idle_timeout", p.pool_idle_timeout),
            ("dns_refresh", p.dns_refresh),
        ]
    }));
    for (name, d) in positive {
        if d.is_zero() {
            return Err((0..0, format!("{name} must be longer than zero")));
        }
    }
    Ok(())
}

/// A JWKS URL is HTTPS: its keys decide who may spend. Plain HTTP only on a loopback address,
/// and only when the issuer says `jwks_allow_http = true`.
fn check_jwks_url(url: &str, allow_http: bool) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("jwks_url {url:?} is not a URL"))?;
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") if allow_http => {
            let loopback = host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!("jwks_url {url:?}: jwks_allow_http is for loopback addresses only"))
            }
        }
        Some("http") => {
            Err(format!("jwks_url {url:?} must be https (jwks_allow_http = true allows a loopback http URL)"))
        }
        _ => Err(format!("jwks_url {url:?} must be an https URL")),
    }
}

/// The identity provider is named by an HTTPS issuer URL (its discovery document and keys decide
/// who may spend), or `http://` on a loopback address when `allow_http` says so.
fn check_sso(s: &super::SsoConfig) -> Result<(), String> {
    check_jwks_url(&s.issuer, s.allow_http)
        .map_err(|e| e.replace("jwks_url", "issuer").replace("jwks_allow_http", "allow_http"))?;
    if s.client_id.is_empty() {
        return Err("client_id is empty".into());
    }
    // Who may spend, on which models and budget, comes from the groups: none listed would let
    // anyone the identity provider signs in spend without limit.
    if s.groups.is_empty() {
        return Err("list at least one [[sso.group]]: people are let in by their groups".into());
    }
    if !s.scopes.iter().any(|x| x == "openid") {
        return Err("scopes must include \"openid\" (the ID token names the person)".into());
    }
    let positive = [
        ("token_lifetime", s.token_lifetime),
        ("key_rotation", s.key_rotation),
        ("session_lifetime", s.session_lifetime),
    ];
    if let Some((name, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
        return Err(format!("{name} must be longer than zero"));
    }
    if s.key_rotation < s.token_lifetime {
        return Err("key_rotation must be at least token_lifetime".into());
    }
    Ok(())
}

/// Keys come as a pair (with an optional session token), or not at all; a profile names where
/// the chain looks, so it cannot go with keys.
fn check_aws(a: &super::AwsCredentialsConfig) -> Result<(), String> {
    match (&a.access_key_id, &a.secret_access_key) {
        (Some(_), None) | (None, Some(_)) => return Err("access_key_id and secret_access_key go together".into()),
        (None, None) if a.session_token.is_some() => return Err("session_token needs access_key_id".into()),
        (Some(_), Some(_)) if a.profile.is_some() => {
            return Err("profile chooses where the chain looks for keys: not with keys of its own".into())
        }
        _ => {}
    }
    if let Some(arn) = &a.role_arn {
        // arn:PARTITION:iam::ACCOUNT:role/NAME
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let ok = parts.len() == 6
            && parts[0] == "arn"
            && !parts[1].is_empty()
            && parts[2] == "iam"
            && parts[4].len() == 12
            && parts[4].bytes().all(|b| b.is_ascii_digit())
            && parts[5].starts_with("role/");
        if !ok {
            return Err(format!("role_arn {arn:?} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)"));
        }
    } else if a.external_id.is_some() || a.session_name.is_some() {
        return Err("external_id and session_name go with role_arn".into());
    }
    // STS's own patterns: refused here rather than at every renewal.
    let sts_chars = |s: &str, extra: &[u8]| {
        s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b) || extra.contains(&b))
    };
    if let Some(name) = &a.session_name {
        if !(2..=64).contains(&name.len()) || !sts_chars(name, b"") {
            return Err(format!("session_name {name:?}: 2 to 64 of letters, digits and _+=,.@-"));
        }
    }
    if let Some(id) = &a.external_id {
        if !(2..=1224).contains(&id.len()) || !sts_chars(id, b":/") {
            return Err("external_id: 2 to 1224 of letters, digits and _+=,.@:/-".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[listener]]
address = "127.0.0.1:8080"

[[provider]]
name = "anthropic"
kind = "anthropic"
base_url = "https://api.anthropic.com"
credential = "env:ANTHROPIC_API_KEY"

[[model]]
name = "claude-sonnet-4-5"
deployments = [{ provider = "anthropic" }]
"#;

    #[test]
    fn hop_by_hop_response_headers_are_refused() {
        let text = "[server]\nresponse_headers = [\"Transfer-Encoding\"]\n[[listener]]\naddress = \"127.0.0.1:1\"\n";
        let e = load_str(text, "t.toml").unwrap_err();
        assert!(e.message.contains("hop-by-hop"), "{}", e.message);
    }

    #[test]
    fn aws_settings_are_checked() {
        let with = |aws: &str| {
            let bedrock =
                format!("[[provider]]\nname = \"b\"\nkind = \"bedrock\"\nregion = \"us-east-1\"\naws = {{ {aws} }}\n");
            load_str(&format!("{MINIMAL}{bedrock}"), "t.toml").map(|_| ()).map_err(|e| e.message)
        };
        assert_eq!(with("profile = \"gw\""), Ok(()));
        assert_eq!(with("role_arn = \"arn:aws:iam::123456789012:role/bedrock\", external_id = \"ext-1\""), Ok(()));
        assert_eq!(with("role_arn = \"arn:aws-cn:iam::123456789012:role/x\", session_name = \"gw@corp\""), Ok(()));
        for (bad, says) in [
            ("access_key_id = \"env:A\"", "go together"),
            ("session_token = \"env:T\"", "needs access_key_id"),
            ("access_key_id = \"env:A\", secret_access_key = \"env:S\", profile = \"p\"", "profile"),
            ("role_arn = \"arn:aws:iam::12345:role/x\"", "not an IAM role ARN"),
            ("role_arn = \"arn::iam::123456789012:role/x\"", "not an IAM role ARN"),
            ("role_arn = \"arn:aws:iam::123456789012:user/x\"", "not an IAM role ARN"),
            ("external_id = \"x1\"", "go with role_arn"),
            ("role_arn = \"arn:aws:iam::123456789012:role/x\", session_name = \"has space\"", "session_name"),
            ("role_arn = \"arn:aws:iam::123456789012:role/x\", external_id = \"x\"", "external_id"),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn minimal_loads() {
        let c = load_str(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.models[0].deployments[0].provider.get_ref(), "anthropic");
    }

    #[test]
    fn unknown_field_is_named_with_position() {
        let text = MINIMAL.replace("kind = \"anthropic\"", "kind = \"anthropic\"\nbase_ulr = \"x\"");
        let e = load_str(&text, "t.toml").unwrap_err();
        assert!(e.message.contains("unknown field `base_ulr`"), "{e}");
        assert_eq!((e.line, e.column), (8, 1), "{e}");
    }

    #[test]
    fn undefined_provider_points_at_reference() {
        let text = MINIMAL.replace("{ provider = \"anthropic\" }", "{ provider = \"antropic\" }");
        let e = load_str(&text, "t.toml").unwrap_err();
        assert!(e.message.contains("\"antropic\""), "{e}");
        assert_eq!((e.line, e.column), (13, 29), "{e}");
    }

    #[test]
    fn inline_secret_is_refused() {
        let text = MINIMAL.replace("env:ANTHROPIC_API_KEY", "sk-ant-secret");
        let e = load_str(&text, "t.toml").unwrap_err();
        assert!(e.message.contains("must be a reference"), "{e}");
        assert!(!e.to_string().contains("sk-ant-secret"));
    }
}
