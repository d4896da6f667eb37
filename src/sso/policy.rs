//! Policy by identity-provider group: which team, models, budget, limits and Claude Code settings
//! a signed-in person gets.
//!
//! The rule for people in several groups: groups are listed most specific first; the first listed
//! group a person is in gives their team, budget and limits; their models are those of every
//! listed group they are in (a group without a model list allows every model); their settings
//! merge key by key, the first group winning. Groups the gateway does not list give nothing, and
//! a person in no listed group cannot sign in.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::auth::{ApiKey, KeySource};
use crate::config::{BudgetConfig, RateLimits, SsoGroupConfig};
use crate::limits::Policy;

pub struct GroupPolicy {
    pub name: String,
    team: Option<String>,
    models: Option<Vec<String>>,
    budget: Option<BudgetConfig>,
    limits: RateLimits,
    policy: Policy,
    settings: Option<Map<String, Value>>,
}

pub struct Groups {
    listed: Vec<GroupPolicy>,
}

/// What a person's groups come to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub team: Option<String>,
    pub models: Option<Vec<String>>,
    pub budget: Option<BudgetConfig>,
    pub limits: RateLimits,
    pub policy: Policy,
}

impl Groups {
    pub fn build(configs: &[SsoGroupConfig]) -> Result<Self, String> {
        let mut listed = Vec::new();
        for g in configs {
            let name = g.name.get_ref().clone();
            g.limits.validate().map_err(|e| format!("sso group {name:?}: {e}"))?;
            let budget =
                g.budget.map(BudgetConfig::to_budget).transpose().map_err(|e| format!("sso group {name:?}: {e}"))?;
            let settings = match &g.settings {
                Some(t) => match serde_json::to_value(t).map_err(|e| format!("sso group {name:?}: settings: {e}"))? {
                    Value::Object(m) => Some(m),
                    _ => None,
                },
                None => None,
            };
            listed.push(GroupPolicy {
                name,
                team: g.team.clone(),
                models: g.models.clone(),
                budget: g.budget,
                limits: g.limits,
                policy: Policy { budget, limits: g.limits },
                settings,
            });
        }
        Ok(Groups { listed })
    }

    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }

    /// The listed groups `groups` names, in the config's order.
    fn matching<'a>(&'a self, groups: &'a [String]) -> impl Iterator<Item = &'a GroupPolicy> + 'a {
        self.listed.iter().filter(move |g| groups.contains(&g.name))
    }

    /// `None` when the person is in no listed group (and some group is listed).
    pub fn resolve(&self, groups: &[String]) -> Option<Resolved> {
        // In no listed group: not let in (the config lists at least one).
        let first = self.matching(groups).next()?;
        let mut models: Option<Vec<String>> = Some(Vec::new());
        for g in self.matching(groups) {
            match (&mut models, &g.models) {
                (Some(all), Some(list)) => {
                    for m in list {
                        if !all.contains(m) {
                            all.push(m.clone());
                        }
                    }
                }
                // One group that allows every model: so does the person.
                (_, None) => models = None,
                (None, Some(_)) => {}
            }
        }
        Some(Resolved {
            team: first.team.clone(),
            models,
            budget: first.budget,
            limits: first.limits,
            policy: first.policy,
        })
    }

    /// Claude Code's managed settings for a person in `groups`: the listed groups' settings merged
    /// key by key (nested tables too), the first group winning.
    pub fn settings(&self, groups: &[String]) -> Map<String, Value> {
        let mut merged = Map::new();
        for g in self.matching(groups) {
            if let Some(s) = &g.settings {
                merge_missing(&mut merged, s);
            }
        }
        merged
    }

    /// The principal a verified gateway token stands for.
    pub fn principal(&self, user: &str, groups: &[String], exp: u64) -> Option<Arc<ApiKey>> {
        let r = self.resolve(groups)?;
        let id = format!("sso:{user}");
        Some(Arc::new(ApiKey {
            scope_id: id.as_str().into(),
            id,
            user: Some(user.to_string()),
            team: r.team,
            models: r.models,
            expires: Some(UNIX_EPOCH + Duration::from_secs(exp)),
            disabled: false,
            budget: r.budget,
            limits: r.limits,
            policy: r.policy,
            source: KeySource::Sso,
            jwt: None,
        }))
    }
}

fn merge_missing(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge_missing(a, b),
            (Some(_), _) => {}
            (None, v) => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(toml: &str) -> Groups {
        #[derive(serde::Deserialize)]
        struct G {
            group: Vec<SsoGroupConfig>,
        }
        Groups::build(&toml::from_str::<G>(toml).unwrap().group).unwrap()
    }

    const TWO: &str = r#"
        [[group]]
        name = "eng"
        team = "eng"
        models = ["claude-sonnet-*"]
        budget = { usd = 50 }
        settings = { permissions = { deny = ["Bash(curl:*)"] }, env = { A = "eng" } }
        [[group]]
        name = "data"
        team = "data"
        models = ["claude-haiku-*"]
        budget = { usd = 5 }
        settings = { permissions = { allow = ["Read"], deny = ["WebFetch"] }, env = { A = "data", B = "data" } }
    "#;

    #[test]
    fn first_group_gives_team_and_budget_models_unite() {
        let g = groups(TWO);
        let both = g.resolve(&["data".into(), "eng".into(), "other".into()]).unwrap();
        assert_eq!(both.team.as_deref(), Some("eng"));
        assert_eq!(both.budget.unwrap().usd, 50.0);
        assert_eq!(both.models.unwrap(), vec!["claude-sonnet-*", "claude-haiku-*"]);
        let data = g.resolve(&["data".into()]).unwrap();
        assert_eq!((data.team.as_deref(), data.budget.unwrap().usd), (Some("data"), 5.0));
        assert!(g.resolve(&["other".into()]).is_none());
        assert!(g.resolve(&[]).is_none());
    }

    #[test]
    fn settings_merge_with_the_first_group_winning() {
        let g = groups(TWO);
        let s = Value::Object(g.settings(&["eng".into(), "data".into()]));
        assert_eq!(
            s,
            serde_json::json!({
                "permissions": { "deny": ["Bash(curl:*)"], "allow": ["Read"] },
                "env": { "A": "eng", "B": "data" }
            })
        );
    }
}
