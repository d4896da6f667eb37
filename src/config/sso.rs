//! `[sso]`: engineers sign in with the company's identity provider (OIDC), and IdP groups carry
//! their team, models, budget, limits and Claude Code's managed settings.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{duration, BudgetConfig, RateLimits, SecretRef};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsoConfig {
    /// The identity provider's issuer URL; its discovery document is
    /// `{issuer}/.well-known/openid-configuration`. HTTPS, or `http://` on a loopback address.
    pub issuer: String,
    /// The gateway's client at the identity provider (a confidential client: the secret never
    /// leaves the gateway).
    pub client_id: String,
    pub client_secret: SecretRef,
    /// Scopes asked for at sign-in; `offline_access` lets the gateway re-check the person at the
    /// identity provider each time it issues a token.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The ID-token claim that names the person (`email`, `preferred_username`, `sub`).
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// The ID-token claim that lists the person's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The master secret gateway tokens are signed with: each rotation period gets its own key,
    /// derived from it, so every gateway of a fleet signs and verifies alike.
    pub signing_secret: SecretRef,
    /// How often the signing key changes; tokens of the previous key stay valid until they expire.
    #[serde(default = "default_key_rotation", deserialize_with = "duration")]
    pub key_rotation: Duration,
    /// How long a gateway token is valid.
    #[serde(default = "default_token_lifetime", deserialize_with = "duration")]
    pub token_lifetime: Duration,
    /// How long a sign-in lasts before the person must sign in again.
    #[serde(default = "default_session_lifetime", deserialize_with = "duration")]
    pub session_lifetime: Duration,
    /// Allows an `http://` issuer on a loopback address: for tests and local identity providers
    /// only. Anything else must be HTTPS.
    #[serde(default)]
    pub allow_http: bool,
    /// Groups, most specific first: the first group of a person's that is listed here gives
    /// their team, budget and limits; their models are those of every listed group they are in.
    #[serde(default, rename = "group")]
    pub groups: Vec<SsoGroupConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsoGroupConfig {
    /// The group's name as the identity provider sends it in the groups claim.
    pub name: Spanned<String>,
    /// The team the group's people count against (a `[[team]]` for a shared budget).
    #[serde(default)]
    pub team: Option<String>,
    /// Globs over public model names; absent allows every model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Each person's own budget and limits.
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    #[serde(default)]
    pub limits: RateLimits,
    /// Claude Code's managed settings for the group's people (`permissions`, `env`, ...),
    /// served at `GET /sso/settings`; several groups' settings merge, the first group winning.
    #[serde(default)]
    pub settings: Option<toml::Table>,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile", "groups", "offline_access"].map(String::from).to_vec()
}
fn default_user_claim() -> String {
    "email".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_key_rotation() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_token_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_session_lifetime() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
