//! `/admin/keys`: create, list, show, update, disable, rotate and delete keys.
//!
//! Keys from the config file are listed and shown but changed only by editing the file; keys
//! created here live in the store. The secret is returned once, at creation or rotation.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{error, ok, Admin, Reply};
use crate::auth::{generate_key, hash_key, ApiKey};
use crate::limits::{BudgetConfig, RateLimits, Scope, ScopeKind};
use crate::store::StoredKey;

/// Fields of a key in a create or update call. In an update, an absent field is kept and a
/// `null` clears it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyInput {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    user: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    team: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    budget: Option<Option<BudgetConfig>>,
    #[serde(default, deserialize_with = "present")]
    limits: Option<Option<RateLimits>>,
    /// RFC 3339, e.g. `2027-01-31T00:00:00Z`.
    #[serde(default, deserialize_with = "present")]
    expires: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    metadata: Option<Option<Map<String, Value>>>,
    #[serde(default)]
    disabled: Option<bool>,
}

/// A field that is present, even as `null`, becomes `Some(..)`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

const MAX_ID: usize = 128;
const MAX_METADATA: usize = 16 << 10;

fn valid_id(id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._@:-".contains(c);
    if id.is_empty() || id.len() > MAX_ID || !id.chars().all(ok_char) {
        return Err(format!(
            "a key id is 1 to {MAX_ID} characters among letters, digits and . _ @ : - (got {:?})",
            id.chars().take(MAX_ID).collect::<String>()
        ));
    }
    // People signed in through the identity provider count as keys `sso:<user>`.
    if id.starts_with("sso:") {
        return Err("key ids starting with \"sso:\" are reserved for people signed in with [sso]".into());
    }
    Ok(())
}

fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| format!("{s:?} is not an RFC 3339 time such as 2027-01-31T00:00:00Z"))
}

/// Applies `input` to `key`, checking every field.
fn apply(key: &mut StoredKey, input: KeyInput) -> Result<(), String> {
    if let Some(user) = input.user {
        key.user = user.filter(|u| !u.is_empty());
    }
    if let Some(team) = input.team {
        key.team = team.filter(|t| !t.is_empty());
    }
    if let Some(models) = input.models {
        if models.as_ref().is_some_and(|m| m.iter().any(|g| g.is_empty())) {
            return Err("models: an empty name matches nothing".into());
        }
        key.models = models;
    }
    if let Some(budget) = input.budget {
        if let Some(b) = budget {
            b.to_budget().map_err(|e| format!("budget: {e}"))?;
        }
        key.budget = budget;
    }
    if let Some(limits) = input.limits {
        let limits = limits.unwrap_or_default();
        limits.validate().map_err(|e| format!("limits: {e}"))?;
        key.limits = limits;
    }
    if let Some(expires) = input.expires {
        key.expires_ms = expires.as_deref().map(parse_time).transpose().map_err(|e| format!("expires: {e}"))?;
    }
    if let Some(metadata) = input.metadata {
        let metadata = metadata.unwrap_or_default();
        if serde_json::to_vec(&metadata).map(|v| v.len()).unwrap_or(usize::MAX) > MAX_METADATA {
            return Err(format!("metadata: larger than {MAX_METADATA} bytes"));
        }
        key.metadata = metadata;
    }
    if let Some(disabled) = input.disabled {
        key.disabled = disabled;
    }
    Ok(())
}

