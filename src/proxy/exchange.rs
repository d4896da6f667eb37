//! One exchange with one endpoint: send the request through Pingora's pooled connector, then
//! stream the answer to the client chunk by chunk while metering it. Which endpoint, and what
//! happens when an attempt fails, is `fallback`'s business.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use pingora_proxy::Session;

use super::dialect::{Answer, Transcode};
use super::errors::{for_client, same_format};
use super::fallback::InFlight;
use super::headers::response_for_client;
use super::meter::ResponseMeter;
use super::payload::Payload;
use super::{ApiError, Gateway, RequestCtx};
use crate::config::ProviderKind;
use crate::metering::Outcome;
use crate::protocol::bedrock::SseToStream;
use crate::protocol::inbound::Format;
use crate::providers::{Endpoint, Provider};

/// A pooled connection the provider closed while idle fails on first use; retry those on
/// another connection, at most this many times.
const STALE_RETRIES: usize = 2;

impl Gateway {
    /// Streams the chosen attempt's answer to the client, metering it on the way.
    ///
    /// This future is held for the whole answer, a long stream's included, so the paths few
    /// answers take (an error to reshape, a token count, a client gone) are boxed: their
    /// futures would otherwise set its size.
    pub(super) async fn stream_answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut up: Box<HttpSession>,
        provider: &Provider,
        // Held until the answer ends: the endpoint counts this request as in flight.
        in_flight: InFlight,
        answer: Answer,
    ) -> Result<(), ApiError> {
        let Answer { metered, transcode } = answer;
        let endpoint = in_flight.endpoint();
        let peer = endpoint.peer().map_err(ApiError::unavailable)?;
        let upstream_header = up.response_header().expect("read_response_header succeeded");
        let status = upstream_header.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.status = status;
        // An error from a provider that speaks another format than the client's is reshaped;
        // from one that speaks the client's own, it streams through as it came.
        if !upstream_header.status.is_success() && !same_format(ctx.format, provider.kind) {
            return Box::pin(self.answer_provider_error(session, ctx, up, provider, &peer)).await;
        }
        if matches!(transcode, Transcode::BedrockCountTokens | Transcode::CountTokensForBedrock) {
            return Box::pin(self.answer_count(session, ctx, up, provider, &peer, transcode)).await;
        }
        // The meter reads SSE. A Bedrock event stream is decoded for it; the client gets SSE,
        // or the frames as they came when it speaks Bedrock itself. An SSE stream goes to a
        // Bedrock client as frames.
        let frames_up = transcode == Transcode::BedrockStream && is_event_stream(upstream_header);
        let frames_down = ctx.format == Format::Bedrock && ctx.stream;
        let mut decode = frames_up.then(crate::protocol::bedrock::StreamToSse::new);
        let mut encode = (frames_down && !frames_up && is_sse(upstream_header)).then(SseToStream::new);
        let mut client_header = upstream_header.clone();
        // The meter reads SSE: the provider's own, or what Bedrock's frames are decoded into.
        let mut meter = ResponseMeter::for_response(
            frames_up || is_sse(upstream_header),
            upstream_header.status.is_success(),
            metered,
        );
        if frames_up || encode.is_some() {
            let _ = client_header.remove_header(&http::header::CONTENT_LENGTH);
            let client_type = if frames_down { EVENT_STREAM } else { "text/event-stream; charset=utf-8" };
            let _ = client_header.insert_header(http::header::CONTENT_TYPE, client_type);
        }
        let chunked_ok = session.req_header().version >= http::Version::HTTP_11;
        let out = response_for_client(&client_header, &ctx.id, chunked_ok, &self.response_headers);

        session.set_write_timeout(Some(self.client_write_timeout));
        if session.write_response_header(Box::new(out), false).await.is_err() {
            return Box::pin(self.client_gone(ctx, meter, up, provider, &peer)).await;
        }
        up.set_read_timeout(Some(provider.idle_timeout));
        // (what the meter reads, what the client gets) for one upstream chunk.
        let mut transform = |read: pingora::Result<Option<bytes::Bytes>>| match read {
            Ok(Some(chunk)) => match (&mut decode, &mut encode) {
                (Some(d), _) => d.feed(&chunk).map_err(|e| (false, e.to_string())).map(|sse| {
                    let to_client = if frames_down { chunk } else { sse.clone() };
                    Some((sse, to_client))
                }),
                (None, Some(e)) => Ok(Some((chunk.clone(), e.feed(&chunk)))),
                (None, None) => Ok(Some((chunk.clone(), chunk))),
            },
            Ok(None) => Ok(None),
            Err(e) => {
                let silent = e.etype() == &ErrorType::ReadTimedout;
                let kind = if silent { "idle_timeout" } else { "read_error" };
                self.metrics.upstream_errors.with_label_values(&[&provider.name, kind]).inc();
                Err((silent, e.to_string()))
            }
        };
        let mut batch = Batch::default();
        loop {
            // What the provider sent, and whatever more it has sent already: one write to the
            // client for all of it, where writing each chunk as it is read would cost a
            // syscall per event of a stream that arrives in a burst.
            let mut read = Some(up.read_response_body().await);
            let mut end = None;
            while let Some(r) = read.take() {
                match transform(r) {
                    Ok(Some((seen, chunk))) => {
                        meter.feed(&seen);
                        batch.push(chunk);
                    }
                    Ok(None) => end = Some(Ok(())),
                    Err(e) => end = Some(Err(e)),
                }
                if end.is_none() && batch.len() < BATCH_BYTES {
                    read = ready_now(up.read_response_body());
                }
            }
            if let Some(chunk) = batch.take() {
                if ctx.ttfb.is_none() {
                    ctx.ttfb = Some(ctx.start.elapsed());
                }
                if session.write_response_body(Some(chunk), false).await.is_err() {
                    return Box::pin(self.client_gone(ctx, meter, up, provider, &peer)).await;
                }
            }
            match end {
                None => {}
                Some(Ok(())) => break,
                Some(Err((silent, e))) => {
                    ctx.take_metered(&meter.finish());
                    ctx.outcome = Outcome::Incomplete;
                    ctx.error = Some(format!("provider {} broke off the answer: {e}", provider.name));
                    // A provider gone silent: the client is told so in its stream's own terms
                    // (an SSE `error` event, or an exception frame), rather than left to wait.
                    if silent && ctx.stream {
                        let message = format!(
                            "provider {} sent nothing for {:.0}s; the answer is incomplete",
                            provider.name,
                            provider.idle_timeout.as_secs_f64()
                        );
                        let event = stream_error_event(&message);
                        let chunk = if frames_down { SseToStream::new().feed(&event) } else { event };
                        let _ = session.write_response_body(Some(chunk), false).await;
                    }
                    // Close without the final chunk: the client must see the answer as cut short.
                    session.shutdown().await;
                    return Ok(());
                }
            }
        }
        let finished = session.write_response_body(None, true).await;
        let m = meter.finish();
        ctx.take_metered(&m);
        ctx.outcome = if !(200..300).contains(&status) {
            ctx.error = m.error_type.or_else(|| Some(format!("provider answered {status}")));
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
        provider.connector.release(up, &peer, provider.pool_idle_timeout).await;
        Ok(())
    }

    /// A provider's error in another format than the client's (a 400, say): read whole and
    /// given the client's shape.
    async fn answer_provider_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut up: Box<HttpSession>,
        provider: &Provider,
        peer: &HttpPeer,
    ) -> Result<(), ApiError> {
        let status = ctx.status;
        let retry = up.response_header().map(super::fallback::retry_advice).unwrap_or_default();
        let body = read_small(&mut up, provider).await?;
        provider.connector.release(up, peer, provider.pool_idle_timeout).await;
        let body = match provider.kind {
            ProviderKind::Anthropic => bytes::Bytes::from(body),
            kind => super::fallback::provider_error(kind, status, &body),
        };
        ctx.outcome = Outcome::UpstreamError;
        ctx.error = crate::protocol::usage::usage_from_json(&body)
            .and_then(|(_, kind)| kind)
            .or_else(|| Some(format!("provider answered {status}")));
        let shaped = for_client(ctx.format, status, body);
        ctx.status = shaped.status;
        let header = shaped.header(&ctx.id, &retry, false);
        if session.write_response_header(Box::new(header), false).await.is_ok() {
            let _ = session.write_response_body(Some(shaped.body), true).await;
        }
        Ok(())
    }

    /// A token count in the other shape (Bedrock's `inputTokens`, the Messages API's
    /// `input_tokens`): read whole (it is tiny) and answered in the client's.
    async fn answer_count(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut up: Box<HttpSession>,
        provider: &Provider,
        peer: &HttpPeer,
        transcode: Transcode,
    ) -> Result<(), ApiError> {
        let body = read_small(&mut up, provider).await?;
        provider.connector.release(up, peer, provider.pool_idle_timeout).await;
        let answer = match transcode {
            Transcode::CountTokensForBedrock => crate::protocol::bedrock::count_tokens_for_bedrock_client(&body),
            _ => crate::protocol::bedrock::count_tokens_answer(&body),
        };
        let answer = answer.ok_or_else(|| {
            ApiError::bad_gateway(format!("provider {} sent a token count this gateway cannot read", provider.name))
        })?;
        ctx.outcome = Outcome::Complete;
        write_json(session, &ctx.id, 200, answer).await;
        Ok(())
    }

    /// The client went away mid-answer. A stream is cut upstream too (closing the connection
    /// stops the generation, and the spending); a non-streamed answer is already generated and
    /// paid for, so it is read to the end to meter it, and the connection goes back to the pool.
    async fn client_gone(
        &self,
        ctx: &mut RequestCtx,
        mut meter: ResponseMeter,
        mut up: Box<HttpSession>,
        provider: &Provider,
        peer: &HttpPeer,
    ) -> Result<(), ApiError> {
        ctx.outcome = Outcome::Incomplete;
        ctx.error = Some("client disconnected".into());
        if matches!(meter, ResponseMeter::Json { .. }) {
            up.set_read_timeout(Some(provider.idle_timeout));
            let drained = loop {
                match up.read_response_body().await {
                    Ok(Some(chunk)) => meter.feed(&chunk),
                    Ok(None) => break true,
                    Err(_) => break false,
                }
            };
            if drained {
                provider.connector.release(up, peer, provider.pool_idle_timeout).await;
            }
        }
        ctx.take_metered(&meter.finish());
        Ok(())
    }

    /// Sends the request and reads the final (non-1xx) response header.
    ///
    /// A pooled connection the provider closed while idle fails at once: such a failure is
    /// retried on another connection, but only while the request was not yet written whole.
    /// Once it was, the provider may be generating, and billing, the answer, so nothing is sent
    /// again here; the error says the request was written ([`SendError::written`]).
    ///
    /// The body goes as its pieces ([`Payload`]), each a write bounded by the provider's idle
    /// timeout; the attempt's deadline bounds them all.
    pub(super) async fn send(
        &self,
        provider: &Provider,
        endpoint: &Endpoint,
        req: RequestHeader,
        body: &Payload,
        first_byte_timeout: Duration,
    ) -> Result<Box<HttpSession>, SendError> {
        let unwritten = |error| SendError { error, written: false };
        let peer = endpoint
            .peer()
            .map_err(|e| unwritten(ApiError::unavailable(format!("provider {}: {e}", provider.name))))?;
        let peer = &*peer;
        let mut attempt = 0;
        loop {
            let (mut up, reused) = provider.connector.session(peer).await.map_err(|e| {
                let timeout = matches!(e.etype(), ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout);
                let kind = if timeout { "connect_timeout" } else { "connect_error" };
                self.metrics.upstream_errors.with_label_values(&[&provider.name, kind]).inc();
                unwritten(if timeout {
                    ApiError::gateway_timeout(format!("provider {}: connect timed out", provider.name))
                } else {
                    ApiError::bad_gateway(format!("provider {}: cannot connect: {}", provider.name, connect_reason(&e)))
                })
            })?;
            up.set_write_timeout(Some(provider.idle_timeout));
            let written = async {
                up.write_request_header(Box::new(req.clone())).await?;
                for piece in body.pieces() {
                    up.write_request_body(piece.clone(), false).await?;
                }
                up.finish_request_body().await
            }
            .await;
            let write_failed = written.is_err();
            let result = match written {
                Ok(()) => read_final_header(&mut up, first_byte_timeout).await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(()) => return Ok(up),
                Err(e) => e,
            };
            if write_failed && reused && attempt < STALE_RETRIES {
                attempt += 1;
                tracing::debug!(provider = %provider.name, error = %e, "pooled connection was stale, retrying on another");
                continue;
            }
            let timeout = e.etype() == &ErrorType::ReadTimedout;
            let kind = if write_failed {
                "write_error"
            } else if timeout {
                "first_byte_timeout"
            } else {
                "exchange_error"
            };
            self.metrics.upstream_errors.with_label_values(&[&provider.name, kind]).inc();
            let error = if timeout && !write_failed {
                ApiError::gateway_timeout(format!(
                    "provider {} sent no answer within {:.1}s",
                    provider.name,
                    first_byte_timeout.as_secs_f64()
                ))
            } else {
                ApiError::bad_gateway(format!("provider {}: {}", provider.name, e.etype().as_str()))
            };
            return Err(SendError { error, written: !write_failed });
        }
    }
}

