//! Admission: what a request may cost at most, and its reservation on every budget and limit
//! that applies to it (its key, the key's user and team, the model), all or none.

use std::sync::Arc;

use super::{shorten, ApiError, Gateway, RequestCtx, State};
use crate::auth::ApiKey;
use crate::config::{ByReference, Interrupted, Unpriced};
use crate::limits::{Demand, Hold, Policy, Reservation, Scope, ScopeKind};
use crate::metering::{Asked, DEFAULT_CONTEXT_WINDOW, DEFAULT_MAX_OUTPUT};
use crate::protocol::json_peek::RequestPeek;
use crate::protocol::references::{self, Reach};
use crate::routing::Route;

/// Prompt tokens reserved beyond the body's size: what the provider adds around a prompt
/// (the tool-use system prompt is a few hundred tokens).
const PROMPT_OVERHEAD_TOKENS: u64 = 1024;

/// A request as admission sees it.
pub(super) struct Admission<'a> {
    /// The scopes of the caller (its key, its user and team), from [`caller_scopes`].
    pub scopes: Vec<Scope>,
    pub route: &'a Route,
    pub requested: &'a str,
    /// `None` for a request that generates nothing (a token count).
    pub generation: Option<Generation<'a>>,
    /// The key's concurrency slot, taken before the body was read.
    pub held: Option<Hold>,
}

/// What admission needs to know about a request that generates (and costs).
pub(super) struct Generation<'a> {
    pub body_len: usize,
    pub peek: &'a RequestPeek,
    pub reach: &'a Reach,
}

/// The scopes a caller counts against, whatever the model: its key, its user and its team,
/// each when it has a budget or limits. The key's comes first.
pub(super) fn caller_scopes(state: &State, key: &ApiKey) -> Vec<Scope> {
    let mut scopes = Vec::with_capacity(4);
    if !key.policy.is_empty() {
        scopes.push(Scope { kind: ScopeKind::Key, id: key.scope_id.clone(), policy: key.policy });
    }
    for (kind, owner, table) in
        [(ScopeKind::User, &key.user, &state.owners.users), (ScopeKind::Team, &key.team, &state.owners.teams)]
    {
        if let Some((id, policy)) = owner.as_ref().and_then(|o| table.get(o)) {
            if !policy.is_empty() {
                scopes.push(Scope { kind, id: id.clone(), policy: *policy });
            }
        }
    }
    scopes
}

impl Gateway {
    /// Reserves the request's worst case on every budget and limit that applies to it: its
    /// key, the key's user and team, and the model. `generation` describes a request that
    /// generates (and costs); `None` for one that does not. Returns `None` when nothing applies.
    pub(super) fn admission(&self, state: &State, ctx: &mut RequestCtx, a: Admission) -> Result<Option<Ask>, ApiError> {
        let Admission { mut scopes, route, requested, generation, held } = a;
        if !route.limits.is_empty() {
            let policy = Policy { budget: None, limits: route.limits };
            scopes.push(Scope { kind: ScopeKind::Model, id: route.scope_id.clone(), policy });
        }
        // Models carry limits, not budgets: the caller's scopes decide.
        let budgeted = scopes.iter().any(|s| s.policy.budget.is_some());
        let demand = match generation {
            None => Demand::default(),
            Some(g) => {
                let options = reachable(state, route, requested);
                let bounds = Bounds::of(&options);
                let output_tokens = match g.peek.max_tokens {
                    Some(n) if n > bounds.max_output => {
                        return Err(ApiError::invalid_request(format!(
                            "max_tokens: {n} is above the {} tokens model {} can generate",
                            bounds.max_output, route.name
                        )))
                    }
                    Some(n) => n,
                    None => bounds.max_output,
                };
                // An image costs by its pixels, not its bytes.
                let images = g.reach.images.saturating_mul(references::IMAGE_MAX_TOKENS);
                let mut prompt = (g.body_len as u64).saturating_add(PROMPT_OVERHEAD_TOKENS).saturating_add(images);
                if let (true, Some(field)) = (budgeted, g.reach.by_reference) {
                    if state.by_reference == ByReference::Refuse {
                        self.metrics.refused.with_label_values(&["by_reference"]).inc();
                        return Err(ApiError::permission(format!(
                            "{field}: this request brings content from outside its body, whose cost cannot be bounded \
                             before it runs, and a budget applies; the operator's policy refuses such requests"
                        )));
                    }
                    // Fetched content lands in the prompt: it can fill the model's window.
                    prompt = bounds.context_window;
                }
                if g.reach.pdf {
                    prompt = bounds.context_window;
                }
                // No provider bills a prompt larger than the window: it refuses it.
                prompt = prompt.min(bounds.context_window);
                let asked = Asked {
                    fast: g.peek.fast,
                    geo: g.peek.inference_geo.as_deref(),
                    regional: false,
                    web_searches: g.reach.web_searches,
                    web_fetches: g.reach.web_fetches,
                };
                let (worst, unpriced) = worst_case(&options, prompt, output_tokens, asked);
                if let (true, Some(model), Unpriced::Refuse) = (budgeted, unpriced, state.unpriced) {
                    return Err(ApiError::permission(format!(
                        "model {} has no price, so its cost cannot be counted against a budget; the operator can add \
                         a [[price]] for it or set controls.unpriced = \"allow\"",
                        shorten(&model)
                    )));
                }
                ctx.worst_nanos = worst;
                ctx.output_cap = output_tokens;
                ctx.interrupted_at_worst = budgeted && state.interrupted == Interrupted::Reservation;
                // Token limits reserve a typical prompt (about four bytes a token) and settle
                // to the real count; only budgets need the strict bound.
                Demand {
                    worst_nanos: if budgeted { worst } else { 0 },
                    input_tokens: g.body_len as u64 / 4,
                    output_tokens,
                }
            }
        };
        if scopes.is_empty() {
            return Ok(None);
        }
        Ok(Some(Ask { scopes, demand, held }))
    }

