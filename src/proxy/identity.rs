//! Who is calling: the key a request presents (or its listener's anonymous key), or a JWT from
//! a trusted issuer.

use std::sync::Arc;
use std::time::SystemTime;

use pingora_proxy::Session;

use super::{ApiError, Gateway, RequestCtx, State};
use crate::auth::{looks_like_jwt, presented_key, ApiKey, AuthError};

impl Gateway {
    /// The caller's key: from `server.key_header`, `x-api-key` or `Authorization: Bearer`, a
    /// JWT from a trusted issuer, or the listener's `anonymous_key` when none was sent.
    pub(super) fn authenticate(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &State,
    ) -> Result<Arc<ApiKey>, ApiError> {
        let req = session.req_header();
        let custom = self.key_header.as_ref().and_then(|h| req.headers.get(h)).map(|v| v.as_bytes());
        let presented = custom.or(presented_key(
            req.headers.get("x-api-key").map(|v| v.as_bytes()),
            req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes()),
        ));
        // A listener may stand in for clients that can send no key at all.
        let anonymous = match presented {
            None => session.server_addr().and_then(|a| a.as_inet()).and_then(|a| self.anonymous_key(*a)),
            Some(_) => None,
        };
        let keys = self.runtime.keys.load();
        let authenticated = match anonymous {
            Some(id) => {
                ctx.anonymous = true;
                keys.authenticate_id(id, SystemTime::now())
            }
            None => keys.authenticate(presented, SystemTime::now()),
        };
        let token = match (authenticated, presented) {
            (Ok(key), _) => return Ok(key),
            (Err(AuthError::Unknown), Some(t)) if looks_like_jwt(t) => t,
            (Err(e), _) => return Err(ApiError::authentication(e.to_string())),
        };
        // Not one of our keys: a gateway token of a person signed in through the identity
        // provider, or a JWT from a trusted issuer.
        let verified = match state.sso.as_ref().and_then(|sso| sso.authenticate(token)) {
            Some(verified) => verified,
            None if !state.jwt.is_empty() => state.jwt.verify(token),
            None => return Err(ApiError::authentication(AuthError::Unknown.to_string())),
        };
        verified.map_err(|e| {
            self.metrics.jwt_failures.with_label_values(&[e.reason]).inc();
            ApiError::authentication(e.message)
        })
    }

    /// The `anonymous_key` of the listener that accepted a connection on `local`: the listener
    /// configured for that address, else the wildcard one (`0.0.0.0`, `[::]`) on its port, of
    /// the connection's own address family first (a `[::]` listener may take IPv4 connections
    /// too, a `0.0.0.0` one never IPv6 ones).
    fn anonymous_key(&self, local: std::net::SocketAddr) -> Option<&String> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let wildcards: &[IpAddr] = match local {
            SocketAddr::V4(_) => &[IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
            SocketAddr::V6(_) => &[IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
        };
        let listener = std::iter::once(local)
            .chain(wildcards.iter().map(|ip| SocketAddr::new(*ip, local.port())))
            .find_map(|addr| self.anonymous.get(&addr))?;
        listener.as_ref()
    }
}
