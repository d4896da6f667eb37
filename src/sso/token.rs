//! Gateway tokens: short-lived JWTs (HS256) the gateway signs for a signed-in person.
//!
//! Every rotation period has its own signing key, derived from the configured master secret with
//! HMAC-SHA256 and named by its period number in `kid` (`tg1-<period>`). So keys change on their
//! own, every gateway of a fleet derives the same ones without talking to the others, and a token
//! signed just before a change stays valid until it expires.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::hmac;
use serde::{Deserialize, Serialize};

/// `iss` and `aud` of every gateway token: a token minted for anything else never verifies here.
pub const TOKEN_ISSUER: &str = "tollgate-sso";
/// The `kid` prefix that marks a gateway token (and its key generation).
pub const KID_PREFIX: &str = "tg1-";

/// What a gateway token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub iss: String,
    pub aud: String,
    /// The person's subject at the identity provider.
    pub sub: String,
    /// The person's name in records (the configured user claim, e.g. their email).
    pub user: String,
    /// Their groups at the identity provider when the token was issued.
    pub groups: Vec<String>,
    /// The sign-in this token belongs to: revoking it ends the token.
    pub sid: String,
    pub iat: u64,
    pub exp: u64,
}

/// Why a gateway token was refused (a metric label and a message that never repeats the
/// token): the same shape as a JWT issuer's refusals.
pub use crate::auth::JwtError as TokenError;

fn fail(reason: &'static str, message: impl Into<String>) -> TokenError {
    TokenError { reason, message: message.into() }
}

pub struct TokenKeys {
    master: hmac::Key,
    rotation: u64,
    pub lifetime: Duration,
}

impl TokenKeys {
    pub fn new(master: &[u8], rotation: Duration, lifetime: Duration) -> Result<Self, String> {
        if master.len() < 32 {
            return Err("sso.signing_secret needs at least 32 bytes".into());
        }
        if rotation < lifetime {
            return Err("sso.key_rotation must be at least sso.token_lifetime".into());
        }
        Ok(TokenKeys {
            master: hmac::Key::new(hmac::HMAC_SHA256, master),
            rotation: rotation.as_secs().max(1),
            lifetime,
        })
    }

    /// A key for another purpose, derived from the same master secret (e.g. sealing the identity
    /// provider's refresh tokens at rest).
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        let tag = hmac::sign(&self.master, format!("tollgate sso {purpose}").as_bytes());
        tag.as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    fn period_key(&self, period: u64) -> [u8; 32] {
        self.derive(&format!("token key {period}"))
    }

    pub fn sign(&self, claims: &TokenClaims) -> String {
        let period = claims.iat / self.rotation;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(format!("{KID_PREFIX}{period}"));
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&self.period_key(period)))
            .expect("HS256 over serializable claims")
    }

    /// Checks a token's key, signature, issuer, audience and expiry. `now` in Unix seconds.
    pub fn verify(&self, token: &str, now: u64) -> Result<TokenClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| fail("malformed", "the token is not a JWT"))?;
        if header.alg != Algorithm::HS256 {
            return Err(fail("algorithm", "a gateway token is HS256"));
        }
        let period: u64 = header
            .kid
            .as_deref()
            .and_then(|k| k.strip_prefix(KID_PREFIX))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| fail("unknown_kid", "the token names no gateway key"))?;
        // Only the current key and the one before it can have signed a live token.
        let current = now / self.rotation;
        if period > current || period + 1 < current {
            return Err(fail("unknown_kid", "the token's key is not one this gateway signs with now"));
        }
        let mut v = Validation::new(Algorithm::HS256);
        // Expiry is checked below against `now`, the one clock this check uses.
        v.validate_exp = false;
        v.set_issuer(&[TOKEN_ISSUER]);
        v.set_audience(&[TOKEN_ISSUER]);
        v.required_spec_claims = ["exp", "iss", "aud", "sub"].into_iter().map(String::from).collect();
        let key = DecodingKey::from_secret(&self.period_key(period));
        let data = jsonwebtoken::decode::<TokenClaims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => fail("signature", "the token's signature does not verify"),
                K::ExpiredSignature => fail("expired", "the token has expired: run `tollgate token` for a new one"),
                K::InvalidAudience => fail("audience", "the token is not meant for this gateway"),
                K::InvalidIssuer => fail("issuer", "the token was not issued by this gateway"),
                _ => fail("malformed", format!("the token cannot be read: {e}")),
            }
        })?;
        let c = data.claims;
        // No leeway: the gateway issued it on its own clock (a fleet's clocks agree to well
        // under a second), and a token at its exact second is done.
        if c.exp <= now {
            return Err(fail("expired", "the token has expired: run `tollgate token` for a new one"));
        }
        if c.exp.saturating_sub(c.iat) > self.lifetime.as_secs() + 1 {
            return Err(fail("lifetime", "the token lives longer than this gateway issues them"));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(
            b"a master secret of at least thirty-two bytes",
            Duration::from_secs(86_400),
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    fn claims(iat: u64) -> TokenClaims {
        TokenClaims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_ISSUER.into(),
            sub: "alice".into(),
            user: "alice@example.com".into(),
            groups: vec!["eng".into()],
            sid: "s1".into(),
            iat,
            exp: iat + 3600,
        }
    }

    #[test]
    fn round_trip_across_a_key_change() {
        let k = keys();
        // Issued a minute before the period ends, checked a minute after: the previous key.
        let iat = 86_400 * 100 - 60;
        let t = k.sign(&claims(iat));
        assert_eq!(k.verify(&t, iat + 120).unwrap(), claims(iat));
        assert_eq!(k.verify(&t, iat + 3600).unwrap_err().reason, "expired");
    }

    #[test]
    fn refuses_what_it_did_not_sign() {
        let k = keys();
        let other = TokenKeys::new(
            b"another master secret, also thirty-two bytes",
            Duration::from_secs(86_400),
            Duration::from_secs(3600),
        )
        .unwrap();
        let iat = 1_800_000_000;
        assert_eq!(k.verify(&other.sign(&claims(iat)), iat + 1).unwrap_err().reason, "signature");
        let mut c = claims(iat);
        c.aud = "someone-else".into();
        assert_eq!(k.verify(&k.sign(&c), iat + 1).unwrap_err().reason, "audience");
        let mut c = claims(iat);
        c.exp = iat + 7200;
        assert_eq!(k.verify(&k.sign(&c), iat + 1).unwrap_err().reason, "lifetime");
        // A key two periods old signs nothing live.
        assert_eq!(k.verify(&k.sign(&claims(iat)), iat + 2 * 86_400).unwrap_err().reason, "unknown_kid");
    }
}
