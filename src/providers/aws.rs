//! AWS credentials for SigV4, the way AWS issues them: fixed keys from the config, or AWS's own
//! credential chain (`aws-config`: environment, shared config profile, web identity token,
//! ECS container credentials, EC2 instance metadata with IMDSv2), optionally assuming a role
//! with STS. Temporary credentials are fetched on the refresh thread and renewed before they
//! expire; the request path only reads the ones held.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_types::region::Region;

use crate::config::{AwsCredentialsConfig, Secret};

/// The metadata service hands out new keys this long before the old ones expire: until then
/// it answers with the keys held, which is not a failure.
const RENEW_AHEAD: Duration = Duration::from_secs(300);
/// After a failed fetch, the next try comes this much later.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// One fetch (chain, STS) may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the keys come from, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSource {
    pub region: String,
    /// Fixed keys from the config; `None`: AWS's credential chain.
    keys: Option<(Secret, Secret, Option<Secret>)>,
    profile: Option<String>,
    role: Option<Role>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Role {
    arn: String,
    external_id: Option<String>,
    session_name: String,
}

impl AwsSource {
    pub fn from_config(region: &str, c: Option<&AwsCredentialsConfig>) -> Result<Self, String> {
        let default = AwsCredentialsConfig::default();
        let c = c.unwrap_or(&default);
        let keys = match (&c.access_key_id, &c.secret_access_key) {
            (Some(id), Some(secret)) => {
                Some((id.resolve()?, secret.resolve()?, c.session_token.as_ref().map(|t| t.resolve()).transpose()?))
            }
            _ => None,
        };
        let role = c.role_arn.as_ref().map(|arn| Role {
            arn: arn.clone(),
            external_id: c.external_id.clone(),
            session_name: c.session_name.clone().unwrap_or_else(|| "tollgate".into()),
        });
        Ok(AwsSource { region: region.to_string(), keys, profile: c.profile.clone(), role })
    }

    /// Fixed keys, for tests that sign with known values.
    pub fn fixed_for_tests(region: &str, id: Secret, secret: Secret, token: Option<Secret>) -> Self {
        AwsSource { region: region.to_string(), keys: Some((id, secret, token)), profile: None, role: None }
    }

    /// Keys that never change while running: nothing to fetch.
    fn fixed(&self) -> Option<Credentials> {
        match (&self.keys, &self.role) {
            (Some((id, secret, token)), None) => Some(static_credentials(id, secret, token.as_ref())),
            _ => None,
        }
    }

    /// The material that tells a reload whether this source changed (never logged).
    pub fn fingerprint_material(&self) -> Vec<u8> {
        let mut m = Vec::new();
        if let Some((id, secret, token)) = &self.keys {
            for part in [Some(id), Some(secret), token.as_ref()] {
                m.extend_from_slice(part.map_or("", |s| s.expose()).as_bytes());
                m.push(0);
            }
        }
        m.extend_from_slice(format!("{:?}|{:?}|{}", self.profile, self.role, self.region).as_bytes());
        m
    }

    /// How this source is named in logs and errors.
    fn describe(&self) -> String {
        let base = match (&self.keys, &self.profile) {
            (Some(_), _) => "the configured keys".to_string(),
            (None, Some(p)) => format!("the AWS credential chain (profile {p})"),
            (None, None) => "the AWS credential chain".to_string(),
        };
        match &self.role {
            Some(r) => format!("role {} assumed with {base}", r.arn),
            None => base,
        }
    }
}

fn static_credentials(id: &Secret, secret: &Secret, token: Option<&Secret>) -> Credentials {
    Credentials::new(id.expose(), secret.expose(), token.map(|t| t.expose().to_string()), None, "tollgate-config")
}

struct Held {
    identity: Identity,
    /// Which key this is (an identifier, not a secret): a fetch that hands back the same key
    /// renewed nothing.
    access_key_id: String,
    expires: Option<SystemTime>,
    /// The last moment these sign: a little before `expires` ([`super::signing_life`]).
    sign_until: Option<SystemTime>,
    refresh_at: Option<SystemTime>,
}