/// Why an exchange produced no answer, and whether the provider got the whole request (and so
/// may be generating, and billing, an answer nobody will read).
pub(super) struct SendError {
    pub error: ApiError,
    pub written: bool,
}

/// Reads response headers until a final one: informational answers (100, 103) may come first
/// and carry no body.
async fn read_final_header(up: &mut HttpSession, timeout: Duration) -> pingora::Result<()> {
    up.set_read_timeout(Some(timeout));
    loop {
        up.read_response_header().await?;
        let status = up.response_header().map(|h| h.status);
        if !status.is_some_and(|s| s.is_informational() && s != http::StatusCode::SWITCHING_PROTOCOLS) {
            return Ok(());
        }
    }
}

const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";

/// An SSE `error` event, as the Messages API ends a stream it cannot finish.
fn stream_error_event(message: &str) -> bytes::Bytes {
    let data = serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}});
    bytes::Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

fn is_sse(h: &pingora::http::ResponseHeader) -> bool {
    h.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"))
}

fn is_event_stream(h: &pingora::http::ResponseHeader) -> bool {
    h.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/vnd.amazon.eventstream"))
}

/// Reads a small answer (an error, a token count) whole.
async fn read_small(up: &mut HttpSession, provider: &Provider) -> Result<Vec<u8>, ApiError> {
    up.set_read_timeout(Some(provider.idle_timeout));
    let mut body = Vec::new();
    loop {
        match up.read_response_body().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= 256 << 10 => body.extend_from_slice(&chunk),
            Ok(Some(_)) => return Err(ApiError::bad_gateway(format!("provider {}: answer too large", provider.name))),
            Ok(None) => return Ok(body),
            Err(e) => return Err(ApiError::bad_gateway(format!("provider {}: {e}", provider.name))),
        }
    }
}

