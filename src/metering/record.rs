//! The usage record: one per request, written to the audit log (and later the ledger).

use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::protocol::usage::Usage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The provider's answer reached the client whole.
    Complete,
    /// The answer started but was cut short (client gone, upstream broke off, timeout).
    Incomplete,
    /// The provider answered with an error status, passed on to the client.
    UpstreamError,
    /// The gateway refused the request itself (auth, validation, unknown model).
    Rejected,
    /// The gateway could not get an answer from any provider.
    Failed,
}

impl Outcome {
    /// The name the audit log and the ledger write.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Incomplete => "incomplete",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }
}

/// Why a record's usage or cost is not the provider's own final count, and by which rule it was
/// set instead (docs/pricing.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimate {
    /// The stream ended before its final usage: output tokens are bounded from above by the
    /// content bytes streamed.
    StreamedContent,
    /// An interrupted stream under a budget, charged its reservation's worst case by the
    /// operator's `controls.interrupted = "reservation"` policy.
    Reservation,
    /// A successful answer that reported no usage at all: charged the request's worst case.
    MissingUsage,
    /// Cache writes reported without their TTL split, priced as 1-hour writes because the
    /// request asked for 1-hour caching.
    CacheTtlFromRequest,
}

impl Estimate {
    /// The rule named by [`Estimate::as_str`].
    pub fn parse(s: &str) -> Option<Estimate> {
        [Estimate::StreamedContent, Estimate::Reservation, Estimate::MissingUsage, Estimate::CacheTtlFromRequest]
            .into_iter()
            .find(|e| e.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Estimate::StreamedContent => "streamed_content",
            Estimate::Reservation => "reservation",
            Estimate::MissingUsage => "missing_usage",
            Estimate::CacheTtlFromRequest => "cache_ttl_from_request",
        }
    }
}

/// Absent fields are left out of the JSON line rather than written as `null` (a reader that
/// treats a missing field as null sees the same record, in fewer bytes).
#[derive(Debug, Clone, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// How the caller authenticated: `key`, `jwt`, `sso` (a gateway token of a person signed
    /// in through the identity provider), or `listener` (its listener's `anonymous_key`); absent
    /// when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<&'static str>,
    /// The API format the client spoke: `anthropic`, `bedrock` or `vertex`.
    pub format: crate::protocol::inbound::Format,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    /// The public model name the request resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    pub status: u16,
    pub stream: bool,
    pub usage: Usage,
    /// Exact cost in nano-dollars (1e-9 USD); `cost_usd` is the same for people.
    pub cost_nanos: u64,
    pub cost_usd: f64,
    /// False when the model had no price: the cost is then 0 and must not be trusted.
    pub priced: bool,
    /// Set when the usage or cost is an estimate rather than the provider's count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_estimated: Option<Estimate>,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<f64>,
    pub outcome: Outcome,
    /// Why the request did not complete, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Each try at a provider endpoint, in order; more than one means a fallback happened.
    pub attempts: Vec<AttemptRecord>,
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// One try at one endpoint, as the usage record shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub provider: String,
    pub endpoint: String,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: f64,
    /// Why the attempt was abandoned; absent for the one that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<String>,
    /// An abandoned attempt whose request reached the provider whole: the provider may have
    /// generated (and billed) an answer the gateway never read.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub may_be_billed: bool,
    /// When the attempt began (its trace span's start); not in the record.
    #[serde(skip)]
    pub started: Option<std::time::Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_are_the_serialized_ones() {
        for o in [Outcome::Complete, Outcome::Incomplete, Outcome::UpstreamError, Outcome::Rejected, Outcome::Failed] {
            assert_eq!(serde_json::to_value(o).unwrap(), serde_json::Value::from(o.as_str()));
        }
    }
}
