//! A mock Anthropic provider for tests and benchmarks. It speaks the Messages wire format
//! (JSON and SSE with the real event sequence and usage), records what it receives, and can be
//! told to fail, to delay chunks, or to cut a stream.
//!
//! Behaviour comes from [`Behavior`] (set by the test) and can be overridden per request with
//! headers, which pass through the gateway untouched:
//! `x-mock-status` (answer this status with an Anthropic error body), `x-mock-delay-ms` (pause
//! between SSE events), `x-mock-cut-after` (close the connection after this many events),
//! `x-mock-deltas` (number of text deltas), `x-mock-usage` (JSON usage object to report),
//! `x-mock-header-delay-ms` (answer this late), `x-mock-response-headers` (a JSON object of
//! headers to add to the answer).
//!
//! With [`Behavior::realm`] set, Bedrock and Vertex requests must carry credentials that realm
//! issued (see [`cloud`]), as the real clouds insist.

pub mod cloud;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::protocol::json_peek::peek_request;

/// Usage the mock reports, per token class, and what ran beyond tokens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MockUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_5m_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    /// `usage.speed` (`"fast"` for fast mode).
    pub speed: Option<String>,
    /// `usage.inference_geo` (`"us"`, `"global"`).
    pub inference_geo: Option<String>,
    /// `usage.server_tool_use` counts.
    pub web_search_requests: u64,
    pub web_fetch_requests: u64,
    /// Report cache writes without the `cache_creation` TTL split, as some providers do.
    pub no_cache_split: bool,
}

impl Default for MockUsage {
    fn default() -> Self {
        MockUsage {
            input_tokens: 25,
            output_tokens: 15,
            cache_read_input_tokens: 0,
            cache_creation_5m_input_tokens: 0,
            cache_creation_1h_input_tokens: 0,
            speed: None,
            inference_geo: None,
            web_search_requests: 0,
            web_fetch_requests: 0,
            no_cache_split: false,
        }
    }
}

impl MockUsage {
    fn input_side(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_5m_input_tokens + self.cache_creation_1h_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
        });
        if !self.no_cache_split {
            v["cache_creation"] = serde_json::json!({
                "ephemeral_5m_input_tokens": self.cache_creation_5m_input_tokens,
                "ephemeral_1h_input_tokens": self.cache_creation_1h_input_tokens,
            });
        }
        if let Some(speed) = &self.speed {
            v["speed"] = speed.as_str().into();
        }
        if let Some(geo) = &self.inference_geo {
            v["inference_geo"] = geo.as_str().into();
        }
        v
    }

    fn server_tool_use(&self) -> Option<serde_json::Value> {
        (self.web_search_requests > 0 || self.web_fetch_requests > 0).then(|| {
            serde_json::json!({
                "web_search_requests": self.web_search_requests,
                "web_fetch_requests": self.web_fetch_requests,
            })
        })
    }

    fn full(&self, output_tokens: u64) -> serde_json::Value {
        let mut v = self.input_side();
        v["output_tokens"] = output_tokens.into();
        v["service_tier"] = "standard".into();
        if let Some(tools) = self.server_tool_use() {
            v["server_tool_use"] = tools;
        }
        v
    }

    /// What a real `message_delta` carries: cumulative totals, but no `cache_creation` split.
    fn delta(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_5m_input_tokens + self.cache_creation_1h_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens,
        });
        if let Some(tools) = self.server_tool_use() {
            v["server_tool_use"] = tools;
        }
        v
    }
}

#[derive(Debug, Clone)]
pub struct Behavior {
    /// Answer every request with this status and an Anthropic error body.
    pub status: Option<u16>,
    pub usage: MockUsage,
    /// Text deltas in a streamed answer.
    pub deltas: usize,
    pub delay: Duration,
    /// Close the connection after this many SSE events.
    pub cut_after: Option<usize>,
    /// Keep a copy of every request (off for benchmarks).
    pub record: bool,
    /// Wait this long before answering (a stalled first byte).
    pub header_delay: Duration,
    /// The `error.message` of error answers, instead of a generic one.
    pub error_message: Option<String>,
    /// Authenticate Bedrock (SigV4 or a Bedrock API key) and Vertex (a Google bearer token)
    /// requests against the credentials this realm issued; None accepts any.
    pub realm: Option<Arc<cloud::Realm>>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            status: None,
            usage: MockUsage::default(),
            deltas: 3,
            delay: Duration::ZERO,
            cut_after: None,
            record: true,
            header_delay: Duration::ZERO,
            error_message: None,
            realm: None,
        }
    }
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct Shared {
    behavior: Mutex<Behavior>,
    received: Mutex<Vec<Received>>,
    abandoned: std::sync::atomic::AtomicUsize,
}