    /// Asks the limiter for what [`Gateway::admission`] worked out: one round trip to a shared
    /// limiter, none to the local one.
    pub(super) async fn reserve(&self, ask: Option<Ask>) -> Result<Option<Reservation>, ApiError> {
        let Some(Ask { scopes, demand, held }) = ask else { return Ok(None) };
        match self.runtime.limiter.admit_held(scopes, demand, held).await {
            Ok(r) => Ok(Some(r)),
            Err(refusal) => {
                self.metrics.refused.with_label_values(&[refusal.reason]).inc();
                if refusal.reason == "limits_reseed" {
                    // Redis came back empty: seed it again from the ledger, off the workers.
                    let runtime = self.runtime.clone();
                    tokio::task::spawn_blocking(move || runtime.reseed_limits());
                }
                Err(ApiError::refused(refusal))
            }
        }
    }
}

/// What a request asks of the limiter: every scope that counts it, its worst case, and the
/// concurrency slot it took before its body was read.
pub(super) struct Ask {
    scopes: Vec<Scope>,
    demand: Demand,
    held: Option<Hold>,
}

/// One deployment a request may reach, priced once for admission: its model id, its price
/// (`None`: unpriced) and whether it is a regional endpoint.
struct Reachable<'a> {
    model: &'a str,
    price: Option<Arc<crate::metering::Price>>,
    regional: bool,
}

/// Every deployment a request for `route` may reach (its own, and those of the model it falls
/// back to when the prompt is too long), each priced once.
fn reachable<'a>(state: &'a State, route: &'a Route, requested: &'a str) -> Vec<Reachable<'a>> {
    let fallback = route.context_fallback.as_deref().and_then(|f| state.models.resolve(f));
    route
        .deployments
        .iter()
        .chain(fallback.into_iter().flat_map(|r| r.deployments.iter()))
        .map(|d| {
            let model = d.model_id.as_deref().unwrap_or(requested);
            Reachable { model, price: d.price_for(&state.prices, model), regional: d.provider.regional(model) }
        })
        .collect()
}

/// The largest output and prompt any deployment of the request accepts.
struct Bounds {
    max_output: u64,
    context_window: u64,
}

impl Bounds {
    fn of(options: &[Reachable]) -> Bounds {
        let mut b = Bounds { max_output: 0, context_window: 0 };
        for o in options {
            let (out, window) = o
                .price
                .as_ref()
                .map_or((DEFAULT_MAX_OUTPUT, DEFAULT_CONTEXT_WINDOW), |p| (p.max_output, p.context_window));
            b.max_output = b.max_output.max(out);
            b.context_window = b.context_window.max(window);
        }
        b
    }
}

/// The most the request can cost on any deployment it may be sent to, and the first model on
/// the way that has no price (it adds nothing to the bound).
fn worst_case(options: &[Reachable], prompt: u64, output: u64, asked: Asked) -> (u64, Option<String>) {
    let mut worst = 0;
    let mut unpriced = None;
    for o in options {
        match &o.price {
            Some(p) => {
                let asked = Asked { regional: o.regional, ..asked };
                worst = worst.max(p.worst_case_nanos(prompt, output, &asked));
            }
            None => {
                unpriced.get_or_insert_with(|| o.model.to_string());
            }
        }
    }
    (worst, unpriced)
}
