//! `/admin/usage` and `/admin/budgets`: spend from the ledger, budgets from the limiter.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::{error, ok, status_json, Admin, Reply};
use crate::limits::ScopeKind;
use crate::metering::usd;
use crate::store::{Group, UsageQuery};

/// `from`/`to` accept RFC 3339 times or plain dates (local midnight in the configured zone).
fn parse_bound(s: &str, tz: chrono_tz::Tz) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let date = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| format!("{s:?} is neither a date (2026-11-01) nor an RFC 3339 time"))?;
    use chrono::TimeZone;
    tz.from_local_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
        .earliest()
        .map(|t| t.timestamp_millis())
        .ok_or_else(|| format!("{s}: midnight does not exist in {tz}"))
}

pub(super) fn usage_query(params: &HashMap<String, String>, tz: chrono_tz::Tz) -> Result<UsageQuery, String> {
    let mut q = UsageQuery::default();
    if let Some(groups) = params.get("group_by") {
        for g in groups.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            let group =
                Group::parse(g).ok_or_else(|| format!("group_by: {g:?} is not one of key, user, team, model, day"))?;
            if !q.group_by.contains(&group) {
                q.group_by.push(group);
            }
        }
    }
    q.from_ms = params.get("from").map(|s| parse_bound(s, tz)).transpose().map_err(|e| format!("from: {e}"))?;
    q.to_ms = params.get("to").map(|s| parse_bound(s, tz)).transpose().map_err(|e| format!("to: {e}"))?;
    for kind in ScopeKind::ALL {
        if let Some(v) = params.get(kind.name()) {
            q.filters.push((kind, v.clone()));
        }
    }
    for name in params.keys() {
        if !["group_by", "from", "to", "key", "user", "team", "model"].contains(&name.as_str()) {
            return Err(format!("unknown parameter {name:?}"));
        }
    }
    Ok(q)
}

impl Admin {
    pub(super) fn usage(&self, params: &HashMap<String, String>) -> Reply {
        let tz = self.runtime.limiter.time_zone();
        let q = match usage_query(params, tz) {
            Ok(q) => q,
            Err(e) => return error(400, "invalid_request_error", e),
        };
        // What finished a moment ago belongs in the report.
        if let Err(e) = self.runtime.store.flush() {
            return error(500, "api_error", e.to_string());
        }
        match self.runtime.store.usage(&q, tz) {
            Ok(lines) => {
                let total: u64 = lines.iter().map(|l| l.cost_nanos).sum();
                let rows: Vec<Value> = lines
                    .iter()
                    .map(|l| {
                        let mut v = serde_json::to_value(l).expect("usage lines serialize");
                        v["cost_usd"] = json!(usd(l.cost_nanos));
                        v
                    })
                    .collect();
                ok(
                    200,
                    json!({
                        "group_by": q.group_by,
                        "time_zone": tz.name(),
                        "rows": rows,
                        "total_cost_nanos": total,
                        "total_cost_usd": usd(total),
                    }),
                )
            }
            Err(e) => error(500, "api_error", e.to_string()),
        }
    }

    /// Every budget in force (keys, users, teams), with spend and reservations now.
    pub(super) fn budgets(&self) -> Reply {
        let list: Vec<Value> = self
            .runtime
            .scopes()
            .into_iter()
            .filter(|s| s.policy.budget.is_some())
            .map(|s| {
                let mut v = status_json(&self.runtime.limiter_status(&s));
                v["scope"] = json!(s.kind);
                v["id"] = json!(&*s.id);
                v
            })
            .collect();
        ok(200, json!({ "time_zone": self.runtime.limiter.time_zone().name(), "budgets": list }))
    }
}

/// The counters the console shows beside the ledger: refusals, fallbacks and upstream errors
/// since this gateway started.
const OVERVIEW: &[&str] = &[
    "tollgate_refused_total",
    "tollgate_client_refused_total",
    "tollgate_fallbacks_total",
    "tollgate_upstream_errors_total",
    "tollgate_upstream_attempts_total",
    "tollgate_endpoint_cooldowns_total",
];

impl Admin {
    /// `/admin/overview`: [`OVERVIEW`]'s counters of this gateway, by label.
    pub(super) fn overview(&self) -> Reply {
        let mut counters = serde_json::Map::new();
        for family in self.runtime.metrics.registry.gather() {
            if !OVERVIEW.contains(&family.name()) {
                continue;
            }
            let series: Vec<Value> = family
                .get_metric()
                .iter()
                .map(|m| {
                    let labels: serde_json::Map<String, Value> =
                        m.get_label().iter().map(|l| (l.name().to_string(), json!(l.value()))).collect();
                    json!({ "labels": labels, "value": m.get_counter().value() })
                })
                .collect();
            counters.insert(family.name().to_string(), Value::Array(series));
        }
        ok(200, json!({ "counters": counters }))
    }
}