/// A running mock; it stops when dropped.
pub struct MockProvider {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl MockProvider {
    /// Starts on `127.0.0.1` with a free port, on the current tokio runtime.
    pub async fn start(behavior: Behavior) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("valid"), behavior).await
    }

    pub async fn start_on(addr: SocketAddr, behavior: Behavior) -> std::io::Result<Self> {
        Self::serve(addr, behavior, None).await
    }

    /// Starts serving HTTPS with the given PEM certificate chain and key.
    pub async fn start_tls(behavior: Behavior, cert_pem: &str, key_pem: &str) -> std::io::Result<Self> {
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
            .ok_or_else(|| std::io::Error::other("no private key in the PEM"))?;
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::serve("127.0.0.1:0".parse().expect("valid"), behavior, Some(acceptor)).await
    }

    async fn serve(
        addr: SocketAddr,
        behavior: Behavior,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { behavior: Mutex::new(behavior), ..Shared::default() });
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(s.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        Ok(MockProvider { addr, shared, _stop: stop_tx })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many streamed answers ended early because the reader went away.
    pub fn abandoned_streams(&self) -> usize {
        self.shared.abandoned.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_behavior(&self, b: Behavior) {
        *self.shared.behavior.lock().unwrap() = b;
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.shared.received.lock().unwrap().clear();
    }
}

type Body = http_body_util::Either<http_body_util::Full<Bytes>, ChannelBody>;

/// A response body fed by a channel; an `Err` item aborts the connection mid-body.
pub struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

fn header<T: std::str::FromStr>(h: &HeaderMap, name: &str) -> Option<T> {
    h.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // `x-mock-response-headers: {"name": "value", ...}` adds headers to the answer, as a real
    // provider sends its own (cookies, account ids, routing headers).
    let extra: Option<serde_json::Map<String, serde_json::Value>> =
        req.headers().get("x-mock-response-headers").and_then(|v| serde_json::from_slice(v.as_bytes()).ok());
    let mut resp = answer(shared, req).await?;
    for (name, value) in extra.into_iter().flatten() {
        if let (Ok(n), Some(Ok(v))) =
            (http::HeaderName::try_from(name.as_str()), value.as_str().map(http::HeaderValue::try_from))
        {
            resp.headers_mut().append(n, v);
        }
    }
    Ok(resp)
}

async fn answer(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut b = shared.behavior.lock().unwrap().clone();
    if b.record {
        shared.received.lock().unwrap().push(Received {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }
    let h = &parts.headers;
    if let Some(s) = header::<u16>(h, "x-mock-status") {
        b.status = Some(s);
    }
    if let Some(ms) = header::<u64>(h, "x-mock-delay-ms") {
        b.delay = Duration::from_millis(ms);
    }
    if let Some(n) = header::<usize>(h, "x-mock-cut-after") {
        b.cut_after = Some(n);
    }
    if let Some(n) = header::<usize>(h, "x-mock-deltas") {
        b.deltas = n;
    }
    if let Some(u) = h.get("x-mock-usage").and_then(|v| serde_json::from_slice(v.as_bytes()).ok()) {
        b.usage = u;
    }
    if let Some(ms) = header::<u64>(h, "x-mock-header-delay-ms") {
        b.header_delay = Duration::from_millis(ms);
    }
    if !b.header_delay.is_zero() {
        // A slow first byte: the answer's header comes this late.
        tokio::time::sleep(b.header_delay).await;
    }

    let path = parts.uri.path();
    if let Some(rest) = path.strip_prefix("/model/") {
        if let Some(refusal) = b.realm.as_ref().and_then(|realm| {
            let path_and_query = parts.uri.path_and_query().map_or(path, |p| p.as_str());
            realm.verify_bedrock(parts.method.as_str(), path_and_query, h, &body).err()
        }) {
            return Ok(bedrock_refusal(&refusal));
        }
        return Ok(bedrock(rest, &body, b, shared));
    }
    if let Some((base, rest)) = path.split_once("/publishers/anthropic/models/") {
        // Vertex's own shape only: /v1/projects/{project}/locations/{region}.
        let parts: Vec<&str> = base.split('/').collect();
        if !matches!(parts.as_slice(), ["", "v1", "projects", p, "locations", r] if !p.is_empty() && !r.is_empty()) {
            return Ok(error_response(404, None));
        }
        if let Some(refusal) = b.realm.as_ref().and_then(|realm| realm.verify_bearer(h).err()) {
            return Ok(vertex_refusal(&refusal));
        }
        return Ok(vertex(rest, &body, b, shared));
    }
    if let Some(status) = b.status {
        return Ok(error_response(status, b.error_message.as_deref()));
    }
    // As strict as the Messages API about paths: exactly these two.
    if path == "/v1/messages/count_tokens" {
        return Ok(json_response(StatusCode::OK, serde_json::json!({"input_tokens": b.usage.input_tokens})));
    }
    if path != "/v1/messages" {
        return Ok(error_response(404, None));
    }
    let Ok(peek) = peek_request(&body) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"type":"error","error":{"type":"invalid_request_error","message":"mock: invalid JSON"}}),
        ));
    };
    let model = peek.model.map(|(m, _)| m).unwrap_or_default();
    if peek.stream {
        Ok(stream_response(model, b, shared))
    } else {
        Ok(json_response(StatusCode::OK, message_json("msg_mock", &model, &b)))
    }
}

