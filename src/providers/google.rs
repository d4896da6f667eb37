//! Google OAuth2 access tokens for Vertex AI. From a service-account key Tollgate runs the JWT
//! bearer grant (RFC 7523) itself: sign a short assertion with the account's RSA key, trade it
//! at the token endpoint, fetch the next one before this one expires. Every other kind of
//! Google credential (the metadata server's workload identity, external accounts for workload
//! identity federation, user and impersonated credentials) comes from Google's own
//! `google-cloud-auth`, which renews them itself. Fetching happens on the refresh thread; the
//! request path only reads the token held.

use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The last moment this token is sent: a little before it expires for a service-account
    /// token ([`super::signing_life`]), the end of the hold for one from Google's library.
    expires_at: Instant,
}

pub struct TokenSource {
    pub account: String,
    pub token_uri: String,
    kind: Kind,
    held: ArcSwapOption<Held>,
    state: Mutex<(Option<Instant>, Option<String>)>,
    /// When a call to Google's library still under way began. The library answers at once
    /// while it holds a valid token; a call that waits means the token expired and its renewal
    /// is being tried.
    /// On the request path: an atomic (`now_ms() + 1`, 0 for none), not a lock.
    asking_since: AtomicU64,
}

enum Kind {
    /// A service-account key: Tollgate signs assertions with it.
    Key(jsonwebtoken::EncodingKey),
    /// Google's credentials library, from a credentials file (`Some`) or Application Default
    /// Credentials; built on the refresh thread, whose runtime runs its renewal task.
    Library(Option<serde_json::Value>, Mutex<Option<google_cloud_auth::credentials::AccessTokenCredentials>>),
}

/// A call to Google's library that has not answered after this long means its token expired
/// (it answers at once while it holds a valid one): the token held here is not used meanwhile.
const LIBRARY_WAIT: Duration = Duration::from_millis(200);

