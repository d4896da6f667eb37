//! The gateway as an OpenID Connect client of the company's identity provider: discovery, the
//! device authorization grant, the token endpoint, and ID tokens checked against the provider's
//! published keys.
//!
//! The client secret stays in the gateway: an engineer's machine only ever holds a device code
//! (useless without the secret) and then the gateway's own refresh credential.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Jwks;
use crate::config::{Secret, SsoConfig};

/// A discovery document, a key set or a token answer larger than this is refused.
const MAX_ANSWER_BYTES: usize = 256 << 10;
/// How long a discovery document is trusted before it is fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);
/// An unknown `kid` makes the key set be fetched again, at most this often.
const JWKS_REFETCH: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
}

/// What went wrong talking to the identity provider.
#[derive(Debug)]
pub enum IdpError {
    /// The provider answered with an OAuth error (`invalid_grant`, `authorization_pending`, ...).
    Refused { status: u16, error: String, description: Option<String> },
    /// The provider could not be asked, or answered something that is not OAuth.
    Unavailable(String),
    /// An ID token that does not verify.
    BadIdToken(String),
    /// Too many calls to the provider under way (see `MAX_SIGN_IN_CALLS`).
    Busy,
}

impl std::fmt::Display for IdpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdpError::Refused { error, description, .. } => match description {
                Some(d) => write!(f, "the identity provider refused: {error} ({d})"),
                None => write!(f, "the identity provider refused: {error}"),
            },
            IdpError::Unavailable(e) => write!(f, "the identity provider is unavailable: {e}"),
            IdpError::BadIdToken(e) => write!(f, "the identity provider's ID token does not verify: {e}"),
            IdpError::Busy => write!(f, "too many sign-ins are under way: try again in a moment"),
        }
    }
}

/// Calls to the identity provider under way at once, at most, for sign-ins (anyone who reaches
/// the listener can start one) and, apart, for refreshes (callers with a sign-in): so neither
/// can spend the company's quota at the provider, and a flood of sign-ins cannot stop the
/// signed-in from renewing. Beyond it, callers get a 503 at once.
const MAX_SIGN_IN_CALLS: usize = 16;
const MAX_REFRESH_CALLS: usize = 32;

/// The token endpoint's answer (no `Debug`: it holds tokens).
#[derive(Deserialize)]
pub struct TokenAnswer {
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub refresh_token: Option<String>,
}

pub struct IdentityProvider {
    pub issuer: String,
    client_id: String,
    client_secret: Secret,
    scopes: String,
    http: reqwest::Client,
    allow_http: bool,
    discovery: tokio::sync::Mutex<Option<(Arc<Discovery>, Instant)>>,
    jwks: Mutex<Option<(Arc<Jwks>, Option<Instant>)>>,
    sign_in_calls: tokio::sync::Semaphore,
    refresh_calls: tokio::sync::Semaphore,
}

/// Whether `url` may carry the client secret or keys: HTTPS, or `http://` on a loopback
/// address when the config allows it (tests, a local provider).
fn acceptable_url(url: &str, allow_http: bool) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else { return false };
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    match uri.scheme_str() {
        Some("https") => !host.is_empty(),
        Some("http") => {
            allow_http && (host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()))
        }
        _ => false,
    }
}

