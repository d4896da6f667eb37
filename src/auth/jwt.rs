//! JWTs as credentials: short-lived tokens minted by Claude Code's `apiKeyHelper` (signed with a
//! shared secret) or by the company's identity provider (RSA, EC or Ed25519 keys, from PEM files
//! or a JWKS URL), mapped to a user and a team and governed like keys.
//!
//! Signatures are checked by the `jsonwebtoken` crate; this module picks the issuer and the key
//! and applies the policy. A verified token is cached by its hash until it expires, so a client
//! that sends the same token on every request pays for one signature check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustc_hash::FxHashMap;
use serde_json::Value;

use super::{hash_key, ApiKey, KeyHash, KeySource};
use crate::config::JwtIssuerConfig;
use crate::limits::{BudgetConfig, Policy};

/// Key families: an algorithm is only ever checked with a key of its own family, so an HMAC
/// secret can never be a public key in disguise (nor the reverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

fn family(alg: Algorithm) -> Family {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => Family::Hmac,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
        ES256 | ES384 => Family::Ec,
        EdDSA => Family::Ed,
    }
}

pub use crate::config::parse_algorithm;

struct VerifyKey {
    kid: Option<String>,
    family: Family,
    key: DecodingKey,
}

/// Keys fetched from a JWKS URL, refreshed in the background; keys that left the set stay usable
/// for a grace period (tokens signed just before a rotation are still valid).
pub struct Jwks {
    pub url: String,
    pub refresh: Duration,
    pub grace: Duration,
    keys: ArcSwap<Vec<(Arc<VerifyKey>, Instant)>>,
    state: Mutex<JwksState>,
}

#[derive(Default)]
struct JwksState {
    fetched: Option<Instant>,
    error: Option<String>,
}

impl Jwks {
    pub fn new(url: String, refresh: Duration, grace: Duration) -> Self {
        Jwks { url, refresh, grace, keys: ArcSwap::from_pointee(Vec::new()), state: Mutex::default() }
    }

    /// Whether the set holds a key for `alg` named `kid` (any of its family without a `kid`).
    pub fn has_key(&self, alg: Algorithm, kid: Option<&str>) -> bool {
        self.keys.load().iter().any(|(k, _)| k.family == family(alg) && (kid.is_none() || k.kid.as_deref() == kid))
    }

    /// Checks `token` against this set's keys of its algorithm's family (never an HMAC one) and
    /// `v`; the claims when one key verifies it.
    pub fn decode(&self, token: &str, v: &Validation) -> Result<Value, jsonwebtoken::errors::Error> {
        use jsonwebtoken::errors::{Error, ErrorKind};
        let header = jsonwebtoken::decode_header(token)?;
        let f = family(header.alg);
        if f == Family::Hmac || !v.algorithms.contains(&header.alg) {
            return Err(Error::from(ErrorKind::InvalidAlgorithm));
        }
        let keys = self.keys.load();
        let mut last = Error::from(ErrorKind::InvalidSignature);
        for (k, _) in keys.iter().filter(|(k, _)| k.family == f && (header.kid.is_none() || k.kid == header.kid)) {
            match jsonwebtoken::decode::<Value>(token, &k.key, v) {
                Ok(data) => return Ok(data.claims),
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn due(&self, now: Instant) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // After a failure, retry sooner than the refresh interval.
        let every = if s.error.is_some() { self.refresh.min(Duration::from_secs(10)) } else { self.refresh };
        s.fetched.is_none_or(|t| now.duration_since(t) >= every)
    }

    pub fn last_error(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).error.clone()
    }

    /// Applies a fetched JWKS document (or the error fetching it).
    pub fn apply(&self, fetched: Result<Vec<u8>, String>) {
        let now = Instant::now();
        // Key by key: one key this gateway cannot use (an encryption key, an unknown curve) must
        // not make the others unusable.
        #[derive(serde::Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let parsed = fetched.and_then(|body| {
            serde_json::from_slice::<RawSet>(&body).map_err(|e| format!("JWKS at {} is not a key set: {e}", self.url))
        });
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.fetched = Some(now);
        let raw = match parsed {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed; the keys held are kept");
                state.error = Some(e);
                return;
            }
        };
        state.error = None;
        let mut keys: Vec<(Arc<VerifyKey>, Instant)> = Vec::new();
        for value in raw.keys {
            let jwk: Jwk = match serde_json::from_value(value) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %e, "JWK this gateway cannot use skipped");
                    continue;
                }
            };
            let jwk = &jwk;
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                // A shared secret has no business in a published key set.
                AlgorithmParameters::OctetKey(_) => continue,
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => keys.push((Arc::new(VerifyKey { kid: jwk.common.key_id.clone(), family, key }), now)),
                Err(e) => tracing::warn!(url = %self.url, kid = ?jwk.common.key_id, error = %e, "unusable JWK skipped"),
            }
        }
        // Keys that left the set are kept through the grace period.
        for (old, seen) in self.keys.load().iter() {
            let still_listed = keys.iter().any(|(k, _)| k.kid == old.kid && k.family == old.family);
            if !still_listed && now.duration_since(*seen) < self.grace {
                keys.push((old.clone(), *seen));
            }
        }
        self.keys.store(Arc::new(keys));
    }
}

