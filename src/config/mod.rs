//! The TOML configuration: its schema (this file), secret references, and loading with errors
//! that point at `file:line:column`.

mod budget;
mod load;
mod period;
mod secret;
mod sso;
mod url;
mod values;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

pub use budget::{Budget, BudgetConfig, RateLimits, DEFAULT_MAX_PRINCIPALS};
pub use load::{load, load_str, ConfigError};
pub use period::{rfc3339, Period};
pub use secret::{Secret, SecretRef};
pub use sso::{SsoConfig, SsoGroupConfig};
pub use url::{ProxyUrl, UpstreamUrl};
pub use values::{parse_algorithm, parse_expiry, parse_key_hash, KeyHash};

/// The whole file. Every table refuses fields it does not know, naming them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default, rename = "provider")]
    pub providers: Vec<ProviderConfig>,
    #[serde(default, rename = "model")]
    pub models: Vec<ModelConfig>,
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyConfig>,
    /// Price overrides, same shape as the shipped table; they win over it.
    #[serde(default, rename = "price")]
    pub prices: Vec<PriceConfig>,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub controls: ControlsConfig,
    /// Budgets and limits shared by every key of a team.
    #[serde(default, rename = "team")]
    pub teams: Vec<OwnerConfig>,
    /// Budgets and limits shared by every key of a user.
    #[serde(default, rename = "user")]
    pub users: Vec<OwnerConfig>,
    /// Trusted issuers of JWT credentials (an `apiKeyHelper`, an identity provider).
    #[serde(default, rename = "jwt_issuer")]
    pub jwt_issuers: Vec<JwtIssuerConfig>,
    /// How provider traffic leaves the host: a corporate proxy, a private CA.
    #[serde(default)]
    pub egress: EgressConfig,
    /// Where budgets and rate limits are counted: in this process, or shared by a fleet.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Traces of each request, sent to an OpenTelemetry collector.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Spend alerts: budgets crossing thresholds, sent to webhooks.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Sign-in with the company's identity provider, and policy by its groups.
    #[serde(default)]
    pub sso: Option<SsoConfig>,
}

/// `[alerts]`: a webhook call when a budget crosses a share of its limit, or is on course to
/// run out before its period ends; once per budget, period and threshold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Percentages of a budget's limit spent that raise an alert.
    pub thresholds: Vec<u32>,
    /// Also alert when the spend so far, at its average rate, exhausts the budget before the
    /// period ends.
    pub projected: bool,
    /// Which budgets: `key`, `user`, `team`.
    pub scopes: Vec<String>,
    /// How often budgets are looked at.
    #[serde(deserialize_with = "duration")]
    pub check_every: Duration,
    #[serde(rename = "webhook")]
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            thresholds: vec![50, 80, 100],
            projected: true,
            scopes: vec!["key".into(), "user".into(), "team".into()],
            check_every: Duration::from_secs(30),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The URL, as a secret reference (a Slack webhook URL is a credential).
    pub url: SecretRef,
    /// `json` (Tollgate's alert document) or `slack` (`{"text": ...}`, which Slack, Mattermost
    /// and Teams' incoming webhooks take).
    #[serde(default)]
    pub format: WebhookFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

