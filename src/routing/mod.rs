//! Public model names to deployments: exact names and aliases in a hash map, then globs.
//! Everything is resolved when the config loads (provider, price), so a request pays for one
//! hash lookup, or a short glob scan for names that only patterns match.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::metering::{Price, PriceTable, ProviderRef};
use crate::providers::Provider;

pub use crate::glob::glob_match;

/// One place a model can be served: a provider and the model id it knows the model by.
#[derive(Debug)]
pub struct Deployment {
    pub provider: Arc<Provider>,
    /// The provider's model id; `None` passes the requested name through unchanged.
    pub model_id: Option<String>,
    /// The price of `model_id`, resolved at load; `None` when the table has no entry for it
    /// (or the id is only known per request).
    pub price: Option<Arc<Price>>,
}

impl Deployment {
    /// The price of `model_id` (the deployment's own, or the requested name passed through)
    /// on this deployment's provider.
    pub fn price_for(&self, prices: &PriceTable, model_id: &str) -> Option<Arc<Price>> {
        match (&self.price, &self.model_id) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(_)) => None,
            (None, None) => prices.lookup(Some(provider_ref(&self.provider)), model_id),
        }
    }
}

/// How a price row names a provider.
pub fn provider_ref(p: &Provider) -> ProviderRef<'_> {
    ProviderRef { name: &p.name, kind: p.kind.as_str() }
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub deployments: Vec<Deployment>,
    /// Attempts per request over all deployments and endpoints.
    pub max_attempts: usize,
    /// Time allowed for the attempts before the answer starts.
    pub deadline: std::time::Duration,
    /// A model to retry with when the prompt is too long for this one.
    pub context_fallback: Option<String>,
    /// Rate limits over every request to this model.
    pub limits: crate::limits::RateLimits,
    /// The name again, for the limiter's scope without a copy per request.
    pub scope_id: Arc<str>,
    /// Some deployment passes the requested name through (no `model` of its own).
    pub passthrough: bool,
    /// Some deployment's provider keeps a session on one endpoint (so the session key is
    /// worth computing).
    pub affinity: bool,
}

#[derive(Debug, Default)]
pub struct ModelTable {
    exact: HashMap<String, Arc<Route>>,
    patterns: Vec<(String, Arc<Route>)>,
    routes: Vec<Arc<Route>>,
}

impl ModelTable {
    pub fn build(
        models: &[ModelConfig],
        providers: &HashMap<String, Arc<Provider>>,
        prices: &PriceTable,
    ) -> Result<Self, String> {
        let mut table = ModelTable::default();
        for m in models {
            let mut deployments = Vec::with_capacity(m.deployments.len());
            for d in &m.deployments {
                let provider = providers
                    .get(d.provider.get_ref())
                    .ok_or_else(|| format!("unknown provider {:?}", d.provider.get_ref()))?
                    .clone();
                let model_id = d.model.clone();
                let price = model_id.as_deref().and_then(|id| prices.lookup(Some(provider_ref(&provider)), id));
                deployments.push(Deployment { provider, model_id, price });
            }
            let route = Arc::new(Route {
                name: m.name.get_ref().clone(),
                max_attempts: m.max_attempts,
                deadline: m.deadline,
                context_fallback: m.context_fallback.as_ref().map(|f| f.get_ref().clone()),
                limits: m.limits,
                scope_id: m.name.get_ref().as_str().into(),
                passthrough: deployments.iter().any(|d| d.model_id.is_none()),
                affinity: deployments
                    .iter()
                    .any(|d| d.provider.pool.selection == crate::config::Selection::SessionAffinity),
                deployments,
            });
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                table.exact.insert(n.get_ref().clone(), route.clone());
            }
            for p in &m.patterns {
                table.patterns.push((p.get_ref().clone(), route.clone()));
            }
            table.routes.push(route);
        }
        Ok(table)
    }

    /// The route for a requested model name: exact names and aliases first, then patterns in
    /// config order.
    pub fn resolve(&self, requested: &str) -> Option<&Arc<Route>> {
        self.exact
            .get(requested)
            .or_else(|| self.patterns.iter().find(|(p, _)| glob_match(p, requested)).map(|(_, r)| r))
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Every exact name and alias, with its route.
    pub fn names(&self) -> impl Iterator<Item = (&str, &Arc<Route>)> {
        self.exact.iter().map(|(n, r)| (n.as_str(), r))
    }

    /// Whether some pattern routes names (then the names a client may send are open-ended).
    pub fn has_patterns(&self) -> bool {
        !self.patterns.is_empty()
    }
}
