//! A provider's pool of HTTP/1.1 connections.
//!
//! Providers are spoken to over HTTP/1.1 (no peer offers ALPN for h2), so this holds Pingora's
//! HTTP/1 connector rather than its all-protocol one, whose `get_http_session` future carries
//! the h2 and custom-protocol paths too: about 8 KB that every request moved into a box, though
//! nearly all of them reuse a pooled connection.

use std::future::Future;
use std::pin::Pin;

use pingora::connectors::http::v1;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;

pub struct Connector {
    h1: v1::Connector,
}

impl Connector {
    /// At most `pool_size` idle connections are kept (Pingora's default when `None`).
    pub fn new(pool_size: Option<usize>) -> Self {
        Connector { h1: v1::Connector::new(pool_size.map(pingora::connectors::ConnectorOptions::new)) }
    }

    /// A pooled connection to `peer`, or a new one; the flag says whether it was pooled.
    ///
    /// The connection comes boxed. It is about 470 bytes, and every future that holds it for
    /// the answer (the attempt's, the answer's) would otherwise keep a slot of that size: the
    /// box takes the future a request holds for its whole answer, a long stream's included,
    /// into a smaller allocation class.
    pub async fn session(&self, peer: &HttpPeer) -> pingora::Result<(Box<HttpSession>, bool)> {
        if let Some(h1) = self.h1.reused_http_session(peer).await {
            return Ok((Box::new(HttpSession::H1(h1)), true));
        }
        // Boxed: connecting (the TLS handshake included) is a large future, built only here.
        let (h1, reused) = Box::pin(self.h1.get_http_session(peer)).await?;
        Ok((Box::new(HttpSession::H1(h1)), reused))
    }

    /// Returns a connection whose exchange is over to the pool, if it can be reused.
    ///
    /// Boxed: the release future is about 3 KB (the connection is held by value at each level
    /// of Pingora's release) and would otherwise widen every future that awaits it, and those
    /// are held for the whole answer: a long stream would keep 3 KB it uses only at its end.
    /// Every answer pays one allocation here instead, which costs less than moving 3 KB more
    /// through every level of the request's future.
    pub fn release<'a>(
        &'a self,
        session: Box<HttpSession>,
        peer: &'a HttpPeer,
        idle_timeout: std::time::Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            if let HttpSession::H1(h1) = *session {
                self.h1.release_http_session(h1, peer, Some(idle_timeout)).await;
            }
        })
    }
}