/// The credentials one Bedrock provider signs with, and how to renew them.
pub struct AwsCredentials {
    pub source: AwsSource,
    held: ArcSwapOption<Held>,
    /// When the last fetch was tried, and why it failed.
    state: Mutex<(Option<Instant>, Option<String>)>,
    /// When the fetch under way now started, if one is.
    fetching_since: Mutex<Option<Instant>>,
    /// Built on the refresh thread at its first fetch (the chain reads files and env then);
    /// dropped by a reload, so the next fetch reads them again.
    provider: Mutex<Option<SharedCredentialsProvider>>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials").field("source", &self.source.describe()).finish_non_exhaustive()
    }
}

impl AwsCredentials {
    pub fn new(source: AwsSource) -> Self {
        let held = source.fixed().map(|c| Held {
            access_key_id: c.access_key_id().to_string(),
            identity: c.into(),
            expires: None,
            sign_until: None,
            refresh_at: None,
        });
        AwsCredentials {
            source,
            held: ArcSwapOption::from_pointee(held),
            state: Mutex::new((None, None)),
            fetching_since: Mutex::new(None),
            provider: Mutex::new(None),
        }
    }

    /// Whether these are fetched (and so renewed) rather than fixed.
    pub fn fetched(&self) -> bool {
        self.source.fixed().is_none()
    }

    /// The identity to sign with now, or why there is none.
    pub fn identity(&self) -> Result<Identity, String> {
        match self.held.load().as_ref() {
            Some(h) if h.sign_until.is_none_or(|e| SystemTime::now() < e) => Ok(h.identity.clone()),
            held => {
                let why = self.state.lock().unwrap_or_else(|p| p.into_inner()).1.clone();
                let since = *self.fetching_since.lock().unwrap_or_else(|p| p.into_inner());
                let what = if held.is_some() { "expired" } else { "not fetched yet" };
                let why = match (since, why) {
                    (Some(t), Some(last)) => {
                        format!(
                            "a fetch has been under way for {} s; the last one failed: {last}",
                            t.elapsed().as_secs()
                        )
                    }
                    (Some(t), None) => format!("a fetch has been under way for {} s", t.elapsed().as_secs()),
                    (None, Some(last)) => last,
                    (None, None) => "no fetch has finished".into(),
                };
                Err(format!("AWS credentials from {} {what}: {why}", self.source.describe()))
            }
        }
    }

    /// Whether a fetch is due: none held, renewal time reached, or a failed try long enough ago.
    pub fn due(&self, now: Instant) -> bool {
        if !self.fetched() {
            return false;
        }
        let (tried, error) = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if error.is_some() && tried.is_some_and(|t| now.duration_since(t) < RETRY_AFTER) {
            return false;
        }
        match self.held.load().as_ref() {
            None => true,
            Some(h) => h.refresh_at.is_some_and(|at| SystemTime::now() >= at),
        }
    }