/// `[telemetry]`: a trace per request over OTLP/HTTP (protobuf).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's traces URL (`http://collector:4318/v1/traces`); none, no tracing.
    pub otlp_endpoint: Option<String>,
    /// Headers sent with every export (a vendor's API key), values as secret references.
    pub headers: std::collections::BTreeMap<String, SecretRef>,
    /// The share of requests without a client `traceparent` that are traced (0 to 1); a
    /// client's `traceparent` decides for its own requests.
    pub sample_ratio: f64,
    /// `service.name` of the gateway's spans.
    pub service_name: String,
    /// Spans waiting for export; past it, new ones are dropped and counted.
    pub queue_capacity: usize,
    /// Spans are sent at least this often.
    #[serde(deserialize_with = "duration")]
    pub export_interval: Duration,
    /// One export may take this long; a slower collector loses the batch (counted).
    #[serde(deserialize_with = "duration")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            headers: Default::default(),
            sample_ratio: 1.0,
            service_name: "tollgate".into(),
            queue_capacity: 4096,
            export_interval: Duration::from_secs(1),
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// `[limits]`: where budgets, rate limits and concurrency are counted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `local` (this process) or `redis` (every gateway sharing `url`).
    pub backend: LimitsBackend,
    /// Redis: `redis://[:password@]host:port/db` or `rediss://` (TLS), as a secret reference.
    pub url: Option<SecretRef>,
    /// Redis: every key is `{prefix}:…`, in one hash slot.
    pub prefix: String,
    /// Redis: the longest an admission waits for Redis before refusing with 503.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Redis: how long a reservation outlives a gateway that died holding it.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    /// Redis: what admission does while Redis does not answer: `refuse` budgeted and limited
    /// requests with a 503, or count them in this `local` process on its share of the fleet's
    /// remaining budget and limits until Redis answers again.
    pub on_unavailable: OnUnavailable,
    /// Redis: `url` names nodes of a Redis Cluster (comma-separated); the client follows the
    /// cluster's slot map and redirections.
    pub cluster: bool,
    /// Redis over TLS (`rediss://`): certificates (PEM) trusted instead of the system's roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    Refuse,
    Local,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: LimitsBackend::Local,
            url: None,
            prefix: "tollgate".into(),
            timeout: Duration::from_millis(250),
            lease: Duration::from_secs(60),
            on_unavailable: OnUnavailable::Refuse,
            cluster: false,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    Local,
    Redis,
}

/// `[egress]`: the way out for every provider that does not set its own.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// An HTTP proxy that tunnels with `CONNECT`, `http://host:port`. Unset: the
    /// `HTTPS_PROXY` (or `https_proxy`) variable, if any.
    #[serde(default)]
    pub proxy: Option<String>,
    /// `user:password` for the proxy (`Proxy-Authorization: Basic`), as a secret reference.
    #[serde(default)]
    pub proxy_auth: Option<SecretRef>,
    /// Hosts reached directly, never through the proxy: `host`, `.domain` (and its
    /// subdomains), an IP address or CIDR block, or `*`. Unset: the `NO_PROXY` (or
    /// `no_proxy`) variable.
    #[serde(default)]
    pub no_proxy: Option<Vec<String>>,
    /// CA certificates (PEM) trusted for upstream TLS instead of the system roots, for
    /// providers without a `ca_file` of their own (a TLS-inspecting proxy re-signs with one).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Config {
    /// Where a new process started with `--upgrade` takes the listening sockets from:
    /// `server.upgrade_socket`, else a name of this instance's own (see [`Config::instance`])
    /// in systemd's `RUNTIME_DIRECTORY`, or `/tmp`. Two gateways on one host never share it.
    pub fn upgrade_socket(&self) -> PathBuf {
        self.server.upgrade_socket.clone().unwrap_or_else(|| runtime_dir().join(format!("{}.sock", self.instance())))
    }

    /// The pid file: `server.pid_file`, else named like the upgrade socket.
    pub fn pid_file(&self) -> PathBuf {
        self.server.pid_file.clone().unwrap_or_else(|| runtime_dir().join(format!("{}.pid", self.instance())))
    }

    /// A name for this gateway on its host: from its first listener's address, which no other
    /// process can be listening on (`tollgate-127.0.0.1-8080`).
    pub fn instance(&self) -> String {
        let address = self.listeners.first().map(|l| l.address.get_ref().as_str()).unwrap_or("default");
        let name: String =
            address.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect();
        format!("tollgate-{}", name.trim_matches('-'))
    }
}

#[cfg(test)]
mod instance_tests {
    #[test]
    fn two_gateways_on_one_host_get_their_own_upgrade_socket() {
        let one = |listen: &str| {
            let text = format!("[[listener]]\naddress = \"{listen}\"\n");
            crate::config::load_str(&text, "t.toml").unwrap()
        };
        let (a, b) = (one("127.0.0.1:8080"), one("[::1]:8081"));
        assert_eq!(a.instance(), "tollgate-127.0.0.1-8080");
        assert_eq!(b.instance(), "tollgate-1--8081");
        assert_ne!(a.upgrade_socket(), b.upgrade_socket());
        assert_ne!(a.pid_file(), b.pid_file());
        assert!(a.upgrade_socket().ends_with("tollgate-127.0.0.1-8080.sock"));
    }
}