/// One trusted token issuer and its policy.
pub struct Issuer {
    pub name: String,
    iss: Option<String>,
    audience: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    max_lifetime: Option<u64>,
    required_claims: Vec<String>,
    user_claim: String,
    team_claim: Option<String>,
    models_claim: Option<String>,
    /// What every principal of this issuer gets: models, its own budget and limits.
    models: Option<Vec<String>>,
    budget: Option<BudgetConfig>,
    policy: Policy,
    static_keys: Vec<Arc<VerifyKey>>,
    pub jwks: Option<Arc<Jwks>>,
}

/// Why a token was refused: a metric label and a message that never repeats the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtError {
    pub reason: &'static str,
    pub message: String,
}

fn fail(reason: &'static str, message: impl Into<String>) -> JwtError {
    JwtError { reason, message: message.into() }
}

fn load_pem(path: &std::path::Path) -> Result<(Family, DecodingKey), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Family::Rsa, k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok((Family::Ec, k));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        return Ok((Family::Ed, k));
    }
    Err(format!("{} holds no RSA, EC or Ed25519 public key in PEM", path.display()))
}

impl Issuer {
    pub fn from_config(c: &JwtIssuerConfig, running: Option<&Issuer>) -> Result<Self, String> {
        let name = c.name.get_ref().clone();
        let algorithms = c.algorithms.iter().map(|a| parse_algorithm(a)).collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(format!("JWT issuer {name:?}: list the accepted algorithms"));
        }
        let mut static_keys = Vec::new();
        for s in &c.secrets {
            let secret = s.secret.resolve().map_err(|e| format!("JWT issuer {name:?}: {e}"))?;
            if secret.expose().len() < 32 {
                return Err(format!("JWT issuer {name:?}: an HMAC secret needs at least 32 bytes"));
            }
            let key = DecodingKey::from_secret(secret.expose().as_bytes());
            static_keys.push(Arc::new(VerifyKey { kid: s.kid.clone(), family: Family::Hmac, key }));
        }
        for p in &c.public_keys {
            let (family, key) = load_pem(&p.file).map_err(|e| format!("JWT issuer {name:?}: {e}"))?;
            static_keys.push(Arc::new(VerifyKey { kid: p.kid.clone(), family, key }));
        }
        // A reload keeps the keys already fetched from the same URL.
        let jwks = c.jwks_url.as_ref().map(|url| match running.and_then(|r| r.jwks.as_ref()) {
            Some(j) if &j.url == url && j.refresh == c.jwks_refresh && j.grace == c.jwks_grace => j.clone(),
            // New settings for the same URL: the keys held carry over until the next fetch.
            Some(j) if &j.url == url => {
                let fresh = Jwks::new(url.clone(), c.jwks_refresh, c.jwks_grace);
                fresh.keys.store(j.keys.load_full());
                Arc::new(fresh)
            }
            _ => Arc::new(Jwks::new(url.clone(), c.jwks_refresh, c.jwks_grace)),
        });
        if static_keys.is_empty() && jwks.is_none() {
            return Err(format!("JWT issuer {name:?} has no keys: give secrets, public_keys or jwks_url"));
        }
        for alg in &algorithms {
            let f = family(*alg);
            let has = static_keys.iter().any(|k| k.family == f) || (f != Family::Hmac && jwks.is_some());
            if !has {
                return Err(format!("JWT issuer {name:?}: no key can check {alg:?}"));
            }
        }
        c.limits.validate().map_err(|e| format!("JWT issuer {name:?}: {e}"))?;
        let policy = Policy { budget: c.budget.map(BudgetConfig::to_budget).transpose()?, limits: c.limits };
        Ok(Issuer {
            name,
            iss: c.issuer.clone(),
            audience: c.audience.clone(),
            algorithms,
            leeway: c.leeway.as_secs(),
            max_lifetime: c.max_lifetime.map(|d| d.as_secs()),
            required_claims: c.required_claims.clone(),
            user_claim: c.user_claim.clone(),
            team_claim: c.team_claim.clone(),
            models_claim: c.models_claim.clone(),
            models: c.models.clone(),
            budget: c.budget,
            policy,
            static_keys,
            jwks,
        })
    }

    /// The budget and limits each principal of this issuer gets.
    pub fn principal_policy(&self) -> Policy {
        self.policy
    }

    /// The keys that may have signed a token with this header.
    fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<Arc<VerifyKey>> {
        let f = family(alg);
        let fetched = self.jwks.as_ref().map(|j| j.keys.load_full());
        let fetched_keys = fetched.iter().flat_map(|v| v.iter().map(|(k, _)| k));
        self.static_keys
            .iter()
            .chain(fetched_keys)
            .filter(|k| k.family == f && (kid.is_none() || k.kid.as_deref() == kid))
            .cloned()
            .collect()
    }

    fn verify(&self, token: &str, alg: Algorithm, kid: Option<&str>, now: u64) -> Result<(Arc<ApiKey>, u64), JwtError> {
        if !self.algorithms.contains(&alg) {
            return Err(fail(
                "algorithm",
                format!("JWT algorithm {alg:?} is not accepted from issuer {:?}", self.name),
            ));
        }
        let keys = self.candidates(alg, kid);
        if keys.is_empty() {
            return Err(match kid {
                Some(kid) => fail("unknown_kid", format!("JWT key id {kid:?} is unknown to issuer {:?}", self.name)),
                None => fail("unknown_kid", format!("issuer {:?} has no key for {alg:?}", self.name)),
            });
        }
        let mut v = Validation::new(alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.required_spec_claims = ["exp".to_string()].into_iter().collect();
        if self.max_lifetime.is_some() {
            v.required_spec_claims.insert("iat".into());
        }
        if let Some(iss) = &self.iss {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            v.required_spec_claims.insert("aud".into());
        }
        let mut last = fail("signature", "JWT signature does not verify");
        for key in keys {
            match jsonwebtoken::decode::<Value>(token, &key.key, &v) {
                Ok(data) => return self.principal(data.claims, kid, now),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        // Another key of the same family may have signed it.
                        K::InvalidSignature => continue,
                        K::ExpiredSignature => fail("expired", "JWT has expired"),
                        K::ImmatureSignature => fail("not_yet_valid", "JWT is not valid yet (nbf)"),
                        K::InvalidAudience => fail("audience", "JWT audience is not accepted"),
                        K::InvalidIssuer => fail("issuer", "JWT issuer is not accepted"),
                        K::MissingRequiredClaim(c) => fail("missing_claim", format!("JWT lacks the {c:?} claim")),
                        K::InvalidAlgorithm => fail("algorithm", "JWT algorithm does not match its key"),
                        _ => fail("malformed", format!("JWT cannot be read: {e}")),
                    };
                    return Err(last);
                }
            }
        }
        Err(last)
    }

    /// Maps verified claims to the principal requests are governed as.
    fn principal(&self, claims: Value, kid: Option<&str>, now: u64) -> Result<(Arc<ApiKey>, u64), JwtError> {
        let exp = claims["exp"].as_u64().ok_or_else(|| fail("malformed", "JWT exp is not a number"))?;
        if let Some(max) = self.max_lifetime {
            if claims.get("iat").is_none_or(Value::is_null) {
                return Err(fail("missing_claim", "JWT lacks the \"iat\" claim"));
            }
            let iat = claims["iat"].as_u64().ok_or_else(|| fail("malformed", "JWT iat is not a number"))?;
            if exp.saturating_sub(iat) > max {
                return Err(fail("lifetime", format!("JWT lives longer than the {max} s this issuer allows")));
            }
            if iat > now + self.leeway {
                return Err(fail("not_yet_valid", "JWT was issued in the future (iat)"));
            }
        }
        for c in &self.required_claims {
            if claims.get(c).is_none_or(Value::is_null) {
                return Err(fail("missing_claim", format!("JWT lacks the {c:?} claim")));
            }
        }
        let text = |name: &str| claims.get(name).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        let user = text(&self.user_claim)
            .ok_or_else(|| fail("missing_claim", format!("JWT lacks the {:?} claim (a string)", self.user_claim)))?;
        let team = self.team_claim.as_deref().and_then(text);
        let models = match self.models_claim.as_deref().and_then(|c| claims.get(c)) {
            Some(list) => Some(
                list.as_array()
                    .and_then(|a| a.iter().map(|m| m.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| fail("malformed", "JWT models claim is not a list of names"))?,
            ),
            None => self.models.clone(),
        };
        let id = format!("{}:{user}", self.name);
        let key = ApiKey {
            scope_id: id.as_str().into(),
            id,
            user: Some(user),
            team,
            models,
            expires: Some(UNIX_EPOCH + Duration::from_secs(exp)),
            disabled: false,
            budget: self.budget,
            limits: self.policy.limits,
            policy: self.policy,
            source: KeySource::Jwt,
            jwt: Some(JwtOrigin { issuer: self.name.clone(), kid: kid.map(str::to_string) }),
        };
        Ok((Arc::new(key), exp))
    }
}