/// Bedrock's InvokeModel: the model in the path, the Bedrock envelope in the body (checked), a
/// JSON answer or an event stream, and errors as `{"message": ...}`.
fn bedrock(rest: &str, body: &[u8], b: Behavior, shared: Arc<Shared>) -> Response<Body> {
    let bedrock_error = |status: u16, message: &str| {
        let mut r = json_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            serde_json::json!({ "message": message }),
        );
        // The exception names Bedrock gives these statuses (what boto3 raises).
        let exception = match status {
            400 => "ValidationException",
            403 => "AccessDeniedException",
            404 => "ResourceNotFoundException",
            408 => "ModelTimeoutException",
            429 => "ThrottlingException",
            503 => "ServiceUnavailableException",
            _ => "InternalServerException",
        };
        let value = format!("{exception}:http://internal.amazon.com/coral/com.amazon.bedrock/");
        r.headers_mut().insert("x-amzn-errortype", http::HeaderValue::from_str(&value).expect("a header value"));
        r
    };
    if let Some(status) = b.status {
        let message = b.error_message.clone().unwrap_or_else(|| format!("mock bedrock: status {status}"));
        return bedrock_error(status, &message);
    }
    let Some((model, action)) = rest.split_once('/') else {
        return bedrock_error(404, "mock bedrock: no action");
    };
    let model = percent_decode(model);
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return bedrock_error(400, "mock bedrock: invalid JSON"),
    };
    if action == "count-tokens" {
        let inner = v["input"]["invokeModel"]["body"].as_str().map(|b64| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b64).ok()
        });
        if inner.flatten().is_none() {
            return bedrock_error(400, "mock bedrock: count-tokens needs input.invokeModel.body");
        }
        return json_response(StatusCode::OK, serde_json::json!({"inputTokens": b.usage.input_tokens}));
    }
    // The envelope a real Bedrock insists on. Its version is `bedrock-2023-05-31`, or the API date
    // the `anthropic` Python SDK's AnthropicBedrock puts there (`2026-10-21` in 2.14).
    if v.get("model").is_some() || v.get("stream").is_some() {
        return bedrock_error(400, "mock bedrock: model and stream are not allowed in the body");
    }
    let version = v["anthropic_version"].as_str().unwrap_or_default();
    if version != "bedrock-2023-05-31" && !is_api_date(version) {
        return bedrock_error(400, "mock bedrock: anthropic_version must be bedrock-2023-05-31");
    }
    match action {
        "invoke" => json_response(StatusCode::OK, message_json("msg_bdrk_mock", &model, &b)),
        "invoke-with-response-stream" => {
            // Each SSE event's data line is what Bedrock wraps in a frame.
            let frames = sse_events(&model, &b.usage, b.deltas)
                .iter()
                .map(|event| {
                    let text = String::from_utf8_lossy(event);
                    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("{}").to_string();
                    crate::protocol::bedrock::chunk_frame(data.as_bytes())
                })
                .collect();
            let mut r = send_paced(frames, b, shared);
            r.headers_mut()
                .insert("content-type", http::HeaderValue::from_static("application/vnd.amazon.eventstream"));
            r
        }
        _ => bedrock_error(404, "mock bedrock: unknown action"),
    }
}