/// systemd's `RuntimeDirectory=` (it sets `RUNTIME_DIRECTORY`, several joined by `:`; the
/// first is taken), else `/tmp`.
fn runtime_dir() -> PathBuf {
    std::env::var("RUNTIME_DIRECTORY")
        .ok()
        .and_then(|d| d.split(':').next().filter(|d| !d.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// A JWT issuer: its keys, what its tokens must say, and how they map to a principal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// Names the issuer in records and principal ids (`NAME:USER`).
    pub name: Spanned<String>,
    /// The `iss` tokens must carry; with several issuers, it also picks the issuer.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values; when given, tokens must carry one of them.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Accepted algorithms, e.g. `["HS256"]` or `["RS256", "ES256"]`. `none` never is.
    pub algorithms: Vec<String>,
    /// HMAC secrets (`kid` picks one when tokens carry a `kid`); several allow a rotation.
    #[serde(default)]
    pub secrets: Vec<JwtSecretConfig>,
    /// Public keys in PEM files (RSA, EC P-256/P-384 or Ed25519).
    #[serde(default)]
    pub public_keys: Vec<JwtPublicKeyConfig>,
    /// A JWKS document fetched in the background, over HTTPS.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Allows an `http://` `jwks_url` on a loopback address: for tests and local identity
    /// providers only. Anything else must be HTTPS.
    #[serde(default)]
    pub jwks_allow_http: bool,
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    pub jwks_refresh: Duration,
    /// How long a key that left the JWKS still verifies tokens.
    #[serde(default = "default_jwks_grace", deserialize_with = "duration")]
    pub jwks_grace: Duration,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// Longest `exp - iat` accepted; tokens must then carry `iat`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub max_lifetime: Option<Duration>,
    /// Claims that must be present (beyond `exp` and the user claim).
    #[serde(default)]
    pub required_claims: Vec<String>,
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    #[serde(default = "default_team_claim")]
    pub team_claim: Option<String>,
    /// A claim listing the models the principal may use; else `models` below.
    #[serde(default)]
    pub models_claim: Option<String>,
    /// What every principal of this issuer gets: allowed models, and its own budget and limits
    /// (per user, like a key of their own).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    #[serde(default)]
    pub limits: RateLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSecretConfig {
    #[serde(default)]
    pub kid: Option<String>,
    pub secret: SecretRef,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtPublicKeyConfig {
    #[serde(default)]
    pub kid: Option<String>,
    pub file: PathBuf,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_jwks_grace() -> Duration {
    Duration::from_secs(3600)
}
fn default_leeway() -> Duration {
    Duration::from_secs(60)
}
fn default_user_claim() -> String {
    "user".into()
}
fn default_team_claim() -> Option<String> {
    Some("team".into())
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// The embedded store: keys created at run time and the usage ledger.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (a file of this gateway's own) or `postgres` (shared by a fleet).
    pub backend: StoreBackend,
    /// The SQLite file. Relative paths are taken from the working directory.
    pub path: PathBuf,
    /// PostgreSQL: `postgres://user:password@host:port/database`, as a secret reference.
    pub url: Option<SecretRef>,
    /// PostgreSQL: certificates (PEM) trusted for the database's TLS, besides the system's
    /// roots; TLS is used when `url` says `sslmode=require`.
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: where ledger rows wait, durably, while the database cannot be reached.
    pub spool: PathBuf,
    /// PostgreSQL: how often keys created, changed or deleted through any gateway are looked
    /// for: the most a change takes to apply everywhere.
    #[serde(deserialize_with = "duration")]
    pub key_poll: Duration,
    /// Ledger rows are committed at least this often: the most a crash can lose.
    #[serde(deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// Requests the gateway refused itself (limits, budgets, validation: no provider was
    /// asked, nothing was spent) get a ledger row. False keeps a client hammering on 429 from
    /// growing the database; the refusals are still counted in metrics and the audit log.
    pub record_refused: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Sqlite,
            path: PathBuf::from("tollgate.db"),
            url: None,
            ca_file: None,
            spool: PathBuf::from("tollgate-spool.jsonl"),
            key_poll: Duration::from_secs(2),
            flush_interval: Duration::from_millis(200),
            record_refused: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Sqlite,
    Postgres,
}

/// What happens to a model without a price for a key with a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unpriced {
    /// Refused with 403: its cost could not be counted against the budget.
    #[default]
    Refuse,
    /// Let through; it costs the budget nothing (and is counted as unpriced).
    Allow,
}

/// How a stream that ended before its final usage is charged to a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interrupted {
    /// Its output bounded by the content streamed (flagged `streamed_content`).
    #[default]
    Estimate,
    /// Its reservation's worst case, when a budget applies (flagged `reservation`): covers
    /// thinking the provider billed but never streamed.
    Reservation,
}

/// What happens, under a budget, to a prompt that brings content from outside its body (URL or
/// file sources, server tools, MCP servers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ByReference {
    /// Reserve the model's whole context window for the prompt.
    #[default]
    Reserve,
    /// Refuse it with 403, naming the field.
    Refuse,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlsConfig {
    /// The IANA time zone budget periods and report days are cut in.
    pub timezone: Spanned<String>,
    pub unpriced: Unpriced,
    pub interrupted: Interrupted,
    pub by_reference: ByReference,
    /// The uses reserved for a web search or fetch tool that sets no `max_uses`.
    pub server_tool_uses: u64,
    /// Keys and JWT principals counted in memory at most; idle ones are forgotten past it.
    pub max_principals: usize,
}

impl Default for ControlsConfig {
    fn default() -> Self {
        ControlsConfig {
            timezone: Spanned::new(0..0, "UTC".into()),
            unpriced: Unpriced::Refuse,
            interrupted: Interrupted::Estimate,
            by_reference: ByReference::Reserve,
            server_tool_uses: 20,
            max_principals: DEFAULT_MAX_PRINCIPALS,
        }
    }
}

impl ControlsConfig {
    pub fn tz(&self) -> chrono_tz::Tz {
        self.timezone.get_ref().parse().unwrap_or(chrono_tz::Tz::UTC)
    }
}

/// A team's or a user's budget and limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerConfig {
    pub id: Spanned<String>,
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    #[serde(default)]
    pub limits: RateLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker threads for the proxy service.
    pub threads: usize,
    /// How long in-flight requests may run after SIGTERM before the process stops.
    #[serde(deserialize_with = "duration")]
    pub grace_period: Duration,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// Idle connections kept for reuse per provider, for providers that set no `pool_size`.
    pub upstream_pool_size: usize,
    /// A client that accepts no bytes of an answer for this long is disconnected.
    #[serde(deserialize_with = "duration")]
    pub client_write_timeout: Duration,
    /// A kept-alive client connection with no new request for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub client_idle_timeout: Duration,
    /// A request head (request line and headers) must arrive whole within this long of its
    /// first byte (of the connection's opening, for the first request): 408 otherwise.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Request heads larger than this are refused: 414 while still on the request line, 431
    /// after it.
    pub max_header_bytes: usize,
    /// Requests with more header lines than this are refused with 431.
    pub max_headers: usize,
    /// A request body that sends nothing for this long is refused with 408.
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// The whole request body must arrive within this long: 408 otherwise.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Where a new process started with `--upgrade` takes the listening sockets from.
    /// Unset: derived from this instance (see [`Config::upgrade_socket`]).
    pub upgrade_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    /// A request header that carries the gateway key, checked before `x-api-key` and
    /// `Authorization` (Claude Code on Vertex can add one through `ANTHROPIC_CUSTOM_HEADERS`
    /// while its `Authorization` holds a Google token).
    pub key_header: Option<String>,
    /// Response headers clients get back beyond the built-in list (docs/request-path.md), by
    /// name.
    pub response_headers: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: 2,
            grace_period: Duration::from_secs(300),
            max_body_bytes: 32 << 20,
            upstream_pool_size: 256,
            client_write_timeout: Duration::from_secs(60),
            client_idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 32 << 10,
            max_headers: 100,
            body_read_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(120),
            upgrade_socket: None,
            pid_file: None,
            key_header: None,
            response_headers: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: Spanned<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The id of a `[[key]]` that requests sending no key at all count as, on this listener
    /// (Claude Code with `CLAUDE_CODE_SKIP_BEDROCK_AUTH` or `…_VERTEX_AUTH` sends none). The
    /// usage record says `"auth": "listener"`. Only for listeners the right people can reach.
    #[serde(default)]
    pub anonymous_key: Option<Spanned<String>>,
    /// Open client connections this listener holds at most; one more is answered 503 and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    4096
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain and private key; re-read on reload.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM CA certificates: when set, clients must present a certificate signed by one (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: Spanned<String>,
    /// The bearer token the `/admin/` API requires. Without it, that API is closed; metrics
    /// and health probes stay open.
    #[serde(default)]
    pub token: Option<Spanned<SecretRef>>,
    /// HTTPS on the admin listener, optionally requiring client certificates (`client_ca`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// JSON lines, one usage record per request. Relative paths are taken from the working
    /// directory.
    pub path: PathBuf,
    /// Records waiting to be written; when full, new records are dropped and counted.
    pub queue_capacity: usize,
    /// Buffered records reach the file at least this often.
    #[serde(deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// The file is rotated before a record would take it past this many bytes; 0, never by
    /// size (an outside rotator, or `rotate_every`).
    pub rotate_bytes: u64,
    /// A file with records is rotated once this old; none, never by age.
    #[serde(deserialize_with = "optional_duration")]
    pub rotate_every: Option<Duration>,
    /// Rotated files kept (the newest); older ones are deleted.
    pub keep: usize,
    /// Gzip rotated files.
    pub compress: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: PathBuf::from("tollgate-audit.jsonl"),
            queue_capacity: 65536,
            flush_interval: Duration::from_secs(1),
            rotate_bytes: 256 << 20,
            rotate_every: None,
            keep: 10,
            compress: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Anthropic,
    /// AWS Bedrock InvokeModel: SigV4 (keys in `aws`, or AWS's credential chain) or a Bedrock
    /// API key as `credential`.
    Bedrock,
    /// Google Vertex AI rawPredict: an OAuth token from `service_account`, `google_credentials`
    /// or Application Default Credentials, or a static token as `credential`.
    Vertex,
}

/// How a provider spreads requests over its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// In turn, ignoring weights.
    #[default]
    RoundRobin,
    /// In turn, in proportion to each endpoint's `weight`.
    Weighted,
    /// The endpoint with the fewest requests in flight.
    LeastInFlight,
    /// The same endpoint for the same session (`x-claude-code-session-id`, else
    /// `metadata.user_id`), so its prompt cache stays warm; the next one on the ring while
    /// that endpoint is out.
    SessionAffinity,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Bedrock => "bedrock",
            ProviderKind::Vertex => "vertex",
        }
    }
}

