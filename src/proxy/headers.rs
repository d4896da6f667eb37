//! Which headers cross the gateway, in each direction.

use http::header::{self, HeaderName};
use http::HeaderMap;
use pingora::http::{RequestHeader, ResponseHeader};

/// The gateway's own request id, on every response.
pub const REQUEST_ID_HEADER: &str = "x-tollgate-request-id";

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the gateway sets itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers named in `Connection` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(name.as_str()))).unwrap_or(false)
    })
}

/// Copies the client's end-to-end headers onto `upstream`, leaving out hop-by-hop ones, the
/// client's credentials, and what the gateway sets itself (`Host`, `Content-Length`,
/// `Accept-Encoding`, `Expect`). `anthropic-version`, `anthropic-beta` and everything else pass
/// as they came.
pub fn copy_request_headers(client: &RequestHeader, upstream: &mut RequestHeader) {
    let has_connection = client.headers.contains_key(header::CONNECTION);
    for (name, value) in client.headers.iter() {
        if is_hop_by_hop(name)
            || matches!(
                name.as_str(),
                "host" | "content-length" | "x-api-key" | "authorization" | "accept-encoding" | "expect"
            )
            || (has_connection && connection_listed(&client.headers, name))
        {
            continue;
        }
        let _ = upstream.append_header(name.clone(), value.clone());
    }
    // Metering reads the response as it passes: ask for it uncompressed.
    let _ = upstream.insert_header(header::ACCEPT_ENCODING, "identity");
}

/// The response header for the client: the provider's, less hop-by-hop headers, plus the
/// gateway's request id. A body without `Content-Length` goes chunked to HTTP/1.1 clients, and
/// until the connection closes to HTTP/1.0 ones (`chunked_ok` false).
pub fn response_for_client(upstream: &ResponseHeader, request_id: &str, chunked_ok: bool) -> ResponseHeader {
    let mut out = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 2)).expect("valid status");
    let has_connection = upstream.headers.contains_key(header::CONNECTION);
    for (name, value) in upstream.headers.iter() {
        if is_hop_by_hop(name) || (has_connection && connection_listed(&upstream.headers, name)) {
            continue;
        }
        let _ = out.append_header(name.clone(), value.clone());
    }
    let bodyless = matches!(upstream.status.as_u16(), 100..=199 | 204 | 304);
    if chunked_ok && !bodyless && !out.headers.contains_key(header::CONTENT_LENGTH) {
        let _ = out.insert_header(header::TRANSFER_ENCODING, "chunked");
    }
    let _ = out.insert_header(REQUEST_ID_HEADER, request_id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers() {
        let mut client = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        for (k, v) in [
            ("host", "gw"),
            ("x-api-key", "tg-secret"),
            ("authorization", "Bearer tg-secret"),
            ("anthropic-beta", "a-1,b-2"),
            ("anthropic-version", "2023-06-01"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("accept-encoding", "gzip"),
            ("x-claude-code-session-id", "s1"),
        ] {
            client.append_header(k, v).unwrap();
        }
        let mut up = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        copy_request_headers(&client, &mut up);
        let names: Vec<_> = up.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["anthropic-beta", "anthropic-version", "x-claude-code-session-id", "accept-encoding"]);
        assert_eq!(up.headers["anthropic-beta"], "a-1,b-2");
        assert_eq!(up.headers["accept-encoding"], "identity");
    }
}