/// How long a token from Google's library is used without hearing from it again. The library
/// renews tokens itself (four minutes before they expire) and does not say when they expire,
/// so it is asked again every quarter of a second or so, and its answer held this long: long enough to ride out a
/// slow answer, well inside the four minutes.
const LIBRARY_TOKEN_HOLD: Duration = Duration::from_secs(60);

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
            kind: Kind::Key(encoding),
            held: ArcSwapOption::empty(),
            state: Mutex::new((None, None)),
            asking_since: AtomicU64::new(0),
        })
    }

    /// Credentials read by Google's library: a credentials file of any type it knows
    /// (`json`), or Application Default Credentials from the environment (`None`).
    pub fn from_library(json: Option<&str>) -> Result<Self, String> {
        let (account, value) = match json {
            Some(text) => {
                let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    format!("not a Google credentials file: not valid JSON (line {}, column {})", e.line(), e.column())
                })?;
                let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or_default();
                if !matches!(kind, "external_account" | "authorized_user" | "impersonated_service_account") {
                    return Err(format!(
                        "a Google credentials file of type {kind:?}: Tollgate reads service_account, external_account, \
                         authorized_user and impersonated_service_account"
                    ));
                }
                (format!("{kind} credentials"), Some(value))
            }
            None => ("Application Default Credentials".to_string(), None),
        };
        Ok(TokenSource {
            account,
            token_uri: String::new(),
            kind: Kind::Library(value, Mutex::new(None)),
            held: ArcSwapOption::empty(),
            state: Mutex::new((None, None)),
            asking_since: AtomicU64::new(0),
        })
    }

    /// Reads the credentials file or ADC again on the next pass (a reload).
    pub fn renew_soon(&self) {
        if let Kind::Library(_, built) = &self.kind {
            *built.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Whether Tollgate fetches this token itself (the JWT bearer grant) rather than
    /// Google's library.
    pub fn is_key(&self) -> bool {
        matches!(self.kind, Kind::Key(_))
    }

    /// Asks Google's library for its current token (it renews it itself); on the refresh
    /// thread.
    pub async fn refresh_from_library(&self) {
        let Kind::Library(json, built) = &self.kind else { return };
        let held = built.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // A library built just now (at start, after a reload or an error) has to go over the
        // network for its first token, and its errors say nothing about the token held here:
        // that one signs until it expires. Only an instance that has answered before is
        // watched for waits and believed when it fails.
        let fresh = held.is_none();
        let _asking = (!fresh).then(|| Asking::start(&self.asking_since));
        let token = async {
            let creds = match held {
                Some(c) => c,
                None => {
                    let c = build_library(json.clone())?;
                    *built.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                    c
                }
            };
            creds.access_token().await.map_err(|e| {
                // The library stops renewing for good after an error it deems permanent
                // (an `invalid_grant`, say): start again from the file on the next try.
                *built.lock().unwrap_or_else(|p| p.into_inner()) = None;
                format!("{e}")
            })
        };
        let answer = match tokio::time::timeout(Duration::from_secs(30), token).await {
            Ok(Ok(t)) => Ok(t.token),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("Google's credentials library gave no token within 30 s".into()),
        };
        drop(_asking);
        if answer.is_err() && !fresh {
            // A library that has answered before fails only once it holds no valid token: the
            // one held here is dead too, and signing with it would earn clients a provider's 401.
            self.held.store(None);
        }
        // The library's answer carries no expiry: held for a fixed time, asked again soon.
        self.hold(Instant::now(), answer.map(|token| (token, LIBRARY_TOKEN_HOLD, LIBRARY_WAIT)));
    }

    /// The signed assertion for the token endpoint, valid one hour from `now` (Unix seconds).
    pub fn assertion(&self, now: u64) -> Result<String, String> {
        let Kind::Key(key) = &self.kind else { return Err("no service-account key to sign with".into()) };
        let claims = Assertion { iss: &self.account, scope: SCOPE, aud: &self.token_uri, iat: now, exp: now + 3600 };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &claims, key)
            .map_err(|e| format!("cannot sign the token assertion: {e}"))
    }

    /// `Authorization: Bearer …` with the token held, or why there is none.
    pub fn header(&self) -> Result<HeaderValue, String> {
        let since = self.asking_since.load(Ordering::Acquire);
        if since != 0 {
            let waited = (super::now_ms() + 1).saturating_sub(since);
            if waited > LIBRARY_WAIT.as_millis() as u64 {
                return Err(format!(
                    "no OAuth token for {}: Google's credentials library is renewing an expired token ({waited} ms so far)",
                    self.account
                ));
            }
        }
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

    /// Applies the token endpoint's answer (or the error getting it) to a request sent at
    /// `asked`: the token's life counts from then, so a slow answer does not stretch it.
    pub fn apply(&self, answer: Result<Vec<u8>, String>, asked: Instant) {
        #[derive(Deserialize)]
        struct TokenAnswer {
            access_token: String,
            expires_in: u64,
        }
        let parsed = answer.and_then(|b| {
            serde_json::from_slice::<TokenAnswer>(&b).map_err(|e| format!("token endpoint answer unreadable: {e}"))
        });
        self.hold(
            asked,
            parsed.map(|t| {
                // Sent until just before it expires ([`super::signing_life`]), renewed when a
                // fifth of its life (at most five minutes) is left before then. A life outside
                // a second to a day is an endpoint's mistake: clamped, so a zero does not ask
                // again at every pass and a huge one does not overflow.
                let life = Duration::from_secs(t.expires_in.clamp(1, 86_400));
                let sign_for = super::signing_life(life);
                (t.access_token, sign_for, sign_for - (life / 5).min(Duration::from_secs(300)))
            }),
        );
    }

    /// Holds a token, sent for `sign_for` from `since` and renewed `renew_after` it; or keeps
    /// the one held and notes why there is no new one.
    fn hold(&self, since: Instant, token: Result<(String, Duration, Duration), String>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = Some(Instant::now());
        match token {
            Ok((token, sign_for, renew_after)) => match HeaderValue::from_str(&format!("Bearer {token}")) {
                Ok(mut header) => {
                    header.set_sensitive(true);
                    self.held.store(Some(std::sync::Arc::new(Held {
                        header,
                        refresh_at: since + renew_after,
                        expires_at: since + sign_for,
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

/// Marks a call to the library as under way for [`TokenSource::header`]; cleared on drop, so
/// a call that panics or times out never leaves requests refused.
struct Asking<'a>(&'a AtomicU64);

impl<'a> Asking<'a> {
    fn start(since: &'a AtomicU64) -> Self {
        since.store(super::now_ms() + 1, Ordering::Release);
        Asking(since)
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Google's credentials for Vertex's scope: from a credentials file, or ADC.
fn build_library(
    json: Option<serde_json::Value>,
) -> Result<google_cloud_auth::credentials::AccessTokenCredentials, String> {
    use google_cloud_auth::credentials::{external_account, impersonated, user_account, Builder};
    let scopes = [SCOPE];
    let kind = json.as_ref().and_then(|j| j.get("type")).and_then(|t| t.as_str()).unwrap_or_default().to_string();
    let built = match json {
        None => Builder::default().with_scopes(scopes).build_access_token_credentials(),
        Some(j) => match kind.as_str() {
            "external_account" => {
                external_account::Builder::new(j).with_scopes(scopes).build_access_token_credentials()
            }
            "authorized_user" => user_account::Builder::new(j).with_scopes(scopes).build_access_token_credentials(),
            _ => impersonated::Builder::new(j).with_scopes(scopes).build_access_token_credentials(),
        },
    };
    built.map_err(|e| format!("Google credentials: {e}"))
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
