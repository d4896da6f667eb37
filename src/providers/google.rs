//! Google OAuth2 access tokens for Vertex AI, from a service-account key (the JWT bearer grant,
//! RFC 7523): sign a short assertion with the account's RSA key, trade it at the token endpoint,
//! cache the token and fetch the next one before this one expires. Fetching happens on a
//! background thread; the request path only reads the token held.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use serde::Deserialize;

/// The scope Vertex AI needs.
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The fields of a service-account key file that matter here.
#[derive(Deserialize)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key: String,
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

struct Held {
    header: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

pub struct TokenSource {
    pub account: String,
    pub token_uri: String,
    key: jsonwebtoken::EncodingKey,
    held: ArcSwapOption<Held>,
    state: Mutex<(Option<Instant>, Option<String>)>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").field("account", &self.account).finish_non_exhaustive()
    }
}

#[derive(Debug, serde::Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl TokenSource {
    pub fn from_key_json(json: &str) -> Result<Self, String> {
        // serde_json's messages quote the values they choke on, and this value is a secret: say
        // only where and what kind of problem.
        let key: ServiceAccountKey = serde_json::from_str(json).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Data => {
                    "JSON, but not a service-account key (it needs client_email, private_key and token_uri as strings)"
                }
                _ => "not valid JSON",
            };
            format!("not a service-account key file: {what} (line {}, column {})", e.line(), e.column())
        })?;
        let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.as_bytes())
            .map_err(|e| format!("service-account private key: {e}"))?;
        Ok(TokenSource {
            account: key.client_email,
            token_uri: key.token_uri,
            key: encoding,
            held: ArcSwapOption::empty(),
            state: Mutex::new((None, None)),
        })
    }

    /// The signed assertion for the token endpoint, valid one hour from `now` (Unix seconds).
    pub fn assertion(&self, now: u64) -> Result<String, String> {
        let claims = Assertion { iss: &self.account, scope: SCOPE, aud: &self.token_uri, iat: now, exp: now + 3600 };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &claims, &self.key)
            .map_err(|e| format!("cannot sign the token assertion: {e}"))
    }

    /// `Authorization: Bearer …` with the token held, or why there is none.
    pub fn header(&self) -> Result<HeaderValue, String> {
        match self.held.load_full() {
            Some(h) if Instant::now() < h.expires_at => Ok(h.header.clone()),
            _ => {
                let why = self.state.lock().unwrap_or_else(|p| p.into_inner()).1.clone();
                Err(format!("no OAuth token for {} yet: {}", self.account, why.unwrap_or_else(|| "not fetched".into())))
            }
        }
    }

    /// Whether a new token should be fetched now.
    pub fn due(&self, now: Instant) -> bool {
        let (tried, error) = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if error.is_some() {
            // After a failure, try again every few seconds.
            return tried.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5));
        }
        match self.held.load().as_ref() {
            Some(h) => now >= h.refresh_at,
            None => true,
        }
    }

    /// Applies the token endpoint's answer (or the error getting it).
    pub fn apply(&self, answer: Result<Vec<u8>, String>) {
        #[derive(Deserialize)]
        struct TokenAnswer {
            access_token: String,
            expires_in: u64,
        }
        let now = Instant::now();
        let parsed = answer.and_then(|b| {
            serde_json::from_slice::<TokenAnswer>(&b).map_err(|e| format!("token endpoint answer unreadable: {e}"))
        });
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = Some(now);
        match parsed {
            Ok(t) => match HeaderValue::from_str(&format!("Bearer {}", t.access_token)) {
                Ok(mut header) => {
                    header.set_sensitive(true);
                    // Renewed when a fifth of its life is left (at most five minutes before the end).
                    let life = Duration::from_secs(t.expires_in);
                    let early = (life / 5).min(Duration::from_secs(300));
                    self.held.store(Some(std::sync::Arc::new(Held {
                        header,
                        refresh_at: now + life - early,
                        expires_at: now + life,
                    })));
                    state.1 = None;
                }
                Err(_) => state.1 = Some("the token holds characters not allowed in a header".into()),
            },
            Err(e) => {
                tracing::warn!(account = %self.account, error = %e, "OAuth token refresh failed; the token held is kept");
                state.1 = Some(e);
            }
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