/// AWS's answer to a request it could not authenticate: `{"message": ...}` with the code in
/// `x-amzn-errortype`, as Bedrock's front end sends it.
fn bedrock_refusal(f: &cloud::AuthFailure) -> Response<Body> {
    let mut r = json_response(
        StatusCode::from_u16(f.status).unwrap_or(StatusCode::FORBIDDEN),
        serde_json::json!({ "message": f.message }),
    );
    let value = format!("{}:http://internal.amazon.com/coral/com.amazon.coral.service/", f.code);
    r.headers_mut().insert("x-amzn-errortype", http::HeaderValue::from_str(&value).expect("a header value"));
    r
}

/// Google's answer to a request without a valid token: 401 `UNAUTHENTICATED`.
fn vertex_refusal(f: &cloud::AuthFailure) -> Response<Body> {
    let mut r = json_response(
        StatusCode::from_u16(f.status).unwrap_or(StatusCode::UNAUTHORIZED),
        serde_json::json!({"error": {"code": f.status, "message": f.message, "status": f.code}}),
    );
    r.headers_mut()
        .insert("www-authenticate", http::HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""));
    r
}

/// Vertex AI's rawPredict: the model in the path, `anthropic_version: vertex-2023-10-16` in the
/// body (checked; count-tokens takes any version), Messages answers, errors in Google's shape.
fn vertex(rest: &str, body: &[u8], b: Behavior, shared: Arc<Shared>) -> Response<Body> {
    let google_error = |status: u16, message: &str| {
        json_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            serde_json::json!({"error": {"code": status, "message": message, "status": "MOCK"}}),
        )
    };
    if let Some(status) = b.status {
        let message = b.error_message.clone().unwrap_or_else(|| format!("mock vertex: status {status}"));
        return google_error(status, &message);
    }
    let Some((model, action)) = rest.rsplit_once(':') else {
        return google_error(404, "mock vertex: no action");
    };
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return google_error(400, "mock vertex: invalid JSON"),
    };
    // rawPredict takes its own version, or the API date the `anthropic` Python SDK's
    // AnthropicVertex puts there (`2026-10-21` in 2.14); count-tokens takes any version, but one.
    let version = v["anthropic_version"].as_str().unwrap_or_default();
    if model == "count-tokens" && version.is_empty() {
        return google_error(400, "mock vertex: count-tokens needs anthropic_version");
    }
    if model != "count-tokens" && version != "vertex-2023-10-16" && !is_api_date(version) {
        return google_error(400, "mock vertex: anthropic_version must be vertex-2023-10-16");
    }
    if model == "count-tokens" {
        if !v["model"].is_string() {
            return google_error(400, "mock vertex: count-tokens needs the model in the body");
        }
        return json_response(StatusCode::OK, serde_json::json!({"input_tokens": b.usage.input_tokens}));
    }
    if v.get("model").is_some() {
        return google_error(400, "mock vertex: model is not allowed in the body");
    }
    match action {
        "streamRawPredict" if v["stream"] == true => stream_response(model.to_string(), b, shared),
        "rawPredict" => json_response(StatusCode::OK, message_json("msg_vrtx_mock", model, &b)),
        _ => google_error(400, "mock vertex: streamRawPredict needs stream: true"),
    }
}

/// An Anthropic API version date, `YYYY-MM-DD`.
fn is_api_date(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole (non-streamed) Messages answer.
fn message_json(id: &str, model: &str, b: &Behavior) -> serde_json::Value {
    serde_json::json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Hello from the mock. ".repeat(b.deltas)}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": b.usage.full(b.usage.output_tokens),
    })
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let body = Bytes::from(serde_json::to_vec(&v).expect("serializes"));
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("request-id", "req_mock")
        .body(http_body_util::Either::Left(http_body_util::Full::new(body)))
        .expect("valid response")
}

