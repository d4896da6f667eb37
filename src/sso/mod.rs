//! Sign-in with the company's identity provider, and gateway tokens for the people signed in.
//!
//! An engineer runs `tollgate login`: the gateway starts a device sign-in at the identity
//! provider (its client secret never leaves the gateway), the engineer approves it in a browser,
//! and the gateway checks the provider's ID token, maps the person's groups to a policy, and
//! keeps a session. The engineer's machine holds only the session's refresh credential, which
//! `tollgate token` trades for a short-lived gateway token; each trade asks the identity provider
//! again (its refresh grant), so a person disabled there, or moved between groups, is refused or
//! re-mapped at their next token. An admin revocation ends a session's tokens at once.

pub mod idp;
mod policy;
mod seal;
pub mod token;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde_json::{json, Value};

use crate::auth::{hash_key, ApiKey, KeyHash};
use crate::config::SsoConfig;
use crate::store::{SsoSession, Store};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use idp::{IdentityProvider, IdpError, TokenAnswer};
pub use policy::Groups;
use token::TokenKeys;
pub use token::{TokenClaims, TokenError, KID_PREFIX, TOKEN_ISSUER};

/// The prefix of a session's refresh credential, as the engineer's machine keeps it.
pub const REFRESH_PREFIX: &str = "tgr-";
/// Verified tokens cached at most; beyond, expired entries go, then all.
const CACHE_CAPACITY: usize = 65_536;

/// Why a sign-in step failed: an HTTP status for the client, a short code, and a message that
/// names no secret.
#[derive(Debug)]
pub struct SsoError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// The person concerned, when the step got as far as knowing who (for the audit log).
    pub user: Option<String>,
}

fn err(status: u16, code: &'static str, message: impl Into<String>) -> SsoError {
    SsoError { status, code, message: message.into(), user: None }
}

impl SsoError {
    fn of(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }
}

impl From<IdpError> for SsoError {
    fn from(e: IdpError) -> Self {
        match &e {
            IdpError::Refused { .. } | IdpError::BadIdToken(_) => err(401, "identity_provider", e.to_string()),
            IdpError::Busy => err(503, "busy", e.to_string()),
            // The detail (addresses, connection errors) is for the operator's log, not callers.
            IdpError::Unavailable(detail) => {
                tracing::warn!(%detail, "the identity provider cannot be reached");
                err(
                    503,
                    "identity_provider_unavailable",
                    "the identity provider cannot be reached now: try again later",
                )
            }
        }
    }
}

/// The outcome of polling a device sign-in.
pub enum DevicePoll {
    /// Not approved yet: ask again after `interval` seconds.
    Pending {
        slow_down: bool,
    },
    SignedIn(Value),
}

