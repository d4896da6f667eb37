//! People signed in through the identity provider (`[sso]`): who, their groups and team, their
//! sign-ins and last activity; revoking a person's sign-ins, and disabling them in the gateway.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{error, ok, status_json, Admin, Reply};
use crate::audit::AuditEvent;
use crate::limits::{now_ms, Scope, ScopeKind};

impl Admin {
    fn sso_or_404(&self) -> Result<std::sync::Arc<crate::runtime::State>, Reply> {
        let state = self.runtime.state.load_full();
        if state.sso.is_none() {
            return Err(error(404, "not_found_error", "this gateway has no sign-in ([sso] is not configured)"));
        }
        Ok(state)
    }

    /// `GET /admin/people`: one entry per person with a sign-in that has not expired.
    pub(super) fn people(&self) -> Reply {
        let state = match self.sso_or_404() {
            Ok(s) => s,
            Err(r) => return r,
        };
        let sso = state.sso.as_ref().expect("checked");
        let sessions = match self.runtime.store.sessions(now_ms()) {
            Ok(s) => s,
            Err(e) => return error(503, "api_error", format!("the session store: {e}")),
        };
        let mut people: BTreeMap<String, Value> = BTreeMap::new();
        for s in sessions {
            let p = people.entry(s.user.clone()).or_insert_with(|| {
                // The newest sign-in (sessions come newest first) says the groups and team.
                let team = sso.groups.resolve(&s.groups).and_then(|r| r.team);
                json!({
                    "user": s.user,
                    "subject": s.subject,
                    "groups": s.groups,
                    "team": team,
                    "disabled": sso.is_disabled(&s.user),
                    "last_seen_ms": 0,
                    "sessions": [],
                })
            });
            if p.get("budget").is_none() {
                if let Some(person) = sso.groups.principal(&s.user, &s.groups, 0).filter(|k| k.policy.budget.is_some())
                {
                    let scope = Scope { kind: ScopeKind::Key, id: person.scope_id.clone(), policy: person.policy };
                    p["budget"] = status_json(&self.runtime.limiter_status(&scope))["budget"].clone();
                }
            }
            p["last_seen_ms"] = json!(p["last_seen_ms"].as_i64().unwrap_or(0).max(s.last_seen_ms));
            if let Some(list) = p["sessions"].as_array_mut() {
                list.push(json!({
                    "id": s.id,
                    "created_ms": s.created_ms,
                    "last_seen_ms": s.last_seen_ms,
                    "expires_ms": s.expires_ms,
                    "revoked_ms": s.revoked_ms,
                }));
            }
        }
        ok(200, json!({ "people": people.into_values().collect::<Vec<_>>() }))
    }

    /// `POST /admin/people/{user}/revoke|disable|enable`.
    pub(super) fn person_action(&self, user: &str, action: &str) -> Reply {
        let state = match self.sso_or_404() {
            Ok(s) => s,
            Err(r) => return r,
        };
        let sso = state.sso.as_ref().expect("checked");
        let store = &*self.runtime.store;
        let (done, event) = match action {
            "revoke" => (sso.revoke(store, user), "revoke"),
            "disable" => (sso.set_disabled(store, user, true), "disable"),
            _ => (sso.set_disabled(store, user, false), "enable"),
        };
        match done {
            Ok(revoked) => {
                let mut e = AuditEvent::new(event, "admin");
                e.user = Some(user.to_string());
                e.detail = Some(format!("{revoked} sign-ins ended"));
                self.runtime.audit_event(e);
                ok(200, json!({ "user": user, "action": action, "sessions_revoked": revoked }))
            }
            Err(e) => error(503, "api_error", format!("the session store: {e}")),
        }
    }
}