fn error_response(status: u16, custom: Option<&str>) -> Response<Body> {
    let (kind, message) = match status {
        400 => ("invalid_request_error", "mock: bad request"),
        401 => ("authentication_error", "mock: invalid x-api-key"),
        404 => ("not_found_error", "mock: not found"),
        413 => ("request_too_large", "mock: too large"),
        429 => ("rate_limit_error", "mock: rate limited"),
        529 => ("overloaded_error", "Overloaded"),
        _ => ("api_error", "mock: internal error"),
    };
    let message = custom.unwrap_or(message);
    let mut r = json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}),
    );
    if status == 429 {
        r.headers_mut().insert("retry-after", http::HeaderValue::from_static("1"));
    }
    r
}

/// The events of a streamed answer, in the order the Messages API sends them.
pub fn sse_events(model: &str, usage: &MockUsage, deltas: usize) -> Vec<Bytes> {
    let ev = |name: &str, data: serde_json::Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut out = Vec::with_capacity(deltas + 6);
    let mut start_usage = usage.input_side();
    start_usage["output_tokens"] = 1.into();
    out.push(ev(
        "message_start",
        serde_json::json!({"type": "message_start", "message": {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    ));
    out.push(ev(
        "content_block_start",
        serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    out.push(ev("ping", serde_json::json!({"type": "ping"})));
    for i in 0..deltas {
        out.push(ev(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": format!("chunk {i} of the mock's answer. ")}}),
        ));
    }
    out.push(ev("content_block_stop", serde_json::json!({"type": "content_block_stop", "index": 0})));
    out.push(ev(
        "message_delta",
        serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": usage.delta()}),
    ));
    out.push(ev("message_stop", serde_json::json!({"type": "message_stop"})));
    out
}

fn stream_response(model: String, b: Behavior, shared: Arc<Shared>) -> Response<Body> {
    let events = sse_events(&model, &b.usage, b.deltas);
    send_paced(events, b, shared)
}

/// Streams `parts` with the behaviour's pacing and cut, as `text/event-stream` (callers change
/// the type for other framings).
fn send_paced(parts: Vec<Bytes>, b: Behavior, shared: Arc<Shared>) -> Response<Body> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        for (i, event) in parts.into_iter().enumerate() {
            if b.cut_after == Some(i) {
                // Let what was sent reach the wire first: hyper drops unflushed output on abort.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("mock: cut"))).await;
                return;
            }
            if i > 0 && !b.delay.is_zero() {
                tokio::time::sleep(b.delay).await;
            }
            if tx.send(Ok(event)).await.is_err() {
                shared.abandoned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("request-id", "req_mock")
        .body(http_body_util::Either::Right(ChannelBody(rx)))
        .expect("valid response")
}

/// A request body shaped like Claude Code's (three system blocks, 24 tools, metadata, a user
/// turn), padded with prompt text to about `size` bytes. For tests and benchmarks.
pub fn claude_code_body(model: &str, stream: bool, size: usize) -> Vec<u8> {
    let tools: Vec<serde_json::Value> = (0..24)
        .map(|i| {
            serde_json::json!({
                "name": format!("Tool{i}"),
                "description": format!("Tool number {i}. ").repeat(40),
                "input_schema": {"type": "object", "properties": {
                    "path": {"type": "string", "description": "An absolute path."},
                    "limit": {"type": "integer", "description": "At most this many lines."}},
                    "required": ["path"], "additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "model": model,
        "max_tokens": 64000,
        "stream": stream,
        "thinking": {"type": "adaptive"},
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0; cc_entrypoint=cli"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            {"type": "text", "text": "Follow the user's instructions. \"Quote\" and \\ escapes, unicode caf\u{e9}. ".repeat(150), "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ],
        "tools": tools,
        "metadata": {"user_id": "{\"device_id\":\"4c2f\",\"session_id\":\"9a1e\"}"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}],
    });
    let current = serde_json::to_vec(&body).expect("serializes").len();
    let pad = size.saturating_sub(current);
    body["messages"][0]["content"][0]["text"] =
        "Please look at src/main.rs and explain it. ".repeat(pad / 43 + 1)[..pad].into();
    serde_json::to_vec(&body).expect("serializes")
}
