//! Guards at the connection level, in front of Pingora's HTTP handling: a cap on open
//! connections per listener, and bounds on how each request head is sent ([`head`]).
//!
//! Pingora's HTTP app is wrapped rather than changed: [`Guarded`] is itself a `ServerApp` that
//! takes a listener slot, wraps the transport, and hands the connection on.

mod head;
pub mod scanner;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use prometheus::{IntCounterVec, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use head::HeadGuard;
pub use head::HeadLimits;

/// One listener's cap on open connections.
pub struct ListenerSlots {
    /// The listener's address, as configured (`0.0.0.0:8080` matches any local IP on 8080).
    pub address: std::net::SocketAddr,
    pub slots: Arc<Semaphore>,
    pub max: usize,
    pub open: IntGauge,
}

pub struct Guarded<A> {
    app: Arc<A>,
    listeners: Vec<ListenerSlots>,
    head: Arc<HeadLimits>,
    violations: IntCounterVec,
}

impl<A> Guarded<A> {
    /// `violations` counts every refusal, by reason.
    pub fn new(app: A, listeners: Vec<ListenerSlots>, head: HeadLimits, violations: IntCounterVec) -> Self {
        Guarded { app: Arc::new(app), listeners, head: Arc::new(head), violations }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let local = stream.get_socket_digest().and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let listener = local.and_then(|local| {
            self.listeners.iter().find(|l| {
                l.address.port() == local.port() && (l.address.ip() == local.ip() || l.address.ip().is_unspecified())
            })
        });
        // Held for the connection's whole life, released on every way out.
        let _slot = match listener {
            Some(l) => match l.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    l.open.inc();
                    Some(OpenSlot { _permit: permit, open: l.open.clone() })
                }
                Err(_) => {
                    self.violations.with_label_values(&["connection_limit"]).inc();
                    let message =
                        format!("this listener already holds its maximum of {} open connections; retry shortly", l.max);
                    turn_away(stream, refusal(503, message)).await;
                    return None;
                }
            },
            None => None,
        };
        let guarded: Stream = Box::new(HeadGuard::new(stream, self.head.clone(), self.violations.clone()));
        self.app.process_new(guarded, shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

struct OpenSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Answers a connection that will not be served and closes it. What the client already sent is
/// read first (briefly): closing a socket with unread bytes resets it, and a reset can destroy
/// the answer before the client reads it.
async fn turn_away(mut stream: Stream, answer: Vec<u8>) {
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut scratch)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&answer).await;
        let _ = stream.flush().await;
    })
    .await;
    let _ = stream.shutdown().await;
}

/// A complete HTTP/1.1 error answer in the Anthropic shape, for refusals made below Pingora's
/// HTTP layer (where there is no session to answer through). The connection closes after it.
fn refusal(status: u16, message: String) -> Vec<u8> {
    let (reason, kind) = match status {
        408 => ("Request Timeout", "invalid_request_error"),
        405 => ("Method Not Allowed", "invalid_request_error"),
        414 => ("URI Too Long", "invalid_request_error"),
        431 => ("Request Header Fields Too Large", "invalid_request_error"),
        503 => ("Service Unavailable", "overloaded_error"),
        _ => ("Bad Request", "invalid_request_error"),
    };
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_whole_http_answers_in_the_anthropic_shape() {
        let answer = String::from_utf8(refusal(431, "too many".into())).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","error":{"type":"invalid_request_error","message":"too many"}})
        );
    }
}