/// Answers a whole JSON body the gateway rewrote (it has its own length).
async fn write_json(session: &mut Session, request_id: &str, status: u16, body: Bytes) {
    let mut h = pingora::http::ResponseHeader::build(status, Some(4)).expect("valid status");
    let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
    let _ = h.insert_header(http::header::CONTENT_LENGTH, body.len());
    let _ = h.insert_header(super::REQUEST_ID_HEADER, request_id);
    if session.write_response_header(Box::new(h), false).await.is_ok() {
        let _ = session.write_response_body(Some(body), true).await;
    }
}

/// Why a connection failed, in words an operator can act on: Pingora's error type, then the
/// innermost explanation (rustls's verdict on a certificate, the OS error, the egress proxy's
/// refusal).
fn connect_reason(e: &pingora::Error) -> String {
    let mut detail = e.context.as_ref().map(|c| c.as_str().to_string());
    let mut cause = e.cause.as_deref();
    while let Some(c) = cause {
        match c.downcast_ref::<pingora::Error>() {
            Some(inner) => {
                if let Some(ctx) = &inner.context {
                    detail = Some(ctx.as_str().to_string());
                }
                cause = inner.cause.as_deref();
            }
            None => {
                // Pingora attaches the local address to a failed TLS handshake as a cause of
                // its own, with no error inside: the verdict stays in the context above it.
                let text = c.to_string();
                if !text.starts_with("local address ") && !text.is_empty() {
                    detail = Some(text);
                }
                break;
            }
        }
    }
    match detail {
        Some(d) if !d.is_empty() => format!("{}: {d}", e.etype().as_str()),
        _ => e.etype().as_str().to_string(),
    }
}

