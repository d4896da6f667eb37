//! Reading a request body whole, within its size and time limits.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora_proxy::Session;

use super::ApiError;

#[derive(Debug, Clone, Copy)]
pub(super) struct BodyTimeouts {
    pub per_read: Duration,
    pub total: Duration,
}

/// Reads the whole request body, refusing it past `max` bytes (before reading, when
/// `Content-Length` already says so) and when it arrives too slowly (408).
pub(super) async fn read_body(session: &mut Session, max: usize, timeouts: BodyTimeouts) -> Result<Bytes, ApiError> {
    let total = timeouts.total;
    session.set_read_timeout(Some(timeouts.per_read));
    match pingora_timeout::fast_timeout::fast_timeout(total, read_body_within(session, max, timeouts.per_read)).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::request_timeout(format!("the request body did not arrive within {total:?}"))),
    }
}

async fn read_body_within(session: &mut Session, max: usize, per_read: Duration) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("request body is larger than the {max} bytes allowed"));
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // The key was accepted: let the client send the body.
        let _ = session.write_continue_response().await;
    }
    // A body that arrives in one chunk is kept as it is; only a body in pieces is copied into
    // one buffer.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0;
    while let Some(chunk) = session.read_request_body().await.map_err(|e| match e.etype {
        pingora::ErrorType::ReadTimedout => {
            ApiError::request_timeout(format!("the request body sent nothing for {per_read:?}"))
        }
        _ => ApiError::invalid_request(format!("cannot read the request body: {e}")),
    })? {
        len += chunk.len();
        if len > max {
            return Err(too_large());
        }
        match (&mut joined, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&chunk),
            (None, None) => first = Some(chunk),
            (None, Some(head)) => {
                let mut buf = BytesMut::with_capacity(declared.unwrap_or(len).max(len));
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&chunk);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map(BytesMut::freeze).or(first).unwrap_or_default())
}
