//! Upstream providers at run time: a pool of endpoints (resolved in the background, never on a
//! worker, each with a ready-made Pingora peer and its health) and the credentials to present.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use http::{HeaderName, HeaderValue};
use pingora::protocols::tls::CaType;
use pingora::utils::tls::WrappedX509;

use crate::config::{EgressConfig, ProbeKind, ProviderConfig, ProviderKind};

mod aws;
mod betas;
mod connector;
mod egress;
mod endpoint;
mod google;
mod health;
mod pool;
mod sigv4;

pub use crate::config::UpstreamUrl;
pub use aws::{http_client as aws_http_client, AwsCredentials, AwsSource};
pub use betas::BetaPolicy;
pub use connector::Connector;
pub use egress::Egress;
pub use endpoint::{Endpoint, EndpointRef, PeerSettings};
pub use google::{unix_now, TokenSource};
pub use health::{now_ms, HealthPolicy, PassiveHealth};
pub use pool::{Balancer, Pool, Schedule, Selection};
pub use sigv4::{payload_hash, payload_hash_of, AwsSigner};

/// How long before their expiry fetched credentials stop signing: a request signed a moment
/// before the end reaches the provider after it, and is refused there (AWS answers 403
/// "The security token included in the request is expired"). Two seconds cover the trip and
/// a small clock skew; a quarter of the life is the most taken from very short-lived ones.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// How much of a credential's `life` (from now) it may sign for.
fn signing_life(life: Duration) -> Duration {
    life - EXPIRY_MARGIN.min(life / 4)
}

/// One credential of a provider, with its own cool-down (a 429 is often per key).
#[derive(Debug)]
pub struct Credential {
    pub index: usize,
    pub auth: Auth,
    pub passive: PassiveHealth,
    /// SHA-256 of the secret material: tells a reload whether it changed.
    fingerprint: [u8; 32],
}

/// How a request proves itself to the provider.
#[derive(Debug)]
pub enum Auth {
    /// A header with a key (`x-api-key`, or `Authorization: Bearer` for a Bedrock API key).
    Header(HeaderName, HeaderValue),
    /// AWS SigV4 over the whole request.
    SigV4(AwsSigner),
    /// A Google OAuth token, from a service account or Google's credentials, renewed in the
    /// background.
    OAuth(Arc<TokenSource>),
}

pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// Which betas this provider gets.
    pub betas: BetaPolicy,
    /// Provider control headers clients may send through (lowercase names).
    pub allow_headers: Vec<HeaderName>,
    /// Where and what this provider is (kind, endpoints, region, project), as built: a reload
    /// swaps credentials in only while these are unchanged.
    settings: String,
    /// Vertex: where the model lives (project, region).
    pub project: Option<String>,
    pub region: Option<String>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub pool: Pool,
    /// Usable credentials, or why there are none; replaced whole when a reload reads them
    /// again.
    credentials: ArcSwap<Result<Vec<Arc<Credential>>, String>>,
    next_credential: AtomicUsize,
    pub health: HealthPolicy,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// The egress proxy this provider's traffic goes through, if any.
    pub egress: Option<Arc<Egress>>,
    /// This provider's own connection pool: idle connections are bounded per provider, so a
    /// burst to one cannot leave hundreds open, nor crowd out another's.
    pub connector: Connector,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider").field("name", &self.name).field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

impl Provider {
    /// Whether `model_id` runs on a regional endpoint here, which Bedrock and Vertex price
    /// above their global ones: a Bedrock id without the `global.` inference-profile prefix,
    /// or a Vertex provider in a region other than `global`.
    pub fn regional(&self, model_id: &str) -> bool {
        match self.kind {
            ProviderKind::Anthropic => false,
            // An inference-profile ARN names the profile after its last `/`; an application
            // profile's ARN does not say, and counts as regional (the dearer side).
            ProviderKind::Bedrock => !model_id.rsplit('/').next().unwrap_or(model_id).starts_with("global."),
            ProviderKind::Vertex => self.region.as_deref() != Some("global"),
        }
    }