/// What outlives a reload: revocations, disabled people, refreshes under way. (Verified tokens
/// are cached per build: a reload re-verifies them against its own keys and groups.)
#[derive(Default)]
struct Shared {
    /// Revoked sign-ins, with when this gateway learnt of each (see [`Sso::sync`]).
    revoked: RwLock<HashMap<String, Instant>>,
    disabled: RwLock<HashSet<String>>,
    /// One refresh at a time per sign-in: two would spend the same identity-provider refresh
    /// token, which a provider that rotates them takes for a replay.
    refreshing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A verified token: cloned on every request that presents it, so reference counts only.
#[derive(Clone)]
struct Cached {
    key: Arc<ApiKey>,
    exp: u64,
    sid: Arc<str>,
    user: Arc<str>,
}

/// A revoked id learnt here is kept this long even if the store does not list it yet.
const REVOKED_GRACE: Duration = Duration::from_secs(60);

pub struct Sso {
    pub idp: IdentityProvider,
    keys: TokenKeys,
    pub groups: Groups,
    user_claim: String,
    groups_claim: String,
    session_lifetime: Duration,
    seal: seal::Sealer,
    /// Seals the identity provider's device codes, so polls with codes this gateway did not
    /// hand out never reach the provider.
    device_seal: seal::Sealer,
    shared: Arc<Shared>,
    cache: Mutex<FxHashMap<KeyHash, Cached>>,
}

/// A refresh credential: the prefix and 64 hex digits.
fn is_refresh_credential(s: &str) -> bool {
    s.strip_prefix(REFRESH_PREFIX).is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn now_secs() -> u64 {
    crate::auth::unix_now()
}

fn now_ms() -> i64 {
    crate::limits::now_ms()
}

impl Sso {
    /// Builds from the config; a reload keeps the running one's revocations and cache.
    pub fn build(c: &SsoConfig, running: Option<&Sso>) -> Result<Self, String> {
        let master = c.signing_secret.resolve().map_err(|e| format!("sso.signing_secret: {e}"))?;
        let keys = TokenKeys::new(master.expose().as_bytes(), c.key_rotation, c.token_lifetime)?;
        let seal = seal::Sealer::new(&keys.derive("idp refresh token seal"));
        let device_seal = seal::Sealer::new(&keys.derive("device code seal"));
        let shared = running.map(|r| r.shared.clone()).unwrap_or_default();
        Ok(Sso {
            idp: IdentityProvider::new(c)?,
            keys,
            groups: Groups::build(&c.groups)?,
            user_claim: c.user_claim.clone(),
            groups_claim: c.groups_claim.clone(),
            session_lifetime: c.session_lifetime,
            seal,
            device_seal,
            shared,
            cache: Mutex::default(),
        })
    }

    /// Whether `text` is a gateway token (by its key id), before any signature check.
    fn is_gateway_token(text: &str) -> bool {
        jsonwebtoken::decode_header(text).is_ok_and(|h| h.kid.is_some_and(|k| k.starts_with(KID_PREFIX)))
    }

    /// The principal a gateway token stands for: signature, expiry, revocation, the person not
    /// disabled, and their groups mapped by the running config. `None` when `token` is not a
    /// gateway token (another issuer's JWT): a token verified before costs a hash and a map
    /// lookup, its header is read only the first time.
    pub fn authenticate(&self, token: &[u8]) -> Option<Result<Arc<ApiKey>, TokenError>> {
        let now = now_secs();
        let digest = hash_key(token);
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&digest).cloned();
        let entry = match cached {
            Some(c) if c.exp > now => c,
            _ => {
                let text = std::str::from_utf8(token).ok().filter(|t| Self::is_gateway_token(t))?;
                match self.verify(text, digest, now) {
                    Ok(entry) => entry,
                    Err(e) => return Some(Err(e)),
                }
            }
        };
        Some(self.still_valid(entry))
    }

    /// Verifies a token not seen before and caches what it stands for.
    fn verify(&self, text: &str, digest: KeyHash, now: u64) -> Result<Cached, TokenError> {
        let claims = self.keys.verify(text, now)?;
        let key = self.groups.principal(&claims.user, &claims.groups, claims.exp).ok_or_else(|| TokenError {
            reason: "no_group",
            message: format!("{} is in no group this gateway serves", claims.user),
        })?;
        let entry = Cached { key, exp: claims.exp, sid: claims.sid.into(), user: claims.user.into() };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, c| c.exp > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(digest, entry.clone());
        Ok(entry)
    }

    /// Checked on every request, cached or not: a revocation applies at once.
    fn still_valid(&self, entry: Cached) -> Result<Arc<ApiKey>, TokenError> {
        if self.shared.revoked.read().unwrap_or_else(|p| p.into_inner()).contains_key(&*entry.sid) {
            return Err(TokenError {
                reason: "revoked",
                message: "this sign-in was revoked: run `tollgate login`".into(),
            });
        }
        if self.shared.disabled.read().unwrap_or_else(|p| p.into_inner()).contains(&*entry.user) {
            return Err(TokenError {
                reason: "disabled",
                message: format!("{} is disabled in this gateway", entry.user),
            });
        }
        Ok(entry.key)
    }

    /// The groups a valid gateway token carries (for the managed settings).
    pub fn token_groups(&self, token: &[u8]) -> Result<Vec<String>, TokenError> {
        self.authenticate(token)
            .unwrap_or_else(|| Err(TokenError { reason: "issuer", message: "not a token of this gateway".into() }))?;
        let text = std::str::from_utf8(token).unwrap_or_default();
        Ok(self.keys.verify(text, now_secs())?.groups)
    }

    /// Claude Code's managed settings for a token's bearer.
    pub fn settings(&self, token: &[u8]) -> Result<Value, TokenError> {
        Ok(Value::Object(self.groups.settings(&self.token_groups(token)?)))
    }

    /// Starts a device sign-in at the identity provider. The device code handed out is the
    /// provider's, sealed with its expiry.
    pub async fn start_device(&self) -> Result<Value, SsoError> {
        let answer = self.idp.device_authorization().await?;
        // Only what the engineer's machine needs; never anything else the provider sent.
        let mut out = serde_json::Map::new();
        for field in ["user_code", "verification_uri", "verification_uri_complete", "expires_in", "interval"] {
            if let Some(v) = answer.get(field) {
                out.insert(field.into(), v.clone());
            }
        }
        let (Some(code), true) = (answer["device_code"].as_str(), out.contains_key("user_code")) else {
            return Err(err(502, "identity_provider", "the identity provider's device answer lacks its codes"));
        };
        let expires = now_secs() + answer["expires_in"].as_u64().unwrap_or(600).min(3600);
        let sealed = self.device_seal.seal(json!({ "c": code, "e": expires }).to_string().as_bytes(), b"device");
        out.insert("device_code".into(), Value::String(URL_SAFE_NO_PAD.encode(sealed)));
        Ok(Value::Object(out))
    }

    /// Polls a device sign-in; when approved, the person's session and first token.
    pub async fn poll_device(&self, store: Arc<dyn Store>, device_code: &str) -> Result<DevicePoll, SsoError> {
        let envelope = URL_SAFE_NO_PAD
            .decode(device_code)
            .ok()
            .and_then(|b| self.device_seal.open(&b, b"device"))
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .ok_or_else(|| err(400, "invalid_request", "not a device code this gateway handed out"))?;
        if envelope["e"].as_u64().is_none_or(|e| e <= now_secs()) {
            return Err(err(401, "expired", "the sign-in took too long: run `tollgate login` again"));
        }
        let code = envelope["c"].as_str().unwrap_or_default();
        let grant = [("grant_type", "urn:ietf:params:oauth:grant-type:device_code"), ("device_code", code)];
        match self.idp.token(&grant).await {
            Ok(answer) => self.sign_in(store, answer).await.map(DevicePoll::SignedIn),
            Err(IdpError::Refused { error, .. }) if error == "authorization_pending" => {
                Ok(DevicePoll::Pending { slow_down: false })
            }
            Err(IdpError::Refused { error, .. }) if error == "slow_down" => Ok(DevicePoll::Pending { slow_down: true }),
            Err(IdpError::Refused { error, description, .. }) => Err(err(
                401,
                "sign_in_failed",
                format!(
                    "the sign-in did not complete: {error}{}",
                    description.map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Who an ID token names: subject, user and groups.
    async fn identity(&self, id_token: &str) -> Result<(String, String, Vec<String>), SsoError> {
        let claims = self.idp.verify_id_token(id_token).await?;
        let subject = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| err(401, "identity_provider", "the ID token's subject is not a string"))?
            .to_string();
        // An address the provider says is unverified names nobody: anyone could have typed it.
        let unverified =
            matches!(claims.get("email_verified"), Some(Value::Bool(false))) || claims["email_verified"] == "false";
        if self.user_claim == "email" && unverified {
            return Err(err(401, "identity_provider", "the identity provider has not verified this email address"));
        }
        let user = claims
            .get(&self.user_claim)
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                err(401, "identity_provider", format!("the ID token lacks the {:?} claim", self.user_claim))
            })?
            .to_string();
        let groups = match claims.get(&self.groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(_) => return Err(err(401, "identity_provider", "the ID token's groups claim is not a list")),
        };
        Ok((subject, user, groups))
    }

    fn check_person(&self, user: &str, groups: &[String]) -> Result<(), SsoError> {
        if self.shared.disabled.read().unwrap_or_else(|p| p.into_inner()).contains(user) {
            return Err(err(403, "disabled", format!("{user} is disabled in this gateway")).of(user));
        }
        if self.groups.resolve(groups).is_none() {
            return Err(err(403, "no_group", format!("{user} is in no group this gateway serves")).of(user));
        }
        Ok(())
    }

    async fn sign_in(&self, store: Arc<dyn Store>, answer: TokenAnswer) -> Result<Value, SsoError> {
        let id_token = answer.id_token.ok_or_else(|| {
            err(502, "identity_provider", "the identity provider sent no ID token (is `openid` a scope?)")
        })?;
        let (subject, user, groups) = self.identity(&id_token).await?;
        self.check_person(&user, &groups)?;
        let secret: [u8; 32] = rand::random();
        let refresh = format!("{REFRESH_PREFIX}{}", hex::encode(secret));
        let id = hex::encode(rand::random::<[u8; 16]>());
        let now = now_ms();
        let session = SsoSession {
            idp_refresh: answer.refresh_token.map(|t| self.seal.seal(t.as_bytes(), id.as_bytes())),
            id,
            subject,
            user,
            groups,
            refresh_hash: hex::encode(hash_key(refresh.as_bytes())),
            created_ms: now,
            expires_ms: now + self.session_lifetime.as_millis() as i64,
            last_seen_ms: now,
            revoked_ms: None,
        };
        blocking(&store, {
            let session = session.clone();
            move |s| s.insert_session(&session)
        })
        .await?;
        tracing::info!(user = %session.user, groups = ?session.groups, session = %session.id, "signed in");
        let mut out = self.issue(&session);
        out["refresh_token"] = Value::String(refresh);
        Ok(out)
    }

    /// A gateway token for a session, with what the client shows the person.
    fn issue(&self, s: &SsoSession) -> Value {
        let iat = now_secs();
        let claims = TokenClaims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_ISSUER.into(),
            sub: s.subject.clone(),
            user: s.user.clone(),
            groups: s.groups.clone(),
            sid: s.id.clone(),
            iat,
            // Never past the sign-in itself.
            exp: (iat + self.keys.lifetime.as_secs()).min((s.expires_ms / 1000).max(0) as u64),
        };
        let team = self.groups.resolve(&s.groups).and_then(|r| r.team);
        json!({
            "expires_in": claims.exp.saturating_sub(iat),
            "access_token": self.keys.sign(&claims),
            "token_type": "Bearer",
            "user": s.user,
            "team": team,
            "groups": s.groups,
            "session": s.id,
        })
    }

    /// Trades a session's refresh credential for a new gateway token, asking the identity
    /// provider again first: a person it no longer knows is signed out.
    pub async fn refresh(&self, store: Arc<dyn Store>, refresh: &str) -> Result<Value, SsoError> {
        let signed_out = || err(401, "signed_out", "this sign-in is not valid: run `tollgate login`");
        // Malformed credentials cost no database query.
        if !is_refresh_credential(refresh) {
            return Err(signed_out());
        }
        let hash = hex::encode(hash_key(refresh.as_bytes()));
        let lookup = |store: Arc<dyn Store>| {
            let hash = hash.clone();
            async move { blocking(&store, move |s| s.session_by_refresh(&hash)).await }
        };
        let id = lookup(store.clone()).await?.ok_or_else(signed_out)?.id;
        // One refresh per sign-in at a time; the next one reads what this one wrote.
        let gate =
            self.shared.refreshing.lock().unwrap_or_else(|p| p.into_inner()).entry(id.clone()).or_default().clone();
        let result = async {
            let _turn = gate.lock().await;
            let session = lookup(store.clone()).await?.ok_or_else(signed_out)?;
            self.refresh_session(&store, session).await
        }
        .await;
        let mut refreshing = self.shared.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        if refreshing.get(&id).is_some_and(|g| Arc::strong_count(g) <= 2) {
            refreshing.remove(&id);
        }
        result
    }

    async fn refresh_session(&self, store: &Arc<dyn Store>, mut session: SsoSession) -> Result<Value, SsoError> {
        let signed_out = || err(401, "signed_out", "this sign-in is not valid: run `tollgate login`");
        let revoked_here = self.shared.revoked.read().unwrap_or_else(|p| p.into_inner()).contains_key(&session.id);
        if session.revoked_ms.is_some() || revoked_here || session.expires_ms <= now_ms() {
            return Err(signed_out().of(&session.user));
        }
        // Disabled here: no need to ask the provider (the groups are checked on its answer).
        if self.is_disabled(&session.user) {
            return Err(err(403, "disabled", format!("{} is disabled in this gateway", session.user)).of(&session.user));
        }
        let sealed = session.idp_refresh.clone().ok_or_else(|| {
            err(401, "signed_out", "the identity provider gave no refresh token for this sign-in: run `tollgate login`")
                .of(&session.user)
        })?;
        let idp_refresh =
            self.seal.open(&sealed, session.id.as_bytes()).and_then(|t| String::from_utf8(t).ok()).ok_or_else(
                || err(401, "signed_out", "this sign-in was sealed with another signing secret: run `tollgate login`"),
            )?;
        match self.idp.token(&[("grant_type", "refresh_token"), ("refresh_token", &idp_refresh)]).await {
            Ok(answer) => {
                // A rotated refresh token is kept before anything else can fail: the spent one
                // would be refused next time (and a provider with reuse detection would end
                // every token of the sign-in).
                if let Some(t) = answer.refresh_token {
                    session.idp_refresh = Some(self.seal.seal(t.as_bytes(), session.id.as_bytes()));
                    self.renew(store, &session).await?;
                }
                // The groups of the person now, or no token: a policy is never older than the
                // last refresh.
                let id_token = answer.id_token.ok_or_else(|| {
                    err(401, "signed_out", "the identity provider sent no ID token on refresh: run `tollgate login`")
                        .of(&session.user)
                })?;
                let (subject, user, groups) = self.identity(&id_token).await.map_err(|e| e.of(&session.user))?;
                if subject != session.subject || user != session.user {
                    // Budgets, revocations and the ledger know the person by name.
                    self.end_session(store, &session, "the identity provider now names this person differently")
                        .await?;
                    return Err(err(
                        401,
                        "signed_out",
                        "the identity provider now names you differently: run `tollgate login`",
                    )
                    .of(&session.user));
                }
                session.groups = groups;
            }
            // The provider no longer vouches for this person: the sign-in ends here.
            Err(IdpError::Refused { error, .. }) if error == "invalid_grant" => {
                self.end_session(store, &session, "the identity provider refused its refresh token").await?;
                return Err(err(401, "signed_out", "the identity provider ended this sign-in: run `tollgate login`")
                    .of(&session.user));
            }
            // Anything else (the gateway's own client refused, the provider busy) says nothing
            // about the person: the sign-in stays, the caller may retry.
            Err(IdpError::Refused { error, status, .. }) => {
                tracing::warn!(%error, status, user = %session.user, "the identity provider refused a refresh; the sign-in is kept");
                return Err(err(
                    503,
                    "identity_provider_unavailable",
                    "the identity provider cannot renew sign-ins now: try again later",
                ));
            }
            Err(e) => return Err(e.into()),
        }
        session.last_seen_ms = now_ms();
        self.renew(store, &session).await?;
        self.check_person(&session.user, &session.groups)?;
        Ok(self.issue(&session))
    }

    /// Writes what a refresh learnt; a sign-in revoked meanwhile stays revoked (and signed out).
    async fn renew(&self, store: &Arc<dyn Store>, session: &SsoSession) -> Result<(), SsoError> {
        let renewed = blocking(store, {
            let session = session.clone();
            move |s| s.renew_session(&session)
        })
        .await?;
        if !renewed {
            return Err(err(401, "signed_out", "this sign-in was revoked: run `tollgate login`").of(&session.user));
        }
        Ok(())
    }

    /// Ends one sign-in: in the store first, so every gateway learns of it, then here.
    async fn end_session(&self, store: &Arc<dyn Store>, session: &SsoSession, why: &str) -> Result<(), SsoError> {
        let id = session.id.clone();
        blocking(store, move |s| s.revoke_session(&id, now_ms())).await?;
        self.shared.revoked.write().unwrap_or_else(|p| p.into_inner()).insert(session.id.clone(), Instant::now());
        tracing::info!(user = %session.user, session = %session.id, %why, "sign-in ended");
        Ok(())
    }

    /// Ends the sign-in a refresh credential belongs to (`tollgate logout`).
    pub async fn logout(&self, store: Arc<dyn Store>, refresh: &str) -> Result<Option<String>, SsoError> {
        if !is_refresh_credential(refresh) {
            return Ok(None);
        }
        let hash = hex::encode(hash_key(refresh.as_bytes()));
        let Some(session) = blocking(&store, move |s| s.session_by_refresh(&hash)).await? else { return Ok(None) };
        self.end_session(&store, &session, "signed out by its person").await?;
        Ok(Some(session.user))
    }

    /// Revokes every session of `user` at once; returns how many.
    pub fn revoke(&self, store: &dyn Store, user: &str) -> Result<usize, String> {
        let ids = store.revoke_sessions(user, now_ms()).map_err(|e| e.to_string())?;
        let now = Instant::now();
        self.shared.revoked.write().unwrap_or_else(|p| p.into_inner()).extend(ids.iter().map(|id| (id.clone(), now)));
        tracing::info!(%user, sessions = ids.len(), "sign-ins revoked");
        Ok(ids.len())
    }

    /// Disables (or enables) a person in the gateway; disabling revokes their sessions too.
    pub fn set_disabled(&self, store: &dyn Store, user: &str, disabled: bool) -> Result<usize, String> {
        store.set_person_disabled(user, disabled, now_ms()).map_err(|e| e.to_string())?;
        let mut set = self.shared.disabled.write().unwrap_or_else(|p| p.into_inner());
        if disabled {
            set.insert(user.to_string());
            drop(set);
            return self.revoke(store, user);
        }
        set.remove(user);
        Ok(0)
    }

    /// Catches up with revocations and disabled people recorded by other gateways of a fleet
    /// (and, at start, by this one before it restarted). The whole set is read each time: it
    /// holds only sign-ins revoked and not yet expired, and no clock decides what is missed.
    pub fn sync(&self, store: &dyn Store) -> Result<(), String> {
        let stored = store.revoked_sessions(now_ms()).map_err(|e| e.to_string())?;
        let disabled = store.disabled_people().map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut revoked = self.shared.revoked.write().unwrap_or_else(|p| p.into_inner());
        let listed: HashSet<&String> = stored.iter().collect();
        // Ids gone from the store expired; ids learnt here a moment ago may not be listed yet.
        revoked.retain(|id, learnt| listed.contains(id) || now.duration_since(*learnt) < REVOKED_GRACE);
        for id in &stored {
            revoked.entry(id.clone()).or_insert(now);
        }
        drop(revoked);
        *self.shared.disabled.write().unwrap_or_else(|p| p.into_inner()) = disabled.into_iter().collect();
        Ok(())
    }

    /// Whether `user` is disabled in the gateway.
    pub fn is_disabled(&self, user: &str) -> bool {
        self.shared.disabled.read().unwrap_or_else(|p| p.into_inner()).contains(user)
    }
}

/// Runs a store call off the async workers.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    call: impl FnOnce(&dyn Store) -> crate::store::StoreResult<T> + Send + 'static,
) -> Result<T, SsoError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || call(&*store))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "a session store call did not finish");
            err(503, "store_unavailable", "the session store cannot be reached now: try again later")
        })?
        .map_err(|e| {
            tracing::warn!(error = %e, "the session store cannot be reached");
            err(503, "store_unavailable", "the session store cannot be reached now: try again later")
        })
}