/// Which issuer and key vouched for a principal; it goes into the usage record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtOrigin {
    pub issuer: String,
    pub kid: Option<String>,
}

/// Verified tokens by hash, until they expire.
const CACHE_CAPACITY: usize = 65_536;

/// Every issuer of the running config, and the cache of verified tokens.
#[derive(Default)]
pub struct JwtVerifier {
    pub issuers: Vec<Issuer>,
    cache: Mutex<FxHashMap<KeyHash, (Arc<ApiKey>, u64)>>,
}

/// Three dot-separated parts, the first a base64url JSON object: the shape of a JWS.
pub fn looks_like_jwt(token: &[u8]) -> bool {
    token.starts_with(b"eyJ") && token.iter().filter(|b| **b == b'.').count() == 2
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl JwtVerifier {
    pub fn build(configs: &[JwtIssuerConfig], running: Option<&JwtVerifier>) -> Result<Self, String> {
        let by_name: HashMap<&str, &Issuer> =
            running.map(|r| r.issuers.iter().map(|i| (i.name.as_str(), i)).collect()).unwrap_or_default();
        let issuers = configs
            .iter()
            .map(|c| Issuer::from_config(c, by_name.get(c.name.get_ref().as_str()).copied()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JwtVerifier { issuers, cache: Mutex::default() })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies `token` and returns the principal it stands for.
    pub fn verify(&self, token: &[u8]) -> Result<Arc<ApiKey>, JwtError> {
        let now = unix_now();
        let digest = hash_key(token);
        if let Some((key, exp)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&digest) {
            if *exp > now {
                return Ok(key.clone());
            }
        }
        let (key, exp) = self.check(token, now)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, (_, e)| *e > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        // Cached until it expires, without leeway: a cached answer is never more lenient.
        cache.insert(digest, (key.clone(), exp));
        Ok(key)
    }

    /// Verifies `token` without the cache: the signature and every claim.
    pub fn check(&self, token: &[u8], now: u64) -> Result<(Arc<ApiKey>, u64), JwtError> {
        let token = std::str::from_utf8(token).map_err(|_| fail("malformed", "JWT is not text"))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| fail("malformed", "the credential is not a JWT with an accepted algorithm"))?;
        let issuer = self.issuer_of(token)?;
        issuer.verify(token, header.alg, header.kid.as_deref(), now)
    }

    /// The issuer whose `iss` the token names (read before the signature is checked, only to
    /// choose which keys check it); with one issuer, that one.
    fn issuer_of(&self, token: &str) -> Result<&Issuer, JwtError> {
        if let [only] = self.issuers.as_slice() {
            return Ok(only);
        }
        use base64::Engine as _;
        let payload = token.split('.').nth(1).unwrap_or_default();
        let iss = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["iss"].as_str().map(str::to_string));
        self.issuers
            .iter()
            .find(|i| i.iss.is_some() && i.iss == iss)
            .ok_or_else(|| fail("issuer", "JWT issuer is not one this gateway trusts"))
    }

    /// JWKS sets to keep fresh.
    pub fn jwks(&self) -> Vec<Arc<Jwks>> {
        self.issuers.iter().filter_map(|i| i.jwks.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "a-shared-secret-of-32-bytes-or-more!";

    fn verifier(extra: &str) -> (JwtVerifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:1\"\n[[jwt_issuer]]\nname = \"h\"\nalgorithms = [\"HS256\"]\n\
             secrets = [{{ kid = \"k1\", secret = \"file:{}\" }}]\n{extra}",
            secret.display()
        );
        let config = crate::config::load_str(&text, "t.toml").unwrap();
        (JwtVerifier::build(&config.jwt_issuers, None).unwrap(), dir)
    }

    fn token(claims: Value) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        encode(&h, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    #[test]
    fn none_is_never_an_algorithm() {
        assert!(parse_algorithm("none").is_err());
        assert!(parse_algorithm("NONE").is_err());
        assert_eq!(parse_algorithm("ES256").unwrap(), Algorithm::ES256);
        let text = "[[listener]]\naddress = \"127.0.0.1:1\"\n[[jwt_issuer]]\nname = \"h\"\nalgorithms = [\"none\"]\n\
                    secrets = [{ secret = \"env:X\" }]\n";
        let e = crate::config::load_str(text, "t.toml").unwrap_err();
        assert!(e.message.contains("\"none\" is never accepted"), "{e}");
    }

    #[test]
    fn maps_claims_and_caches_until_expiry() {
        let (v, _dir) = verifier("max_lifetime = \"2h\"\n");
        let now = unix_now();
        let t = token(serde_json::json!({"user": "alice", "team": "x", "iat": now, "exp": now + 600}));
        assert!(looks_like_jwt(t.as_bytes()));
        let k = v.verify(t.as_bytes()).unwrap();
        assert_eq!((k.id.as_str(), k.user.as_deref(), k.team.as_deref()), ("h:alice", Some("alice"), Some("x")));
        assert_eq!(k.jwt, Some(JwtOrigin { issuer: "h".into(), kid: Some("k1".into()) }));
        assert!(Arc::ptr_eq(&k, &v.verify(t.as_bytes()).unwrap()), "the second sight comes from the cache");

        let long = token(serde_json::json!({"user": "alice", "iat": now, "exp": now + 3 * 3600}));
        assert_eq!(v.verify(long.as_bytes()).unwrap_err().reason, "lifetime");
        let expired = token(serde_json::json!({"user": "alice", "iat": now - 7000, "exp": now - 3600}));
        assert_eq!(v.verify(expired.as_bytes()).unwrap_err().reason, "expired");
        let anonymous = token(serde_json::json!({"team": "x", "iat": now, "exp": now + 60}));
        let e = v.verify(anonymous.as_bytes()).unwrap_err();
        assert_eq!((e.reason, e.message.as_str()), ("missing_claim", "JWT lacks the \"user\" claim (a string)"));
    }

    #[test]
    fn only_jws_shapes_are_tried() {
        assert!(!looks_like_jwt(b"tg-0123"));
        assert!(!looks_like_jwt(b"eyJhbGciOi.only-one-dot"));
    }
}
