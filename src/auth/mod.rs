//! Tollgate's own API keys: generated here, stored only as SHA-256 hashes, looked up in memory.
//!
//! Keys carry 192 random bits, so a plain SHA-256 is the right hash: it cannot be brute-forced
//! and costs well under a microsecond per request (a password hash would cost milliseconds).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

mod jwt;

pub use jwt::{looks_like_jwt, parse_algorithm, unix_now, Jwks, JwtError, JwtOrigin, JwtVerifier};

use crate::config::KeyConfig;
use crate::glob::glob_match;
use crate::limits::{BudgetConfig, Policy, RateLimits};
use crate::store::StoredKey;

pub const KEY_PREFIX: &str = "tg-";

pub use crate::config::{parse_expiry, parse_key_hash, KeyHash};

pub fn hash_key(key: &[u8]) -> KeyHash {
    Sha256::digest(key).into()
}

/// A fresh key and the `sha256:` hash to put in the config.
pub fn generate_key() -> (String, String) {
    let bytes: [u8; 24] = rand::random();
    let key = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    let hash = format!("sha256:{}", hex::encode(hash_key(key.as_bytes())));
    (key, hash)
}

/// Where a key is defined: the config file (changed by editing it) or the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    Config,
    Api,
    /// A principal made from a verified JWT.
    Jwt,
    /// A person signed in through the identity provider (`[sso]`).
    Sso,
}

/// Who is calling: the key and the people it belongs to.
#[derive(Debug)]
pub struct ApiKey {
    pub id: String,
    /// The id again, shared with the limiter's scopes without a copy per request.
    pub scope_id: Arc<str>,
    pub user: Option<String>,
    pub team: Option<String>,
    /// Globs over public model names; `None` allows every model.
    pub models: Option<Vec<String>>,
    pub expires: Option<SystemTime>,
    pub disabled: bool,
    pub budget: Option<BudgetConfig>,
    pub limits: RateLimits,
    /// The key's own budget and limits, checked at load.
    pub policy: Policy,
    pub source: KeySource,
    /// Set for a principal made from a JWT.
    pub jwt: Option<JwtOrigin>,
}