/// The most a burst of upstream chunks is gathered into before it is written to the client:
/// small enough that one write fits a slow client's write timeout as a chunk did.
const BATCH_BYTES: usize = 16 << 10;

/// Chunks read and not yet written: one is written as it is (no copy), several are joined.
#[derive(Default)]
struct Batch {
    first: Option<bytes::Bytes>,
    more: Option<bytes::BytesMut>,
}

impl Batch {
    fn len(&self) -> usize {
        self.more.as_ref().map_or_else(|| self.first.as_ref().map_or(0, |b| b.len()), |m| m.len())
    }

    fn push(&mut self, chunk: bytes::Bytes) {
        if chunk.is_empty() {
            return;
        }
        match (&mut self.first, &mut self.more) {
            (None, None) => self.first = Some(chunk),
            (Some(first), None) => {
                let mut joined = bytes::BytesMut::with_capacity(first.len() + chunk.len() * 4);
                joined.extend_from_slice(first);
                joined.extend_from_slice(&chunk);
                self.first = None;
                self.more = Some(joined);
            }
            (_, Some(more)) => more.extend_from_slice(&chunk),
        }
    }

    fn take(&mut self) -> Option<bytes::Bytes> {
        self.more.take().map(bytes::BytesMut::freeze).or_else(|| self.first.take())
    }
}

/// The future's output if it is ready without waiting, else `None` (the future is dropped: a
/// body read is cancel-safe, as Pingora's own proxy loop relies on).
fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
