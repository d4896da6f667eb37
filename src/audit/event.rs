//! Audit entries that are not requests: who was let in or shut out (sign-ins through the
//! identity provider, tokens issued, revocations, people disabled). They go in the same file as
//! the usage records, told apart by their `event` field.

use std::time::SystemTime;

use serde::{Serialize, Serializer};

#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// `sign_in`, `sign_in_refused`, `token`, `token_refused`, `sign_out`, `revoke`, `disable`,
    /// `enable`.
    pub event: &'static str,
    /// The person, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The sign-in (session) concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Who acted: `person` (from their machine) or `admin`.
    pub by: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    /// Why a refusal, or how many sign-ins a revocation ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditEvent {
    pub fn new(event: &'static str, by: &'static str) -> Self {
        AuditEvent {
            time: SystemTime::now(),
            event,
            user: None,
            team: None,
            groups: Vec::new(),
            session: None,
            by,
            client_ip: None,
            detail: None,
        }
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}