    /// Reads the chain's files and environment again and fetches on the next pass, whatever
    /// the held credentials' expiry (a reload). The held ones sign until then.
    pub fn renew_soon(&self) {
        if !self.fetched() {
            return;
        }
        *self.provider.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Only the renewal time changes, and only on what is held now (not on credentials the
        // refresh thread stores meanwhile).
        self.held.rcu(|held| {
            held.as_ref().map(|h| {
                std::sync::Arc::new(Held {
                    identity: h.identity.clone(),
                    access_key_id: h.access_key_id.clone(),
                    expires: h.expires,
                    sign_until: h.sign_until,
                    refresh_at: Some(SystemTime::UNIX_EPOCH),
                })
            })
        });
    }

    /// Fetches credentials through the chain (and STS), on the refresh thread's runtime.
    pub async fn refresh(&self, http: &SharedHttpClient) {
        *self.fetching_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch(http)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        };
        *self.fetching_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = Some(Instant::now());
        match result {
            Ok(creds) => {
                let now = SystemTime::now();
                let expires = creds.expiry();
                let held = self.held.load_full();
                // Keys not rotated yet while the held ones have long to live (the metadata
                // service hands out new keys only in the last minutes): look again later,
                // quietly.
                if let Some(h) = held.as_ref().filter(|h| h.access_key_id == creds.access_key_id()) {
                    let left = h.expires.and_then(|e| e.duration_since(now).ok()).unwrap_or_default();
                    if left > RENEW_AHEAD {
                        let wait = (left / 2).min(left - RENEW_AHEAD).max(Duration::from_secs(1));
                        self.held.store(Some(std::sync::Arc::new(Held {
                            identity: h.identity.clone(),
                            access_key_id: h.access_key_id.clone(),
                            expires: h.expires,
                            sign_until: h.sign_until,
                            refresh_at: Some(now + wait),
                        })));
                        state.1 = None;
                        return;
                    }
                }
                // The SDK's instance-metadata provider hands back the last keys it had when the
                // service fails (and extends their expiry): that renews nothing, and the real
                // expiry of the held keys stands.
                let stale = match &held {
                    Some(h) if h.access_key_id == creds.access_key_id() => {
                        Some("the credential source handed back the keys already held, not new ones".to_string())
                    }
                    _ if expires.is_some_and(|e| e <= now) => {
                        Some("the credential source handed back keys that have already expired".to_string())
                    }
                    _ => None,
                };
                if let Some(why) = stale {
                    tracing::warn!(source = %self.source.describe(), "AWS credentials not renewed: {why}");
                    if let Some(h) = held {
                        // Try again later, half-way to when the held keys stop signing, or in a
                        // few seconds.
                        let retry = h.sign_until.map(|e| now + e.duration_since(now).unwrap_or_default() / 2);
                        self.held.store(Some(std::sync::Arc::new(Held {
                            identity: h.identity.clone(),
                            access_key_id: h.access_key_id.clone(),
                            expires: h.expires,
                            sign_until: h.sign_until,
                            refresh_at: retry,
                        })));
                    }
                    state.1 = Some(why);
                    return;
                }
                // Half-way through what is left: an issuer outage as long as half the keys' life costs
                // no request.
                let refresh_at = expires.map(|e| now + e.duration_since(now).unwrap_or_default() / 2);
                let until = expires
                    .and_then(|e| e.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or_else(|| "never".into(), |d| crate::config::rfc3339(d.as_millis() as i64));
                tracing::info!(source = %self.source.describe(), expires = %until, "AWS credentials fetched");
                let access_key_id = creds.access_key_id().to_string();
                self.held.store(Some(std::sync::Arc::new(Held {
                    identity: creds.into(),
                    access_key_id,
                    expires,
                    sign_until: expires.map(|e| now + super::signing_life(e.duration_since(now).unwrap_or_default())),
                    refresh_at,
                })));
                state.1 = None;
            }
            Err(e) => {
                tracing::warn!(source = %self.source.describe(), error = %e, "AWS credentials not fetched; those held are kept until they expire");
                state.1 = Some(e);
            }
        }
    }

    async fn fetch(&self, http: &SharedHttpClient) -> Result<Credentials, String> {
        let built = self.provider.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let provider = match built {
            Some(p) => p,
            None => {
                let p = build_provider(&self.source, http.clone()).await?;
                *self.provider.lock().unwrap_or_else(|p| p.into_inner()) = Some(p.clone());
                p
            }
        };
        provider.provide_credentials().await.map_err(|e| {
            // The SDK's error chain says which link failed and why; no secret is in it.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            why
        })
    }
}

/// The provider behind a source: the chain (or the configured keys), and STS on top for a role.
async fn build_provider(source: &AwsSource, http: SharedHttpClient) -> Result<SharedCredentialsProvider, String> {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).http_client(http).region(Region::new(source.region.clone()));
    if let Some(p) = &source.profile {
        loader = loader.profile_name(p);
    }
    if let Some((id, secret, token)) = &source.keys {
        loader = loader.credentials_provider(static_credentials(id, secret, token.as_ref()));
    }
    let conf = loader.load().await;
    let Some(role) = &source.role else {
        return conf.credentials_provider().ok_or_else(|| "the AWS SDK built no credentials provider".into());
    };
    let mut assume = aws_config::sts::AssumeRoleProvider::builder(role.arn.clone())
        .session_name(role.session_name.clone())
        .region(Region::new(source.region.clone()))
        .configure(&conf);
    if let Some(id) = &role.external_id {
        assume = assume.external_id(id.clone());
    }
    Ok(SharedCredentialsProvider::new(assume.build().await))
}

/// The HTTP client the chain and STS use: rustls with ring, as the rest of Tollgate.
pub fn http_client() -> SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https()
}
