//! One exchange with a provider: send the request through Pingora's pooled connector, then
//! stream the answer to the client chunk by chunk while metering it.

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use pingora_proxy::Session;

use super::headers::{copy_request_headers, response_for_client};
use super::meter::ResponseMeter;
use super::{ApiError, Gateway, RequestCtx};
use crate::metering::Outcome;
use crate::providers::Provider;

/// A pooled connection the provider closed while idle fails on first use; retry those on
/// another connection, at most this many times.
const STALE_RETRIES: usize = 2;

impl Gateway {
    pub(super) async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        provider: &Provider,
        body: Bytes,
        metered: bool,
    ) -> Result<(), ApiError> {
        let (cred_name, cred_value) = provider.credential().map_err(|e| {
            ApiError::unavailable(format!("provider {} has no credential: {e}", provider.name))
        })?;
        let peer = provider
            .peer()
            .map_err(|e| ApiError::unavailable(format!("provider {}: {e}", provider.name)))?;

        let client = session.req_header();
        let path = client
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let target = format!("{}{}", provider.url.path_prefix, path);
        let mut req =
            RequestHeader::build("POST", target.as_bytes(), Some(client.headers.len() + 3))
                .map_err(|e| {
                    ApiError::invalid_request(format!("cannot build the upstream request: {e}"))
                })?;
        copy_request_headers(client, &mut req);
        let _ = req.insert_header(http::header::HOST, provider.host_header.clone());
        let _ = req.insert_header(cred_name.clone(), cred_value.clone());
        let _ = req.insert_header(http::header::CONTENT_LENGTH, body.len());

        let mut up = self.send(provider, &peer, req, body).await?;
        let upstream_header = up
            .response_header()
            .expect("read_response_header succeeded");
        let status = upstream_header.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.status = status;
        let mut meter = ResponseMeter::for_response(upstream_header, metered);
        let out = response_for_client(upstream_header, &ctx.id);

        if session
            .write_response_header(Box::new(out), false)
            .await
            .is_err()
        {
            return self.client_gone(ctx, meter);
        }
        up.set_read_timeout(Some(provider.idle_timeout));
        loop {
            match up.read_response_body().await {
                Ok(Some(chunk)) => {
                    meter.feed(&chunk);
                    if ctx.ttfb.is_none() {
                        ctx.ttfb = Some(ctx.start.elapsed());
                    }
                    if session
                        .write_response_body(Some(chunk), false)
                        .await
                        .is_err()
                    {
                        // Dropping `up` closes the upstream connection, which stops the generation.
                        return self.client_gone(ctx, meter);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let kind = if e.etype() == &ErrorType::ReadTimedout {
                        "idle_timeout"
                    } else {
                        "read_error"
                    };
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[&provider.name, kind])
                        .inc();
                    let m = meter.finish();
                    ctx.usage = m.usage;
                    ctx.outcome = Outcome::Incomplete;
                    ctx.error = Some(format!(
                        "provider {} broke off the answer: {e}",
                        provider.name
                    ));
                    // Close without the final chunk: the client must see the answer as cut short.
                    session.shutdown().await;
                    return Ok(());
                }
            }
        }
        let finished = session.write_response_body(None, true).await;
        let m = meter.finish();
        ctx.usage = m.usage;
        ctx.outcome = if !(200..300).contains(&status) {
            ctx.error = m
                .error_type
                .or_else(|| Some(format!("provider answered {status}")));
            Outcome::UpstreamError
        } else if let Some(err) = m.error_type {
            ctx.error = Some(err);
            Outcome::Incomplete
        } else if !m.complete {
            ctx.error = Some("the stream ended before message_stop".into());
            Outcome::Incomplete
        } else if finished.is_err() {
            ctx.error = Some("client disconnected".into());
            Outcome::Incomplete
        } else {
            Outcome::Complete
        };
        self.connector
            .release_http_session(up, &*peer, Some(provider.pool_idle_timeout))
            .await;
        Ok(())
    }

    fn client_gone(&self, ctx: &mut RequestCtx, meter: ResponseMeter) -> Result<(), ApiError> {
        let m = meter.finish();
        ctx.usage = m.usage;
        ctx.outcome = Outcome::Incomplete;
        ctx.error = Some("client disconnected".into());
        Ok(())
    }

    /// Sends the request and reads the response header.
    async fn send(
        &self,
        provider: &Provider,
        peer: &HttpPeer,
        req: RequestHeader,
        body: Bytes,
    ) -> Result<HttpSession, ApiError> {
        let mut attempt = 0;
        loop {
            let (mut up, reused) = self.connector.get_http_session(peer).await.map_err(|e| {
                let kind = if e.etype() == &ErrorType::ConnectTimedout {
                    "connect_timeout"
                } else {
                    "connect_error"
                };
                self.metrics
                    .upstream_errors
                    .with_label_values(&[&provider.name, kind])
                    .inc();
                if kind == "connect_timeout" {
                    ApiError::gateway_timeout(format!(
                        "provider {}: connect timed out",
                        provider.name
                    ))
                } else {
                    ApiError::bad_gateway(format!(
                        "provider {}: cannot connect: {}",
                        provider.name,
                        e.etype().as_str()
                    ))
                }
            })?;
            up.set_read_timeout(Some(provider.first_byte_timeout));
            let sent = async {
                up.write_request_header(Box::new(req.clone())).await?;
                up.write_request_body(body.clone(), true).await?;
                up.finish_request_body().await?;
                up.read_response_header().await
            }
            .await;
            match sent {
                Ok(()) => return Ok(up),
                Err(e)
                    if reused
                        && attempt < STALE_RETRIES
                        && e.etype() != &ErrorType::ReadTimedout =>
                {
                    attempt += 1;
                    tracing::debug!(provider = %provider.name, error = %e, "pooled connection failed, retrying on another");
                }
                Err(e) => {
                    let timeout = e.etype() == &ErrorType::ReadTimedout;
                    let kind = if timeout {
                        "first_byte_timeout"
                    } else {
                        "exchange_error"
                    };
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[&provider.name, kind])
                        .inc();
                    return Err(if timeout {
                        ApiError::gateway_timeout(format!(
                            "provider {} sent no answer in time",
                            provider.name
                        ))
                    } else {
                        ApiError::bad_gateway(format!(
                            "provider {}: {}",
                            provider.name,
                            e.etype().as_str()
                        ))
                    });
                }
            }
        }
    }
}
