//! Model discovery: `GET /v1/models` and `GET /v1/models/{id}` in the Models API's shape, listing
//! the models the caller's key may use. Claude Code asks for it at start on a gateway
//! (`CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY`) and offers what it finds in `/model`.

use std::collections::BTreeSet;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{json, Value};

use super::{ApiError, State};
use crate::auth::ApiKey;

/// `Some(None)` for the list, `Some(Some(id))` for one model, `None` for another path. The
/// `/anthropic` pass-through prefix is served too.
pub(super) fn listing_path(path: &str) -> Option<Option<&str>> {
    let path = path.strip_prefix("/anthropic").filter(|p| p.starts_with('/')).unwrap_or(path);
    match path.strip_prefix("/v1/models") {
        Some("") | Some("/") => Some(None),
        Some(rest) => rest.strip_prefix('/').filter(|id| !id.is_empty() && !id.contains('/')).map(Some),
        None => None,
    }
}

/// The ids a key may send: every exact name and alias of a route it may use (for a route that
/// passes the name through, only names the price table knows as models), and, for routes that
/// take names by pattern, every model id the price table knows that such a route serves.
fn ids(state: &State, key: &ApiKey) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (name, route) in state.models.names() {
        let passthrough = route.passthrough.then_some(name);
        // A route that passes the name through is a real model only if the name is one.
        let real = passthrough.is_none() || state.prices.lookup(None, name).is_some();
        if real && key.allows(&route.name, passthrough) {
            out.insert(name.to_string());
        }
    }
    if state.models.has_patterns() {
        for id in state.prices.known_ids() {
            let Some(route) = state.models.resolve(id) else { continue };
            let passthrough = route.passthrough.then_some(id);
            if key.allows(&route.name, passthrough) {
                out.insert(id.to_string());
            }
        }
    }
    out
}

fn model(id: &str, created: &str) -> Value {
    json!({"type": "model", "id": id, "display_name": id, "created_at": created})
}

/// The answer to a listing: the status and the JSON body.
pub(super) fn answer(
    state: &State,
    key: &ApiKey,
    one: Option<&str>,
    started: SystemTime,
) -> Result<(u16, Bytes), ApiError> {
    let created = humantime::format_rfc3339_seconds(started).to_string();
    let ids = ids(state, key);
    let body = match one {
        Some(id) if ids.contains(id) => model(id, &created),
        Some(id) => {
            return Err(ApiError::not_found(format!("model: {}", super::shorten(id))));
        }
        None => json!({
            "data": ids.iter().map(|id| model(id, &created)).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": ids.first(),
            "last_id": ids.last(),
        }),
    };
    Ok((200, Bytes::from(serde_json::to_vec(&body).expect("JSON values serialize"))))
}

#[cfg(test)]
mod tests {
    use super::listing_path;

    #[test]
    fn paths() {
        assert_eq!(listing_path("/v1/models"), Some(None));
        assert_eq!(listing_path("/anthropic/v1/models"), Some(None));
        assert_eq!(listing_path("/v1/models/claude-sonnet-4-6"), Some(Some("claude-sonnet-4-6")));
        assert_eq!(listing_path("/v1/modelsx"), None);
        assert_eq!(listing_path("/v1/models/a/b"), None);
        assert_eq!(listing_path("/v1/messages"), None);
    }
}