impl IdentityProvider {
    pub fn new(c: &SsoConfig) -> Result<Self, String> {
        let client_secret = c.client_secret.resolve().map_err(|e| format!("sso.client_secret: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            // Answers come from the URLs the discovery document names, nowhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("sso: an HTTP client: {e}"))?;
        Ok(IdentityProvider {
            issuer: c.issuer.trim_end_matches('/').to_string(),
            client_id: c.client_id.clone(),
            client_secret,
            scopes: c.scopes.join(" "),
            http,
            allow_http: c.allow_http,
            discovery: tokio::sync::Mutex::new(None),
            jwks: Mutex::new(None),
            sign_in_calls: tokio::sync::Semaphore::new(MAX_SIGN_IN_CALLS),
            refresh_calls: tokio::sync::Semaphore::new(MAX_REFRESH_CALLS),
        })
    }

    async fn get_json(&self, url: &str) -> Result<Value, IdpError> {
        let resp = self.http.get(url).send().await.map_err(|e| IdpError::Unavailable(format!("{url}: {e}")))?;
        let status = resp.status();
        let body = read_capped(resp).await.map_err(|e| IdpError::Unavailable(format!("{url}: {e}")))?;
        if !status.is_success() {
            return Err(IdpError::Unavailable(format!("{url} answered {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| IdpError::Unavailable(format!("{url}: not JSON: {e}")))
    }

    /// The discovery document, fetched once an hour; its `issuer` must be the configured one
    /// exactly (OpenID Connect Discovery 1.0 §4.3).
    pub async fn discovery(&self) -> Result<Arc<Discovery>, IdpError> {
        let mut held = self.discovery.lock().await;
        if let Some((d, at)) = held.as_ref() {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(d.clone());
            }
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let d: Discovery = serde_json::from_value(self.get_json(&url).await?)
            .map_err(|e| IdpError::Unavailable(format!("{url}: not a discovery document: {e}")))?;
        if d.issuer.trim_end_matches('/') != self.issuer {
            return Err(IdpError::Unavailable(format!(
                "the discovery document names issuer {:?}, not the configured {:?}",
                d.issuer, self.issuer
            )));
        }
        // The client secret and the keys travel to these: the issuer's own rule applies.
        let endpoints = [Some(&d.token_endpoint), Some(&d.jwks_uri), d.device_authorization_endpoint.as_ref()];
        if let Some(bad) = endpoints.into_iter().flatten().find(|u| !acceptable_url(u, self.allow_http)) {
            return Err(IdpError::Unavailable(format!("the discovery document names {bad:?}, which is not HTTPS")));
        }
        let d = Arc::new(d);
        *held = Some((d.clone(), Instant::now()));
        Ok(d)
    }

    /// POSTs a form to one of the provider's endpoints with the client's credentials.
    async fn post_form(&self, d: &Discovery, url: &str, form: &[(&str, &str)]) -> Result<Value, IdpError> {
        let refresh = form.iter().any(|(k, v)| *k == "grant_type" && *v == "refresh_token");
        let lane = if refresh { &self.refresh_calls } else { &self.sign_in_calls };
        let _call = lane.try_acquire().map_err(|_| IdpError::Busy)?;
        // client_secret_basic is the default when the provider lists no methods (RFC 8414 §2).
        let basic = d
            .token_endpoint_auth_methods_supported
            .as_ref()
            .is_none_or(|m| m.iter().any(|m| m == "client_secret_basic"));
        let mut pairs: Vec<(&str, &str)> = form.to_vec();
        pairs.push(("client_id", &self.client_id));
        if !basic {
            pairs.push(("client_secret", self.client_secret.expose()));
        }
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
        let mut req = self.http.post(url).header("content-type", "application/x-www-form-urlencoded").body(body);
        if basic {
            // RFC 6749 §2.3.1: both parts form-encoded before the base64.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            req = req.basic_auth(enc(&self.client_id), Some(enc(self.client_secret.expose())));
        }
        let resp = req.send().await.map_err(|e| IdpError::Unavailable(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let body = read_capped(resp).await.map_err(|e| IdpError::Unavailable(format!("{url}: {e}")))?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|_| IdpError::Unavailable(format!("{url} answered {status} without JSON")))?;
        if (200..300).contains(&status) {
            return Ok(value);
        }
        match value.get("error").and_then(Value::as_str) {
            Some(error) if (400..500).contains(&status) => Err(IdpError::Refused {
                status,
                error: error.to_string(),
                description: value.get("error_description").and_then(Value::as_str).map(str::to_string),
            }),
            _ => Err(IdpError::Unavailable(format!("{url} answered {status}"))),
        }
    }

    /// Starts a device sign-in (RFC 8628 §3.1): the user code and where to enter it.
    pub async fn device_authorization(&self) -> Result<Value, IdpError> {
        let d = self.discovery().await?;
        let url = d
            .device_authorization_endpoint
            .clone()
            .ok_or_else(|| IdpError::Unavailable("the identity provider offers no device sign-in".into()))?;
        self.post_form(&d, &url, &[("scope", &self.scopes)]).await
    }

    /// Asks the token endpoint: a device code (RFC 8628 §3.4) or a refresh token.
    pub async fn token(&self, form: &[(&str, &str)]) -> Result<TokenAnswer, IdpError> {
        let d = self.discovery().await?;
        let v = self.post_form(&d, &d.token_endpoint, form).await?;
        serde_json::from_value(v).map_err(|e| IdpError::Unavailable(format!("a token answer that cannot be read: {e}")))
    }

    /// Checks an ID token: signed by one of the provider's published keys, issued by it, for this
    /// client, not expired. Returns its claims.
    pub async fn verify_id_token(&self, id_token: &str) -> Result<Value, IdpError> {
        let header = jsonwebtoken::decode_header(id_token).map_err(|e| IdpError::BadIdToken(e.to_string()))?;
        let jwks = self.jwks_for(header.alg, header.kid.as_deref()).await?;
        // Public-key signatures only: an HMAC one would be keyed by the client secret, which
        // this gateway does not sign ID tokens with.
        use Algorithm::*;
        if !matches!(header.alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA) {
            return Err(IdpError::BadIdToken(format!("{:?} is not a public-key signature", header.alg)));
        }
        // The library wants every listed algorithm to fit the key: list the token's own.
        let mut v = Validation::new(header.alg);
        v.leeway = 60;
        v.set_issuer(&[&self.issuer, &format!("{}/", self.issuer)]);
        v.set_audience(&[&self.client_id]);
        v.required_spec_claims = ["exp", "iss", "aud", "sub"].into_iter().map(String::from).collect();
        jwks.decode(id_token, &v).map_err(|e| IdpError::BadIdToken(e.to_string()))
    }

    /// The provider's key set, fetched (again) when it has no key for this token.
    async fn jwks_for(&self, alg: Algorithm, kid: Option<&str>) -> Result<Arc<Jwks>, IdpError> {
        let d = self.discovery().await?;
        let (jwks, fetched) = {
            let mut held = self.jwks.lock().unwrap_or_else(|p| p.into_inner());
            match held.as_ref() {
                Some((j, at)) if j.url == d.jwks_uri => (j.clone(), *at),
                _ => {
                    let j = Arc::new(Jwks::new(d.jwks_uri.clone(), DISCOVERY_TTL, Duration::from_secs(3600)));
                    *held = Some((j.clone(), None));
                    (j, None)
                }
            }
        };
        let stale = fetched.is_none_or(|at| at.elapsed() >= DISCOVERY_TTL);
        let unknown = !jwks.has_key(alg, kid) && fetched.is_none_or(|at| at.elapsed() >= JWKS_REFETCH);
        if stale || unknown {
            let body = async {
                let resp = self.http.get(&jwks.url).send().await.map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("JWKS at {} answered {}", jwks.url, resp.status()));
                }
                read_capped(resp).await
            };
            jwks.apply(body.await);
            let mut held = self.jwks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((j, at)) = held.as_mut() {
                if Arc::ptr_eq(j, &jwks) {
                    *at = Some(Instant::now());
                }
            }
        }
        Ok(jwks)
    }
}

/// Reads an answer, refusing it past `MAX_ANSWER_BYTES` as it arrives.
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