impl ApiKey {
    /// Whether the key may use the route `public_name`; `passthrough` is the requested name
    /// when the provider will receive it unchanged, and must then be allowed instead.
    pub fn allows(&self, public_name: &str, passthrough: Option<&str>) -> bool {
        let Some(list) = &self.models else {
            return true;
        };
        let ok = |name: &str| list.iter().any(|g| glob_match(g, name));
        match passthrough {
            // A catch-all route's own name says nothing about the model that will run.
            Some(requested) => ok(requested),
            None => ok(public_name),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no API key: send it in the x-api-key header or as Authorization: Bearer")]
    Missing,
    #[error("invalid API key")]
    Unknown,
    #[error("API key {0:?} is disabled")]
    Disabled(String),
    #[error("API key {0:?} has expired")]
    Expired(String),
}

/// Every key, by the hash of its secret. Built whole and swapped on each change.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_hash: HashMap<KeyHash, Arc<ApiKey>>,
    by_id: HashMap<String, Arc<ApiKey>>,
}

/// The live key store, shared by the proxy and the admin API.
pub type SharedKeys = Arc<arc_swap::ArcSwap<KeyStore>>;

fn policy(budget: Option<BudgetConfig>, limits: RateLimits) -> Result<Policy, String> {
    limits.validate()?;
    Ok(Policy { budget: budget.map(BudgetConfig::to_budget).transpose()?, limits })
}

impl KeyStore {
    /// The config file's keys and the admin API's. A stored key whose id the config also
    /// defines is skipped: the file wins.
    pub fn build(config: &[KeyConfig], stored: &[StoredKey]) -> Result<Self, String> {
        let mut store = KeyStore::default();
        for k in config {
            let id = k.id.get_ref().clone();
            let key = ApiKey {
                scope_id: id.as_str().into(),
                id,
                user: k.user.clone(),
                team: k.team.clone(),
                models: k.models.clone(),
                expires: k.expires.as_ref().map(|e| parse_expiry(e.get_ref())).transpose()?,
                disabled: k.disabled,
                budget: k.budget,
                limits: k.limits,
                policy: policy(k.budget, k.limits).map_err(|e| format!("key {:?}: {e}", k.id.get_ref()))?,
                source: KeySource::Config,
                jwt: None,
            };
            store.insert(parse_key_hash(k.hash.get_ref())?, key)?;
        }
        for k in stored {
            if store.by_id.contains_key(&k.id) {
                tracing::warn!(key = %k.id, "a key created through the admin API has the id of a config key; the config's wins");
                continue;
            }
            // A stored key was checked when it was written; if it no longer passes, it is
            // refused rather than stopping the gateway.
            let (policy, bad) = match policy(k.budget, k.limits) {
                Ok(p) => (p, false),
                Err(e) => {
                    tracing::error!(key = %k.id, error = %e, "stored key has an invalid policy; it is disabled");
                    (Policy::default(), true)
                }
            };
            let key = ApiKey {
                scope_id: k.id.as_str().into(),
                id: k.id.clone(),
                user: k.user.clone(),
                team: k.team.clone(),
                models: k.models.clone(),
                expires: k
                    .expires_ms
                    .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)),
                disabled: k.disabled || bad,
                budget: k.budget,
                limits: k.limits,
                policy,
                source: KeySource::Api,
                jwt: None,
            };
            store.insert(k.hash, key)?;
        }
        Ok(store)
    }

    fn insert(&mut self, hash: KeyHash, key: ApiKey) -> Result<(), String> {
        let key = Arc::new(key);
        if self.by_hash.insert(hash, key.clone()).is_some() {
            return Err(format!("key {:?} has the same hash as another key", key.id));
        }
        self.by_id.insert(key.id.clone(), key);
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Arc<ApiKey>> {
        self.by_id.get(id)
    }

    /// Every key, sorted by id.
    pub fn all(&self) -> Vec<Arc<ApiKey>> {
        let mut keys: Vec<_> = self.by_id.values().cloned().collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Finds and checks the key presented by a client.
    pub fn authenticate(&self, presented: Option<&[u8]>, now: SystemTime) -> Result<Arc<ApiKey>, AuthError> {
        let presented = presented.filter(|p| !p.is_empty()).ok_or(AuthError::Missing)?;
        let key = self.by_hash.get(&hash_key(presented)).ok_or(AuthError::Unknown)?;
        if key.disabled {
            return Err(AuthError::Disabled(key.id.clone()));
        }
        if key.expires.is_some_and(|e| e <= now) {
            return Err(AuthError::Expired(key.id.clone()));
        }
        Ok(key.clone())
    }
}

impl KeyStore {
    /// The key with this id, checked like a presented one: for a listener that stands in for
    /// clients sending no key.
    pub fn authenticate_id(&self, id: &str, now: SystemTime) -> Result<Arc<ApiKey>, AuthError> {
        let key = self.by_id.get(id).ok_or(AuthError::Unknown)?;
        if key.disabled {
            return Err(AuthError::Disabled(key.id.clone()));
        }
        if key.expires.is_some_and(|e| e <= now) {
            return Err(AuthError::Expired(key.id.clone()));
        }
        Ok(key.clone())
    }
}

/// The key a client presented: `x-api-key` (Claude Code's `ANTHROPIC_API_KEY`) or
/// `Authorization: Bearer` (`ANTHROPIC_AUTH_TOKEN`, the SDKs' `auth_token`).
pub fn presented_key<'a>(x_api_key: Option<&'a [u8]>, authorization: Option<&'a [u8]>) -> Option<&'a [u8]> {
    if let Some(k) = x_api_key.filter(|k| !k.is_empty()) {
        return Some(k.trim_ascii());
    }
    let auth = authorization?.trim_ascii();
    let scheme = auth.get(..7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| auth[7..].trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_matches_its_hash() {
        let (key, hash) = generate_key();
        assert!(key.starts_with("tg-") && key.len() == 3 + 48);
        assert_eq!(parse_key_hash(&hash).unwrap(), hash_key(key.as_bytes()));
    }

    #[test]
    fn presented_key_sources() {
        assert_eq!(presented_key(Some(b"a"), Some(b"Bearer b")), Some(&b"a"[..]));
        assert_eq!(presented_key(None, Some(b"bearer  b ")), Some(&b"b"[..]));
        assert_eq!(presented_key(None, Some(b"Basic xyz")), None);
        assert_eq!(presented_key(Some(b""), None), None);
    }

    #[test]
    fn expiry_parses_utc() {
        let dt: toml::value::Datetime = "2027-01-31T00:00:00Z".parse().unwrap();
        let t = parse_expiry(&dt).unwrap();
        assert_eq!(humantime::format_rfc3339(t).to_string(), "2027-01-31T00:00:00Z");
        let dt: toml::value::Datetime = "2027-01-31T02:00:00+02:00".parse().unwrap();
        assert_eq!(parse_expiry(&dt).unwrap(), t);
        let local: toml::value::Datetime = "2027-01-31T00:00:00".parse().unwrap();
        assert!(parse_expiry(&local).is_err());
    }
}