/// `betas = { drop = ["files-api-*"], rename = { "old-beta" = "new-beta" } }`. A `drop` list
/// replaces the provider kind's default list.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BetaPolicyConfig {
    #[serde(default)]
    pub drop: Option<Vec<String>>,
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
}

/// Where Bedrock's SigV4 identity comes from: keys as secret references, or else AWS's
/// credential chain (environment, shared config profile, web identity, ECS, EC2 instance
/// metadata); either can then assume a role.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsCredentialsConfig {
    #[serde(default)]
    pub access_key_id: Option<SecretRef>,
    #[serde(default)]
    pub secret_access_key: Option<SecretRef>,
    #[serde(default)]
    pub session_token: Option<SecretRef>,
    /// The profile of the shared AWS config files the chain reads (default: `AWS_PROFILE`,
    /// else `default`).
    #[serde(default)]
    pub profile: Option<String>,
    /// A role to assume with STS on top of the identity found; renewed before it expires.
    #[serde(default)]
    pub role_arn: Option<String>,
    /// The external id the role's trust policy asks for.
    #[serde(default)]
    pub external_id: Option<String>,
    /// The session name CloudTrail shows for the assumed role (default `tollgate`).
    #[serde(default)]
    pub session_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: Spanned<String>,
    pub kind: ProviderKind,
    /// One endpoint; or list several in `endpoints`.
    #[serde(default)]
    pub base_url: Option<Spanned<String>>,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// One credential; or list several in `credentials` (used in turn; a 429 cools down only
    /// the credential that got it).
    #[serde(default)]
    pub credential: Option<Spanned<SecretRef>>,
    #[serde(default)]
    pub credentials: Vec<Spanned<SecretRef>>,
    /// Bedrock: the AWS region (the endpoint defaults to `bedrock-runtime.REGION.amazonaws.com`).
    /// Vertex: the Google Cloud region (`us-east5`, `global`, ...).
    #[serde(default)]
    pub region: Option<String>,
    /// Vertex: the Google Cloud project.
    #[serde(default)]
    pub project: Option<String>,
    /// Vertex: a service-account key (JSON), as a secret reference: tokens are minted from it.
    #[serde(default)]
    pub service_account: Option<SecretRef>,
    /// Vertex: a Google credentials file of any kind Application Default Credentials reads
    /// (`external_account` for workload identity federation, `authorized_user`,
    /// `impersonated_service_account`; a `service_account` key is minted from as
    /// `service_account` is), as a secret reference. Without
    /// this, `service_account` or a `credential`, Application Default Credentials from the
    /// environment (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file, the metadata server).
    #[serde(default)]
    pub google_credentials: Option<SecretRef>,
    /// Idle connections to this provider kept for reuse (default `server.upstream_pool_size`);
    /// connections beyond it are closed when their request ends.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// Bedrock: SigV4 credentials. Without keys here or a `credential`, AWS's credential
    /// chain finds them as the AWS SDKs do.
    #[serde(default)]
    pub aws: Option<AwsCredentialsConfig>,
    /// Which `anthropic-beta` values this provider gets (Bedrock and Vertex drop the
    /// first-party-only ones by default).
    #[serde(default)]
    pub betas: Option<BetaPolicyConfig>,
    /// Provider control headers (`x-amz*`, `x-goog*`) a client may send through to this
    /// provider, by name; every other one is dropped.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub selection: Selection,
    #[serde(default)]
    pub health: HealthConfig,
    /// CA certificates (PEM) trusted for this provider in place of the system roots
    /// (default: `egress.ca_file`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This provider's egress proxy, `http://host:port`, or `direct` for none (default: the
    /// `[egress]` one).
    #[serde(default)]
    pub proxy: Option<String>,
    /// `user:password` for this provider's own `proxy`, as a secret reference.
    #[serde(default)]
    pub proxy_auth: Option<SecretRef>,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Until the response header arrives. Non-streamed answers of long generations come late.
    #[serde(default = "default_first_byte_timeout", deserialize_with = "duration")]
    pub first_byte_timeout: Duration,
    /// Longest silence between two body reads.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// How long an unused pooled connection is kept.
    #[serde(default = "default_pool_idle", deserialize_with = "duration")]
    pub pool_idle_timeout: Duration,
    /// How often host names are resolved again.
    #[serde(default = "default_dns_refresh", deserialize_with = "duration")]
    pub dns_refresh: Duration,
}

