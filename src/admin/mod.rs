//! The admin listener: Prometheus metrics and health probes. Keep it off public networks.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
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

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                let body = self.metrics.render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .expect("valid response")
            }
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
