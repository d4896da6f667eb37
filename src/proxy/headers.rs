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

/// Headers that carry a client's credentials for the gateway (or anyone): they never leave.
fn is_credential(name: &HeaderName) -> bool {
    matches!(name.as_str(), "x-api-key" | "authorization" | "proxy-authorization" | "cookie")
}

/// Headers a provider reads as account, billing or routing controls (AWS guardrails and
/// performance tiers, the Google project billed, ...): the operator decides, not the client.
fn is_provider_control(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("x-amz") || n.starts_with("x-goog")
}

/// What may cross from the client to one provider.
pub struct RequestPolicy<'a> {
    /// The gateway's own key header (`server.key_header`), a credential like `x-api-key`.
    pub key_header: Option<&'a HeaderName>,
    /// Provider control headers the operator lets through to this provider.
    pub allow: &'a [HeaderName],
}

/// Copies the client's end-to-end headers onto `upstream`, leaving out hop-by-hop ones, every
/// header that can carry a client credential, provider control headers the operator did not
/// allow, forwarding and method-override headers, and what the gateway sets itself (`Host`,
/// `Content-Length`, `Accept-Encoding`, `Expect`, `anthropic-beta`). `anthropic-version` and
/// everything else pass as they came.
pub fn copy_request_headers(client: &RequestHeader, upstream: &mut RequestHeader, policy: &RequestPolicy) {
    let has_connection = client.headers.contains_key(header::CONNECTION);
    for (name, value) in client.headers.iter() {
        if is_hop_by_hop(name)
            || is_credential(name)
            || policy.key_header == Some(name)
            || (is_provider_control(name) && !policy.allow.contains(name))
            || matches!(
                name.as_str(),
                // Set by the gateway itself (the betas after the provider's policy).
                "host" | "content-length" | "accept-encoding" | "expect" | "anthropic-beta"
                    // Would tell the provider the employee's address, or change the method.
                    | "forwarded" | "x-forwarded-for" | "x-forwarded-host" | "x-forwarded-proto" | "x-real-ip"
                    | "x-http-method-override" | "x-http-method" | "x-method-override"
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

/// Response headers a client gets back from a provider: what the Messages API's clients and
/// the AWS SDKs read (content type, request ids, rate limits and retry advice, Bedrock's error
/// type and token counts). Everything else (cookies, the provider account's organization id,
/// the provider's internal routing headers) stays at the gateway, unless the operator adds it
/// with `server.response_headers`.
fn is_allowed_response(name: &HeaderName, extra: &[HeaderName]) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "content-type"
            | "content-length"
            | "cache-control"
            | "request-id"
            | "x-request-id"
            | "retry-after"
            | "retry-after-ms"
            | "x-should-retry"
            | "x-amzn-requestid"
            | "x-amzn-errortype"
    ) || n.starts_with("anthropic-ratelimit-")
        || n.starts_with("x-amzn-bedrock-")
        || extra.contains(name)
}

/// The response header for the client: the provider's allowed headers, plus the gateway's
/// request id. A body without `Content-Length` goes chunked to HTTP/1.1 clients, and until the
/// connection closes to HTTP/1.0 ones (`chunked_ok` false).
pub fn response_for_client(
    upstream: &ResponseHeader,
    request_id: &str,
    chunked_ok: bool,
    extra: &[HeaderName],
) -> ResponseHeader {
    let mut out = ResponseHeader::build(upstream.status, Some(upstream.headers.len() + 2)).expect("valid status");
    for (name, value) in upstream.headers.iter() {
        if is_allowed_response(name, extra) {
            let _ = out.append_header(name.clone(), value.clone());
        }
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
            ("x-gateway-key", "tg-secret"),
            ("cookie", "session=1"),
            ("proxy-authorization", "Basic eA=="),
            ("x-amzn-bedrock-performanceconfig-latency", "optimized"),
            ("x-amzn-bedrock-guardrailidentifier", "g1"),
            ("x-goog-user-project", "someone-else"),
        ] {
            client.append_header(k, v).unwrap();
        }
        let mut up = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        let key_header = HeaderName::from_static("x-gateway-key");
        let allow = [HeaderName::from_static("x-amzn-bedrock-guardrailidentifier")];
        copy_request_headers(&client, &mut up, &RequestPolicy { key_header: Some(&key_header), allow: &allow });
        let names: Vec<_> = up.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            ["anthropic-version", "x-claude-code-session-id", "x-amzn-bedrock-guardrailidentifier", "accept-encoding"]
        );
        assert_eq!(up.headers["accept-encoding"], "identity");
    }
}

#[cfg(test)]
mod response_tests {
    use super::*;

    #[test]
    fn only_allowed_response_headers_reach_the_client() {
        let mut up = ResponseHeader::build(200, None).unwrap();
        for (k, v) in [
            ("content-type", "text/event-stream"),
            ("request-id", "req_1"),
            ("anthropic-ratelimit-requests-remaining", "9"),
            ("anthropic-organization-id", "org-secret"),
            ("set-cookie", "a=b"),
            ("cf-ray", "x"),
            ("x-amzn-bedrock-output-token-count", "5"),
            ("x-custom", "1"),
        ] {
            up.append_header(k, v).unwrap();
        }
        let out = response_for_client(&up, "req_gw", true, &[HeaderName::from_static("x-custom")]);
        let names: Vec<_> = out.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "request-id",
                "anthropic-ratelimit-requests-remaining",
                "x-amzn-bedrock-output-token-count",
                "x-custom",
                "transfer-encoding",
                REQUEST_ID_HEADER
            ]
        );
    }
}
