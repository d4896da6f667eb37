//! Budgets and rate limits as the config writes them (their enforcement is `limits`'s).

use serde::{Deserialize, Serialize};

use super::Period;

/// Key scopes counted in memory at most, unless the config says otherwise: keys and the JWT
/// principals seen (a principal is a key of its own, made from a token's claims).
pub const DEFAULT_MAX_PRINCIPALS: usize = 100_000;

/// A spending cap over a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit_nanos: u64,
    pub period: Period,
}

/// How a budget is written in TOML and in the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub usd: f64,
    #[serde(default)]
    pub period: Period,
}

impl BudgetConfig {
    pub fn to_budget(self) -> Result<Budget, String> {
        if !self.usd.is_finite() || self.usd < 0.0 || self.usd > 1e9 {
            return Err(format!("a budget is a USD amount between 0 and 1e9, not {}", self.usd));
        }
        Ok(Budget { limit_nanos: (self.usd * 1e9).round() as u64, period: self.period })
    }
}

/// Rate limits of one scope; an absent limit does not apply. Tokens per minute count input
/// tokens (plain and cache writes, as the provider's own limits do) and output tokens apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        *self == RateLimits::default()
    }

    pub fn validate(&self) -> Result<(), String> {
        let zero = [self.rpm.map(u64::from), self.input_tpm, self.output_tpm, self.concurrency.map(u64::from)]
            .contains(&Some(0));
        if zero {
            return Err("a rate limit of 0 would refuse everything: disable the key instead".into());
        }
        Ok(())
    }
}