fn rfc3339_of(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Admin {
    /// The key as the API shows it, with the state of its budget and limits.
    pub(super) fn key_json(&self, k: &ApiKey, stored: Option<&StoredKey>) -> Value {
        let scope = Scope { kind: ScopeKind::Key, id: k.scope_id.clone(), policy: k.policy };
        let mut v = json!({
            "id": k.id,
            "source": k.source,
            "user": k.user,
            "team": k.team,
            "models": k.models,
            "budget": k.budget,
            "limits": k.limits,
            "expires": k.expires.map(rfc3339_of),
            "disabled": k.disabled,
            "status": super::status_json(&self.runtime.limiter_status(&scope)),
        });
        if let Some(s) = stored {
            v["metadata"] = Value::Object(s.metadata.clone());
            v["created"] = json!(crate::limits::rfc3339(s.created_ms));
            v["updated"] = json!(crate::limits::rfc3339(s.updated_ms));
        }
        v
    }

    fn stored(&self) -> Result<Vec<StoredKey>, Reply> {
        self.runtime.store.keys().map_err(|e| error(500, "api_error", e.to_string()))
    }

    fn refresh(&self) -> Result<(), Reply> {
        self.runtime
            .refresh_keys()
            .map_err(|e| error(500, "api_error", format!("the key was saved but not applied: {e}")))
    }

    pub(super) fn list_keys(&self) -> Reply {
        let stored = match self.stored() {
            Ok(s) => s,
            Err(r) => return r,
        };
        let keys = self.runtime.keys.load();
        let list: Vec<Value> =
            keys.all().iter().map(|k| self.key_json(k, stored.iter().find(|s| s.id == k.id))).collect();
        ok(200, json!({ "keys": list }))
    }

    pub(super) fn show_key(&self, id: &str) -> Reply {
        let stored = match self.stored() {
            Ok(s) => s,
            Err(r) => return r,
        };
        match self.runtime.keys.load().get(id) {
            Some(k) => ok(200, self.key_json(k, stored.iter().find(|s| s.id == k.id))),
            None => error(404, "not_found_error", format!("no key with id {id:?}")),
        }
    }

    pub(super) fn create_key(&self, body: &[u8]) -> Reply {
        let input: KeyInput = match serde_json::from_slice(body) {
            Ok(i) => i,
            Err(e) => return error(400, "invalid_request_error", format!("invalid key: {e}")),
        };
        let id = input.id.clone().unwrap_or_else(|| format!("key-{}", hex::encode(rand::random::<[u8; 6]>())));
        if let Err(e) = valid_id(&id) {
            return error(400, "invalid_request_error", e);
        }
        if self.runtime.config().keys.iter().any(|k| k.id.get_ref() == &id) {
            return error(409, "invalid_request_error", format!("key id {id:?} is taken by a key in the config file"));
        }
        let (secret, _) = generate_key();
        let now = crate::limits::now_ms();
        let mut key = StoredKey {
            id: id.clone(),
            hash: hash_key(secret.as_bytes()),
            user: None,
            team: None,
            models: None,
            budget: None,
            limits: RateLimits::default(),
            expires_ms: None,
            disabled: false,
            metadata: Map::new(),
            created_ms: now,
            updated_ms: now,
        };
        if let Err(e) = apply(&mut key, input) {
            return error(400, "invalid_request_error", e);
        }
        match self.runtime.store.insert_key(&key) {
            Ok(()) => {}
            Err(crate::store::StoreError::Duplicate(id)) => {
                return error(409, "invalid_request_error", format!("a key with id {id:?} already exists"))
            }
            Err(e) => return error(500, "api_error", e.to_string()),
        }
        if let Err(r) = self.refresh() {
            return r;
        }
        let keys = self.runtime.keys.load();
        let Some(k) = keys.get(&id) else { return error(500, "api_error", "the new key did not load") };
        let mut v = self.key_json(k, Some(&key));
        // The only time the secret is shown.
        v["secret"] = json!(secret);
        tracing::info!(key = %id, "key created");
        ok(201, v)
    }

    /// Loads a stored key for a change; keys from the config file are refused.
    fn for_change(&self, id: &str) -> Result<StoredKey, Reply> {
        if self.runtime.config().keys.iter().any(|k| k.id.get_ref() == id) {
            return Err(error(
                409,
                "invalid_request_error",
                format!("key {id:?} is defined in the config file: change it there and reload"),
            ));
        }
        self.stored()?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or_else(|| error(404, "not_found_error", format!("no key with id {id:?}")))
    }

    fn save(&self, mut key: StoredKey, extra: Option<(&str, String)>) -> Reply {
        key.updated_ms = crate::limits::now_ms();
        match self.runtime.store.update_key(&key) {
            Ok(true) => {}
            Ok(false) => return error(404, "not_found_error", format!("no key with id {:?}", key.id)),
            Err(e) => return error(500, "api_error", e.to_string()),
        }
        if let Err(r) = self.refresh() {
            return r;
        }
        let keys = self.runtime.keys.load();
        let Some(k) = keys.get(&key.id) else { return error(500, "api_error", "the key did not load") };
        let mut v = self.key_json(k, Some(&key));
        if let Some((name, value)) = extra {
            v[name] = json!(value);
        }
        ok(200, v)
    }

    pub(super) fn update_key(&self, id: &str, body: &[u8]) -> Reply {
        let input: KeyInput = match serde_json::from_slice(body) {
            Ok(i) => i,
            Err(e) => return error(400, "invalid_request_error", format!("invalid update: {e}")),
        };
        if input.id.as_deref().is_some_and(|new| new != id) {
            return error(400, "invalid_request_error", "a key's id cannot change: create a new key");
        }
        let mut key = match self.for_change(id) {
            Ok(k) => k,
            Err(r) => return r,
        };
        if let Err(e) = apply(&mut key, input) {
            return error(400, "invalid_request_error", e);
        }
        tracing::info!(key = %id, "key updated");
        self.save(key, None)
    }

    pub(super) fn set_disabled(&self, id: &str, disabled: bool) -> Reply {
        let mut key = match self.for_change(id) {
            Ok(k) => k,
            Err(r) => return r,
        };
        key.disabled = disabled;
        tracing::info!(key = %id, disabled, "key disabled state changed");
        self.save(key, None)
    }

    /// A new secret for the same key (budget, spend and history stay); the old one stops
    /// working at once.
    pub(super) fn rotate_key(&self, id: &str) -> Reply {
        let mut key = match self.for_change(id) {
            Ok(k) => k,
            Err(r) => return r,
        };
        let (secret, _) = generate_key();
        key.hash = hash_key(secret.as_bytes());
        tracing::info!(key = %id, "key rotated");
        self.save(key, Some(("secret", secret)))
    }

    pub(super) fn delete_key(&self, id: &str) -> Reply {
        if let Err(r) = self.for_change(id) {
            return r;
        }
        match self.runtime.store.delete_key(id) {
            Ok(true) => {}
            Ok(false) => return error(404, "not_found_error", format!("no key with id {id:?}")),
            Err(e) => return error(500, "api_error", e.to_string()),
        }
        if let Err(r) = self.refresh() {
            return r;
        }
        tracing::info!(key = %id, "key deleted");
        ok(200, json!({ "id": id, "deleted": true }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeySource;
    use crate::limits::Policy;

    fn policy_of(k: &StoredKey) -> Result<Policy, String> {
        Ok(Policy { budget: k.budget.map(BudgetConfig::to_budget).transpose()?, limits: k.limits })
    }

    #[test]
    fn update_distinguishes_absent_from_null() {
        let input: KeyInput =
            serde_json::from_str(r#"{"team": null, "budget": {"usd": 5, "period": "daily"}}"#).unwrap();
        let mut k = StoredKey {
            id: "k".into(),
            hash: [0; 32],
            user: Some("alice".into()),
            team: Some("t".into()),
            models: None,
            budget: None,
            limits: RateLimits::default(),
            expires_ms: None,
            disabled: false,
            metadata: Map::new(),
            created_ms: 0,
            updated_ms: 0,
        };
        apply(&mut k, input).unwrap();
        assert_eq!((k.user.as_deref(), k.team.as_deref()), (Some("alice"), None));
        assert_eq!(policy_of(&k).unwrap().budget.unwrap().limit_nanos, 5_000_000_000);
        let bad: KeyInput = serde_json::from_str(r#"{"budget": {"usd": -1}}"#).unwrap();
        assert!(apply(&mut k, bad).unwrap_err().contains("budget"));
        assert!(serde_json::from_str::<KeyInput>(r#"{"buget": 1}"#).is_err());
    }

    #[test]
    fn ids() {
        assert!(valid_id("alice@example.com:laptop-1").is_ok());
        assert!(valid_id("").is_err());
        assert!(valid_id("a b").is_err());
        assert!(valid_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn key_source_serializes() {
        assert_eq!(json!(KeySource::Api), json!("api"));
    }
}