    /// Builds the provider and resolves its credentials. Name resolution is left to
    /// [`Provider::resolve_blocking`] (start-up) and the pool's background discovery.
    /// `default_pool_size` applies when the provider sets no `pool_size`.
    pub fn from_config(c: &ProviderConfig, egress: &EgressConfig, default_pool_size: usize) -> Result<Self, String> {
        let ca = match c.ca_file.as_ref().or(egress.ca_file.as_ref()) {
            Some(path) => Some(load_ca(path)?),
            None => None,
        };
        let egress = Egress::for_provider(egress, c)?;
        let settings = PeerSettings {
            connect_timeout: c.connect_timeout,
            pool_idle_timeout: c.pool_idle_timeout,
            ca,
            egress: egress.clone(),
        };
        let endpoints = c
            .endpoint_list()
            .into_iter()
            .enumerate()
            .map(|(i, (url, weight))| {
                Endpoint::new(i, UpstreamUrl::parse(url.get_ref())?, weight, settings.clone()).map(Arc::new)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let credentials = ArcSwap::from_pointee(read_credentials(c));
        let probe = (c.health.probe != ProbeKind::None).then(|| {
            Box::new(health::Probe {
                kind: c.health.probe,
                path: c.health.path.clone(),
                connector: Connector::new(None),
                threshold: c.health.probe_threshold.max(1),
                provider: c.name.get_ref().clone(),
            }) as Box<dyn pingora_load_balancing::health_check::HealthCheck + Send + Sync>
        });
        let schedule = pool::Schedule { probe, probe_interval: c.health.interval, dns_refresh: c.dns_refresh };
        Ok(Provider {
            egress,
            name: c.name.get_ref().clone(),
            kind: c.kind,
            betas: BetaPolicy::from_config(c.kind, c.betas.as_ref()),
            allow_headers: c.allow_headers.iter().filter_map(|h| HeaderName::try_from(h.as_str()).ok()).collect(),
            settings: settings_of(c),
            project: c.project.clone(),
            region: c.region.clone(),
            pool: Pool::new(&endpoints, c.selection, schedule),
            endpoints,
            credentials,
            next_credential: AtomicUsize::new(0),
            health: HealthPolicy::from(&c.health),
            first_byte_timeout: c.first_byte_timeout,
            idle_timeout: c.idle_timeout,
            pool_idle_timeout: c.pool_idle_timeout,
            connector: Connector::new(Some(c.pool_size.unwrap_or(default_pool_size))),
        })
    }

    /// A credential for the next attempt: in turn, skipping those cooling down. With all of
    /// them cooling down there is none, except as a `last_resort`: then the one that comes back
    /// first.
    pub fn credential(&self, last_resort: bool) -> Result<Arc<Credential>, String> {
        let set = self.credentials.load();
        let all = set.as_ref().as_ref().map_err(|e| format!("no credential: {e}"))?;
        let now = now_ms();
        let start = self.next_credential.fetch_add(1, Ordering::Relaxed);
        let available = (0..all.len()).map(|i| &all[(start + i) % all.len()]).find(|c| c.passive.available(now));
        match available {
            Some(c) => Ok(c.clone()),
            None if last_resort => all
                .iter()
                .min_by_key(|c| c.passive.cooling_down_for(now))
                .cloned()
                .ok_or_else(|| "no credentials".into()),
            None => Err("every credential is paused after a 429".into()),
        }
    }

    /// Token sources to keep fresh (Vertex).
    pub fn token_sources(&self) -> Vec<Arc<TokenSource>> {
        let set = self.credentials.load();
        let all = set.as_ref().as_ref().map(Vec::as_slice).unwrap_or_default();
        all.iter()
            .filter_map(|c| match &c.auth {
                Auth::OAuth(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    /// AWS credentials to keep fresh (Bedrock signing with temporary credentials).
    pub fn aws_credentials(&self) -> Vec<Arc<AwsCredentials>> {
        let set = self.credentials.load();
        let all = set.as_ref().as_ref().map(Vec::as_slice).unwrap_or_default();
        all.iter()
            .filter_map(|c| match &c.auth {
                Auth::SigV4(s) if s.credentials.fetched() => Some(s.credentials.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn credential_count(&self) -> usize {
        self.credentials.load().as_ref().as_ref().map_or(0, Vec::len)
    }

    /// Whether `c` describes this provider as it runs: same kind, endpoints, region and
    /// project. Credentials meant for other endpoints must not be sent to these.
    pub fn runs_as(&self, c: &ProviderConfig) -> bool {
        self.settings == settings_of(c)
    }

    /// Takes credentials read again from the config (a reload). A credential whose secret did
    /// not change is kept as it is, with its cool-down and its OAuth token; a changed one
    /// starts fresh. When the new set cannot be read, the running one stays, and the reason is
    /// returned to be logged.
    ///
    /// The proxy credentials are read again whatever becomes of the provider's own, unless
    /// `proxy_changed`: the running proxy stays until a restart, and must not be sent
    /// credentials meant for its successor.
    pub fn replace_credentials(
        &self,
        fresh: Result<Vec<Arc<Credential>>, String>,
        proxy_changed: bool,
    ) -> Result<(), String> {
        let proxy = match &self.egress {
            Some(e) if !proxy_changed => e.read_auth().map_err(|e| format!("egress proxy: {e}")),
            _ => Ok(()),
        };
        self.replace_provider_credentials(fresh).and(proxy)
    }

    fn replace_provider_credentials(&self, fresh: Result<Vec<Arc<Credential>>, String>) -> Result<(), String> {
        let running = self.credentials.load();
        let fresh = match (fresh, running.as_ref()) {
            (Ok(fresh), Ok(old)) => fresh
                .into_iter()
                .map(|f| match old.iter().find(|o| o.fingerprint == f.fingerprint) {
                    Some(kept) => {
                        // Same source: fetched credentials are fetched again all the same
                        // (a reload re-reads every credential).
                        match &kept.auth {
                            Auth::SigV4(s) => s.credentials.renew_soon(),
                            Auth::OAuth(t) => t.renew_soon(),
                            Auth::Header(..) => {}
                        }
                        kept.clone()
                    }
                    None => f,
                })
                .collect(),
            (Ok(fresh), Err(_)) => fresh,
            (Err(e), Ok(_)) => return Err(e),
            (Err(e), Err(_)) => {
                self.credentials.store(Arc::new(Err(e.clone())));
                return Err(e);
            }
        };
        self.credentials.store(Arc::new(Ok(fresh)));
        Ok(())
    }

    /// Why this provider cannot take traffic, if it cannot.
    pub fn unready_reason(&self) -> Option<String> {
        if let Err(e) = self.credentials.load().as_ref() {
            return Some(format!("provider {}: no credential: {e}", self.name));
        }
        if self.endpoints.iter().all(|e| e.peer().is_err()) {
            let why: Vec<String> = self.endpoints.iter().filter_map(|e| e.peer().err()).collect();
            return Some(format!("provider {}: no endpoint resolved: {}", self.name, why.join("; ")));
        }
        None
    }

    /// Why a fetched credential (AWS's chain or a role, a Google token) cannot sign now, if
    /// one cannot. For operators (`/readyz`, `/status`, the log): the detail can name roles,
    /// accounts and files, so it is not for clients.
    pub fn credential_problem(&self) -> Option<String> {
        let set = self.credentials.load();
        let all = set.as_ref().as_ref().ok()?;
        all.iter()
            .find_map(|c| match &c.auth {
                Auth::SigV4(s) => s.credentials.identity().err(),
                Auth::OAuth(t) => t.header().err(),
                Auth::Header(..) => None,
            })
            .map(|e| format!("provider {}: {e}", self.name))
    }

    /// Resolves every endpoint once, blocking, then fills the pool: for start-up.
    pub fn resolve_blocking(&self) {
        for e in &self.endpoints {
            e.resolve_blocking();
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        rt.block_on(self.pool.update());
    }
}

/// Reads a provider's credentials from their references: keys, AWS keys (or where AWS's chain
/// will find them), a Google service account or credentials file (or ADC). Each carries the SHA-256 of its secret material, so
/// a reload can tell a rotated secret from the same one.
pub fn read_credentials(c: &ProviderConfig) -> Result<Vec<Arc<Credential>>, String> {
    let keys = c.credential_list();
    let one = |auth, material: &[u8]| {
        vec![Arc::new(Credential {
            index: 0,
            auth,
            passive: PassiveHealth::default(),
            fingerprint: fingerprint(material),
        })]
    };
    if c.kind == ProviderKind::Bedrock && keys.is_empty() {
        let region = c.region.as_deref().ok_or("Bedrock needs a region")?;
        let signer = AwsSigner::new(AwsSource::from_config(region, c.aws.as_ref())?);
        let material = signer.fingerprint_material();
        return Ok(one(Auth::SigV4(signer), &material));
    }
    if c.kind == ProviderKind::Vertex {
        if let Some(sa) = &c.service_account {
            let json = sa.resolve()?;
            let source = TokenSource::from_key_json(json.expose()).map_err(|e| format!("service_account {sa}: {e}"))?;
            return Ok(one(Auth::OAuth(Arc::new(source)), json.expose().as_bytes()));
        }
        if let Some(file) = &c.google_credentials {
            let json = file.resolve()?;
            // A key file is a key file, however it is named: Tollgate mints its tokens itself.
            let key = serde_json::from_str::<serde_json::Value>(json.expose())
                .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("service_account"));
            let source = if key {
                TokenSource::from_key_json(json.expose())
            } else {
                TokenSource::from_library(Some(json.expose()))
            }
            .map_err(|e| format!("google_credentials {file}: {e}"))?;
            return Ok(one(Auth::OAuth(Arc::new(source)), json.expose().as_bytes()));
        }
        if keys.is_empty() {
            let source = TokenSource::from_library(None)?;
            return Ok(one(Auth::OAuth(Arc::new(source)), b"application-default-credentials"));
        }
    }
    keys.into_iter()
        .enumerate()
        .map(|(index, r)| {
            let secret = r.get_ref().resolve()?;
            let (name, value) = match c.kind {
                ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), secret.expose().to_string()),
                // A Bedrock API key (what AWS_BEARER_TOKEN_BEDROCK holds).
                ProviderKind::Bedrock | ProviderKind::Vertex => {
                    (http::header::AUTHORIZATION, format!("Bearer {}", secret.expose()))
                }
            };
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| format!("credential {} holds characters not allowed in a header", r.get_ref()))?;
            value.set_sensitive(true);
            let fingerprint = fingerprint(secret.expose().as_bytes());
            Ok(Arc::new(Credential {
                index,
                auth: Auth::Header(name, value),
                passive: PassiveHealth::default(),
                fingerprint,
            }))
        })
        .collect()
}

fn settings_of(c: &ProviderConfig) -> String {
    let endpoints: Vec<String> =
        c.endpoint_list().into_iter().map(|(url, weight)| format!("{}*{weight}", url.get_ref())).collect();
    // The way out too: a changed proxy applies at the next restart, like changed endpoints.
    format!("{:?}|{}|{:?}|{:?}|{:?}|{:?}", c.kind, endpoints.join(","), c.region, c.project, c.proxy, c.ca_file)
}

fn fingerprint(material: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(material).into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stop_signing_a_little_before_they_expire() {
        let s = Duration::from_secs;
        assert_eq!(signing_life(s(3600)), s(3598));
        assert_eq!(signing_life(s(6)), Duration::from_millis(4500));
        assert_eq!(signing_life(s(1)), Duration::from_millis(750));
        assert_eq!(signing_life(Duration::ZERO), Duration::ZERO);
    }
}
