//! The admin listener: Prometheus metrics and health probes. Keep it off public networks.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::providers::now_ms;
use crate::proxy::SharedState;

pub struct AdminApp {
    pub state: SharedState,
    pub metrics: Arc<Metrics>,
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(&value).expect("JSON values serialize");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("valid response")
}

impl AdminApp {
    /// Pools and the health of each endpoint, as JSON.
    fn status(&self) -> serde_json::Value {
        let state = self.state.load();
        let now = now_ms();
        let providers: Vec<_> = state
            .providers
            .iter()
            .map(|p| {
                let endpoints: Vec<_> = p
                    .endpoints
                    .iter()
                    .map(|e| {
                        let cooling = e.passive.cooling_down_for(now);
                        let probe_up = p.pool.probed_healthy(e);
                        serde_json::json!({
                            "endpoint": e.label.clone(),
                            "address": e.address().map(|a| a.to_string()),
                            "dns_error": e.dns_error(),
                            "probe_up": probe_up,
                            "in_rotation": probe_up && cooling.is_none() && e.address().is_some(),
                            "cooldown_remaining_ms": cooling.map(|d| d.as_millis() as u64),
                            "consecutive_failures": e.passive.consecutive_failures(),
                            "cooldowns": e.passive.cooldowns(),
                            "in_flight": e.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                            "weight": e.weight,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "provider": p.name,
                    "selection": p.pool.selection,
                    "credentials": p.credential_count(),
                    "ready": p.unready_reason().is_none(),
                    "problem": p.unready_reason(),
                    "endpoints": endpoints,
                })
            })
            .collect();
        serde_json::json!({ "providers": providers })
    }

    fn update_endpoint_gauges(&self) {
        let state = self.state.load();
        let now = now_ms();
        for p in &state.providers {
            for e in &p.endpoints {
                let up = p.pool.probed_healthy(e) && e.passive.available(now) && e.address().is_some();
                self.metrics.endpoint_up.with_label_values(&[&p.name, &e.label]).set(up as i64);
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                self.update_endpoint_gauges();
                let body = self.metrics.render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .expect("valid response")
            }
            "/status" => json(StatusCode::OK, self.status()),
            "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            "/readyz" => {
                let state = self.state.load();
                let problems: Vec<String> = state.providers.iter().filter_map(|p| p.unready_reason()).collect();
                if problems.is_empty() {
                    json(StatusCode::OK, serde_json::json!({"status": "ready"}))
                } else {
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({"status": "not ready", "problems": problems}),
                    )
                }
            }
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"type": "error", "error": {"type": "not_found_error", "message": format!("no admin endpoint at {path}")}}),
            ),
        }
    }
}