impl ProviderConfig {
    /// The endpoints, whichever way they were written; a Bedrock provider with only a region
    /// gets the region's public endpoint.
    pub fn endpoint_list(&self) -> Vec<(Spanned<String>, usize)> {
        match (&self.base_url, self.kind, &self.region) {
            (Some(u), _, _) => vec![(u.clone(), 1)],
            (None, ProviderKind::Bedrock, Some(region)) if self.endpoints.is_empty() => {
                vec![(Spanned::new(0..0, format!("https://bedrock-runtime.{region}.amazonaws.com")), 1)]
            }
            (None, ProviderKind::Vertex, Some(region)) if self.endpoints.is_empty() => {
                vec![(Spanned::new(0..0, crate::protocol::vertex::endpoint(region)), 1)]
            }
            _ => self.endpoints.iter().map(|e| (e.url.clone(), e.weight)).collect(),
        }
    }

    pub fn credential_list(&self) -> Vec<&Spanned<SecretRef>> {
        self.credential.iter().chain(self.credentials.iter()).collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub url: Spanned<String>,
    #[serde(default = "one")]
    pub weight: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// No active probe: live traffic alone decides.
    None,
    /// A TCP (and TLS) connect.
    Tcp,
    /// An unauthenticated `GET` of `path`; any HTTP answer counts as up.
    Http,
}

/// Health of a provider's endpoints: the active probe and the passive rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub probe: ProbeKind,
    pub path: String,
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Consecutive probe results that flip an endpoint up or down.
    pub probe_threshold: usize,
    /// Consecutive failures in live traffic (connect errors, timeouts, 5xx, 529) that take an
    /// endpoint out of rotation.
    pub failures: u32,
    /// The first cool-down; each repeated one doubles, up to `max_cooldown`.
    #[serde(deserialize_with = "duration")]
    pub cooldown: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_cooldown: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe: ProbeKind::Tcp,
            path: "/".into(),
            interval: Duration::from_secs(10),
            probe_threshold: 2,
            failures: 3,
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_dns_refresh() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The public name clients send.
    pub name: Spanned<String>,
    #[serde(default)]
    pub aliases: Vec<Spanned<String>>,
    /// Globs (`*` matches any run of characters) for names that route here.
    #[serde(default)]
    pub patterns: Vec<Spanned<String>>,
    /// Tried in order; the first is the primary.
    pub deployments: Vec<DeploymentConfig>,
    /// Attempts per request, over all deployments and endpoints, before giving up.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: usize,
    /// How long the attempts together may take before the answer starts.
    #[serde(default = "default_deadline", deserialize_with = "duration")]
    pub deadline: Duration,
    /// A model (public name) with a larger context window, tried when a provider rejects the
    /// prompt as too long.
    #[serde(default)]
    pub context_fallback: Option<Spanned<String>>,
    /// Rate limits over all requests to this model, whoever sends them.
    #[serde(default)]
    pub limits: RateLimits,
}

fn default_max_attempts() -> usize {
    4
}

fn default_deadline() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub provider: Spanned<String>,
    /// The provider's model id. When absent, the name the client sent goes through unchanged.
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub id: Spanned<String>,
    /// `sha256:<hex>`, as `tollgate keys new` prints it.
    pub hash: Spanned<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    /// Public model names or globs this key may use; all models when absent.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub expires: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    #[serde(default)]
    pub limits: RateLimits,
}

/// USD per million tokens for each token class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// An exact model id, or a glob where `*` matches any run of characters.
    #[serde(rename = "match")]
    pub pattern: String,
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write_5m: f64,
    pub cache_write_1h: f64,
    #[serde(default)]
    pub long_context: Option<LongContextConfig>,
    /// Only for this provider (its name, or its kind: `anthropic`, `bedrock`, `vertex`).
    #[serde(default)]
    pub provider: Option<String>,
    /// Modifiers and limits (see [`PriceExtras`]); unset ones come from the shipped defaults.
    #[serde(default)]
    pub fast: Option<f64>,
    #[serde(default)]
    pub geo: Option<std::collections::BTreeMap<String, f64>>,
    #[serde(default)]
    pub regional: Option<f64>,
    #[serde(default)]
    pub web_search_per_1k: Option<f64>,
    #[serde(default)]
    pub web_fetch_per_1k: Option<f64>,
    #[serde(default)]
    pub max_output: Option<u64>,
    #[serde(default)]
    pub context_window: Option<u64>,
}

impl PriceConfig {
    /// This row's modifiers and limits, each falling back to `defaults`.
    pub fn extras(&self, defaults: &PriceExtras) -> PriceExtras {
        PriceExtras {
            fast: self.fast.or(defaults.fast),
            geo: self.geo.clone().or_else(|| defaults.geo.clone()),
            regional: self.regional.or(defaults.regional),
            web_search_per_1k: self.web_search_per_1k.or(defaults.web_search_per_1k),
            web_fetch_per_1k: self.web_fetch_per_1k.or(defaults.web_fetch_per_1k),
            max_output: self.max_output.or(defaults.max_output),
            context_window: self.context_window.or(defaults.context_window),
        }
    }
}

/// Price modifiers and model limits. On a `[[price]]` row they apply to that model; in the
/// shipped table's `[defaults]` they apply to every row that does not set its own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriceExtras {
    /// Every rate is multiplied by this when the usage says `speed = "fast"`.
    pub fast: Option<f64>,
    /// Multipliers by `inference_geo` value (`{ us = 1.1 }`); an unlisted value costs 1x.
    pub geo: Option<std::collections::BTreeMap<String, f64>>,
    /// Multiplier for a regional (not global) Bedrock or Vertex endpoint.
    pub regional: Option<f64>,
    /// USD per 1,000 web searches (`usage.server_tool_use.web_search_requests`).
    pub web_search_per_1k: Option<f64>,
    /// USD per 1,000 web fetches.
    pub web_fetch_per_1k: Option<f64>,
    /// The largest `max_tokens` the model accepts.
    pub max_output: Option<u64>,
    /// The largest prompt the model accepts, in tokens (with every beta that widens it).
    pub context_window: Option<u64>,
}

/// Rates for the whole request when its prompt exceeds `threshold` tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContextConfig {
    pub threshold: u64,
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write_5m: f64,
    pub cache_write_1h: f64,
}

/// The shipped price table's file shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceFile {
    #[serde(default)]
    pub defaults: PriceExtras,
    #[serde(default)]
    pub price: Vec<PriceConfig>,
}

/// Durations are written as `"10s"`, `"5m"`, `"250ms"`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e} (write e.g. \"30s\")")))
}
