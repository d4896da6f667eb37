//! The real-client conformance suite: pinned releases of Claude Code (npm), the `anthropic`
//! Python SDK (`Anthropic`, `AnthropicBedrock`, `AnthropicVertex`) and boto3 (PyPI), installed by
//! `scripts/conformance-deps.sh` into `.cache/conformance/`, run against one gateway in front of
//! three mock providers (Anthropic, Bedrock, Vertex).
//!
//! Every way Claude Code can reach a gateway (Anthropic with `x-api-key`, a bearer token or an
//! `apiKeyHelper`; Bedrock with `CLAUDE_CODE_SKIP_BEDROCK_AUTH` or a Bedrock API key; Vertex with
//! `CLAUDE_CODE_SKIP_VERTEX_AUTH`, anonymously or with the key in a custom header) and every SDK
//! client, each on every provider kind: the model family picks the provider (`*sonnet*` the
//! Anthropic API, `*opus*` Bedrock, `*haiku*` Vertex), whatever id format the client sends.
//!
//! Clients reach the gateway's plain listeners through a tap (a TCP relay that keeps a copy of
//! both directions), so each cell compares what the client really sent with what the provider
//! got. A cell asserts:
//! - the client: it succeeded (Claude Code exits 0), the mock's text and the cell's own usage
//!   (each cell asks the mock for distinct token counts), or the right exception for a 429;
//! - the provider: exactly one request, on the provider the model routes to, at that provider's
//!   path; every beta the client sent (header and Bedrock body) in the place that provider takes
//!   them; the API version; the gateway's provider credential, and no client credential (gateway
//!   key, AWS keys, Google token) in any header;
//! - the gateway's usage record (found by the `x-tollgate-request-id` the client was answered
//!   with): format, provider, key, auth, status, outcome and exactly the mock's usage.
//!
//! Two kinds of Claude Code cells go further:
//! - a provider's 400 (`invalid_request_error` with a message of the provider's own), on one row
//!   of each of its formats: Claude Code fails (a non-zero exit or `is_error`) and prints the
//!   provider's message, which every request it sent got in its format's error shape (Anthropic,
//!   Bedrock's `{"message"}` and `x-amzn-errortype`, Google's `{"error":{"message"}}`). Claude
//!   Code sends a refused request again without a feature at a time, so such a cell has several
//!   requests, each checked against what the provider got;
//! - model discovery (`CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1`, its Anthropic rows): at
//!   start it sends `GET /v1/models` with its inference credentials and gets the key's models in
//!   the Models API's shape, and keeps (in `~/.claude/cache/gateway-models.json`) the ids with
//!   `claude` or `anthropic` in them.
//!
//! Missing clients fail the test with the command that installs them. `KNOWN_GAPS` lists cells
//! that fail for a reason outside the client (a gateway gap); they must keep failing (a fixed gap
//! fails the test until it leaves the list). The matrix is printed and written to
//! `.cache/conformance/last-run.md`, for the README's "Conformance matrix".

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::mock::Received;

const PROJECT: &str = "p1";
const VERTEX_REGION: &str = "us-east5";
/// Credentials the clients present that are not the gateway's: none may reach a provider.
const GOOGLE_TOKEN: &str = "ya29.conformance-google-token";
const AWS_ACCESS_KEY: &str = "AKIACONFORMANCEDUMMY";
const KEY_HEADER: &str = "x-tollgate-key";
/// Betas the SDK cells send (Claude Code sends its own).
const SDK_BETAS: [&str; 2] = ["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"];
/// Betas Bedrock and Vertex providers drop by default (the README's beta policy).
const DROPPED_OFF_ANTHROPIC: [&str; 4] = ["files-api-", "mcp-client-", "code-execution-", "skills-"];

/// Cells that fail because of the gateway, not the client. Each must still fail, and in the same
/// way; the README's matrix shows them as ✗ with the reason.
struct Gap {
    /// Cell ids starting with this and containing `part`.
    prefix: &'static str,
    part: &'static str,
    why: &'static str,
    /// The status the client gets today: a cell failing any other way is a failure.
    status: u16,
}

const KNOWN_GAPS: &[Gap] = &[];

fn known_gap(id: &str) -> Option<&'static Gap> {
    KNOWN_GAPS.iter().find(|g| id.starts_with(g.prefix) && id.contains(g.part))
}

// ---------------------------------------------------------------------------------------------
// The installed clients

struct Clients {
    claude: PathBuf,
    python: PathBuf,
    claude_version: String,
    anthropic_version: String,
    boto3_version: String,
    dir: PathBuf,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pinned versions (`tests/conformance/versions.env`), each overridden by the environment.
fn pins() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("tests/conformance/versions.env")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = std::env::var(k).ok().filter(|e| !e.is_empty()).unwrap_or_else(|| v.trim().to_string());
            (k.trim().to_string(), v)
        })
        .collect()
}

fn find_clients() -> Clients {
    let dir = std::env::var_os("TOLLGATE_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/conformance"));
    let pins = pins();
    let pin = |name: &str| pins.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let claude = std::env::var_os("TOLLGATE_CONFORMANCE_CLAUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join(format!("npm-{}", pin("CLAUDE_CODE_VERSION"))).join("node_modules/.bin/claude"));
    let python = std::env::var_os("TOLLGATE_CONFORMANCE_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        dir.join(format!(
            "py-anthropic-{}-boto3-{}-otelproto-{}",
            pin("ANTHROPIC_PY_VERSION"),
            pin("BOTO3_VERSION"),
            pin("OTEL_PROTO_VERSION")
        ))
        .join("bin/python")
    });
    for (what, path) in [("Claude Code", &claude), ("the Python clients", &python)] {
        assert!(
            path.exists(),
            "\n\nThe conformance suite needs real clients, and {what} is not installed: {} does not exist.\n\
             Install the pinned clients (npm and python3 required; cached in .cache/conformance/) with\n\n    \
             scripts/conformance-deps.sh\n\n\
             or run the suite as `scripts/test --test conformance`, which installs them first. Versions other\n\
             than the pins: `CLAUDE_CODE_VERSION=latest scripts/test --test conformance`, or\n\
             `export $(CLAUDE_CODE_VERSION=latest scripts/conformance-deps.sh)` before `cargo test --test conformance`.\n",
            path.display()
        );
    }
    let out = std::process::Command::new(&claude).arg("--version").env("DISABLE_AUTOUPDATER", "1").output().unwrap();
    let claude_version = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("?").to_string();
    let out = std::process::Command::new(&python)
        .args(["-c", "import importlib.metadata as m; print(m.version('anthropic'), m.version('boto3'))"])
        .output()
        .unwrap();
    let versions = String::from_utf8_lossy(&out.stdout).to_string();
    let mut v = versions.split_whitespace().map(str::to_string);
    let (anthropic_version, boto3_version) = (v.next().unwrap_or_default(), v.next().unwrap_or_default());
    assert!(!boto3_version.is_empty(), "{} cannot import anthropic and boto3: {versions}", python.display());
    Clients { claude, python, claude_version, anthropic_version, boto3_version, dir }
}

// ---------------------------------------------------------------------------------------------
// The tap: a TCP relay in front of a listener that keeps both directions of every connection

#[derive(Default)]
struct Conn {
    up: Vec<u8>,
    /// When each read of `up` began: its offset and the time.
    up_at: Vec<(usize, Instant)>,
    down: Vec<u8>,
}

struct Tap {
    port: u16,
    conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: impl Fn(&[u8]),
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                record(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

impl Tap {
    async fn start(target: u16) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let all = conns.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let conn = Arc::new(Mutex::new(Conn::default()));
                all.lock().unwrap().push(conn.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let c = conn.clone();
                    tokio::join!(
                        pump(cr, sw, move |b| {
                            let mut c = c.lock().unwrap();
                            let at = c.up.len();
                            c.up_at.push((at, Instant::now()));
                            c.up.extend_from_slice(b);
                        }),
                        pump(sr, cw, move |b| conn.lock().unwrap().down.extend_from_slice(b)),
                    );
                });
            }
        });
        Tap { port, conns, _stop: stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request seen so far with the answer it got, in the order they were sent (a client's
    /// second request may come on another connection than its first).
    fn exchanges(&self) -> Vec<Exchange> {
        let conns: Vec<_> = self.conns.lock().unwrap().clone();
        let mut all: Vec<Exchange> = conns
            .iter()
            .flat_map(|c| {
                let c = c.lock().unwrap();
                exchanges(&c.up, &c.up_at, &c.down)
            })
            .collect();
        all.sort_by_key(|x| x.sent_at);
        all
    }
}

type Headers = Vec<(String, String)>;

/// One HTTP/1.1 request as the client sent it, and the answer it got.
#[derive(Debug, Clone)]
struct Exchange {
    method: String,
    target: String,
    headers: Headers,
    body: Vec<u8>,
    /// When its first byte reached the tap.
    sent_at: Option<Instant>,
    status: Option<u16>,
    response_headers: Headers,
    response_body: Vec<u8>,
}

fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// A message head at the start of `buf`: its start line, headers and length.
fn parse_head(buf: &[u8]) -> Option<(String, Headers, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end - 4]).to_string();
    let mut lines = text.split("\r\n");
    let start = lines.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((start, headers, end))
}

/// The body at the start of `buf` framed by `headers`, and the bytes it took; `to_end` reads an
/// unframed body to the end (a response without a length).
fn parse_body(buf: &[u8], headers: &Headers, to_end: bool) -> (Vec<u8>, usize) {
    if header(headers, "transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        let (mut body, mut at) = (Vec::new(), 0);
        loop {
            let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else { return (body, buf.len()) };
            let line = String::from_utf8_lossy(&buf[at..at + eol]).to_string();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
            at += eol + 2;
            if size == 0 {
                // Trailers, then the empty line.
                while let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") {
                    at += eol + 2;
                    if eol == 0 {
                        break;
                    }
                }
                return (body, at.min(buf.len()));
            }
            let end = (at + size).min(buf.len());
            body.extend_from_slice(&buf[at..end]);
            at = (end + 2).min(buf.len());
        }
    }
    if let Some(len) = header(headers, "content-length").and_then(|l| l.parse::<usize>().ok()) {
        let len = len.min(buf.len());
        return (buf[..len].to_vec(), len);
    }
    if to_end {
        (buf.to_vec(), buf.len())
    } else {
        (Vec::new(), 0)
    }
}

fn exchanges(up: &[u8], up_at: &[(usize, Instant)], down: &[u8]) -> Vec<Exchange> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((start, headers, len)) = parse_head(&up[at..]) {
        let sent_at = up_at.iter().take_while(|(offset, _)| *offset <= at).last().map(|(_, t)| *t);
        at += len;
        let (body, used) = parse_body(&up[at..], &headers, false);
        at += used;
        let mut parts = start.split(' ');
        let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        out.push(Exchange {
            method,
            target,
            headers,
            body,
            sent_at,
            status: None,
            response_headers: Vec::new(),
            response_body: Vec::new(),
        });
    }
    let (mut at, mut i) = (0, 0);
    while i < out.len() {
        let Some((start, headers, len)) = parse_head(&down[at..]) else { break };
        at += len;
        let status: u16 = start.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if (100..200).contains(&status) {
            continue;
        }
        if out[i].method != "HEAD" && status != 204 && status != 304 {
            let (body, used) = parse_body(&down[at..], &headers, true);
            out[i].response_body = body;
            at += used;
        }
        out[i].status = Some(status);
        out[i].response_headers = headers;
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The cells

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Anthropic,
    Bedrock,
    Vertex,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Anthropic => "anthropic",
            Kind::Bedrock => "bedrock",
            Kind::Vertex => "vertex",
        }
    }

    /// The model family that routes to this provider, and the provider's own id for it.
    fn family(self) -> (&'static str, &'static str) {
        match self {
            Kind::Anthropic => ("sonnet", "claude-sonnet-4-6"),
            Kind::Bedrock => ("opus", "us.anthropic.claude-opus-4-6-v1"),
            Kind::Vertex => ("haiku", "claude-haiku-4-5@20251001"),
        }
    }

    /// The id a client speaking `format` sends for this provider's family.
    fn client_model(self, format: Kind) -> &'static str {
        match (format, self) {
            (Kind::Anthropic, Kind::Anthropic) | (Kind::Vertex, Kind::Anthropic) => "claude-sonnet-4-6",
            (Kind::Anthropic, Kind::Bedrock) | (Kind::Vertex, Kind::Bedrock) => "claude-opus-4-6",
            (Kind::Anthropic, Kind::Vertex) => "claude-haiku-4-5",
            (Kind::Vertex, Kind::Vertex) => "claude-haiku-4-5@20251001",
            (Kind::Bedrock, Kind::Anthropic) => "us.anthropic.claude-sonnet-4-6",
            (Kind::Bedrock, Kind::Bedrock) => "us.anthropic.claude-opus-4-6-v1",
            (Kind::Bedrock, Kind::Vertex) => "us.anthropic.claude-haiku-4-5-20251001-v1:0",
        }
    }
}

const KINDS: [Kind; 3] = [Kind::Anthropic, Kind::Bedrock, Kind::Vertex];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Create,
    Stream,
    Count,
    /// The provider answers 429.
    Throttled,
    /// The provider answers 400 `invalid_request_error` with [`provider_error`]'s message.
    Rejected,
    /// Claude Code with `CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1`: its `GET /v1/models` at
    /// start, then the prompt as in `Stream`. One cell per mode (on the Anthropic API): the
    /// listing is the key's, whatever the provider.
    Models,
}

impl Call {
    fn label(self) -> &'static str {
        match self {
            Call::Create => "create",
            Call::Stream => "stream",
            Call::Count => "count_tokens",
            Call::Throttled => "429",
            Call::Rejected => "400",
            Call::Models => "models",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Call::Create => "create",
            Call::Stream => "stream",
            Call::Count => "count",
            Call::Throttled => "throttled",
            Call::Rejected => "rejected",
            Call::Models => "models",
        }
    }

    /// The status the client is answered with.
    fn status(self) -> u16 {
        match self {
            Call::Throttled => 429,
            Call::Rejected => 400,
            _ => 200,
        }
    }
}

/// The `error.message` each mock provider answers an error with (`x-mock-status`): a cell with
/// a provider error checks that this text reaches the client.
fn provider_error(kind: Kind) -> String {
    format!("Conformance: the {} provider refuses this request (messages.0.content)", kind.name())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    ClaudeCode,
    AnthropicSdk,
    Boto3,
}

/// How a client reaches the gateway: a matrix row.
#[derive(Debug, Clone, Copy)]
struct Mode {
    id: &'static str,
    runner: Runner,
    format: Kind,
    client: &'static str,
    how: &'static str,
    /// The anonymous listener (no credential at all); else the keyed one.
    anonymous: bool,
    /// The HTTPS listener, which the tap cannot read.
    tls: bool,
    calls: &'static [Call],
}

const CC: &[Call] = &[Call::Stream];
/// Claude Code on the Anthropic format, with model discovery.
const CC_DISCOVERY: &[Call] = &[Call::Stream, Call::Models];
/// One row of each of Claude Code's formats also gets a provider's 400.
const CC_REJECTED: &[Call] = &[Call::Stream, Call::Rejected];
const MODES: &[Mode] = &[
    Mode {
        id: "cc-api-key",
        runner: Runner::ClaudeCode,
        format: Kind::Anthropic,
        client: "Claude Code `-p`",
        how: "Anthropic, `ANTHROPIC_API_KEY` (`x-api-key`)",
        anonymous: false,
        tls: false,
        calls: &[Call::Stream, Call::Models, Call::Rejected],
    },
    Mode {
        id: "cc-auth-token",
        runner: Runner::ClaudeCode,
        format: Kind::Anthropic,
        client: "Claude Code `-p`",
        how: "Anthropic, `ANTHROPIC_AUTH_TOKEN` (bearer)",
        anonymous: false,
        tls: false,
        calls: CC_DISCOVERY,
    },
    Mode {
        id: "cc-key-helper",
        runner: Runner::ClaudeCode,
        format: Kind::Anthropic,
        client: "Claude Code `-p`",
        how: "Anthropic, `apiKeyHelper` in settings.json",
        anonymous: false,
        tls: false,
        calls: CC_DISCOVERY,
    },
    Mode {
        id: "cc-bedrock-skip",
        runner: Runner::ClaudeCode,
        format: Kind::Bedrock,
        client: "Claude Code `-p`",
        how: "Bedrock, `CLAUDE_CODE_SKIP_BEDROCK_AUTH` (anonymous listener)",
        anonymous: true,
        tls: false,
        calls: CC_REJECTED,
    },
    Mode {
        id: "cc-bedrock-bearer",
        runner: Runner::ClaudeCode,
        format: Kind::Bedrock,
        client: "Claude Code `-p`",
        how: "Bedrock, `AWS_BEARER_TOKEN_BEDROCK` = gateway key",
        anonymous: false,
        tls: false,
        calls: CC,
    },
    Mode {
        id: "cc-vertex-skip",
        runner: Runner::ClaudeCode,
        format: Kind::Vertex,
        client: "Claude Code `-p`",
        how: "Vertex, `CLAUDE_CODE_SKIP_VERTEX_AUTH` (anonymous listener)",
        anonymous: true,
        tls: false,
        calls: CC,
    },
    Mode {
        id: "cc-vertex-header",
        runner: Runner::ClaudeCode,
        format: Kind::Vertex,
        client: "Claude Code `-p`",
        how: "Vertex, `CLAUDE_CODE_SKIP_VERTEX_AUTH`, key in `ANTHROPIC_CUSTOM_HEADERS`",
        anonymous: false,
        tls: false,
        calls: CC_REJECTED,
    },
    Mode {
        id: "py-api-key",
        runner: Runner::AnthropicSdk,
        format: Kind::Anthropic,
        client: "`anthropic` `Anthropic`",
        how: "`api_key`",
        anonymous: false,
        tls: false,
        calls: &[Call::Create, Call::Stream, Call::Count, Call::Throttled],
    },
    Mode {
        id: "py-auth-token",
        runner: Runner::AnthropicSdk,
        format: Kind::Anthropic,
        client: "`anthropic` `Anthropic`",
        how: "`auth_token` (bearer)",
        anonymous: false,
        tls: false,
        calls: &[Call::Create, Call::Stream, Call::Count],
    },
    Mode {
        id: "py-bedrock-sigv4",
        runner: Runner::AnthropicSdk,
        format: Kind::Bedrock,
        client: "`anthropic` `AnthropicBedrock`",
        how: "SigV4 with dummy AWS keys (anonymous listener)",
        anonymous: true,
        tls: false,
        calls: &[Call::Create, Call::Stream, Call::Throttled],
    },
    Mode {
        id: "py-bedrock-key",
        runner: Runner::AnthropicSdk,
        format: Kind::Bedrock,
        client: "`anthropic` `AnthropicBedrock`",
        how: "`api_key` (Bedrock API key) = gateway key",
        anonymous: false,
        tls: false,
        calls: &[Call::Create, Call::Stream],
    },
    Mode {
        id: "py-vertex",
        runner: Runner::AnthropicSdk,
        format: Kind::Vertex,
        client: "`anthropic` `AnthropicVertex`",
        how: "`access_token` (dummy) + key in `x-tollgate-key`",
        anonymous: false,
        tls: false,
        calls: &[Call::Create, Call::Stream, Call::Count, Call::Throttled],
    },
    Mode {
        id: "boto3-sigv4",
        runner: Runner::Boto3,
        format: Kind::Bedrock,
        client: "boto3 `bedrock-runtime`",
        how: "SigV4 with dummy AWS keys (anonymous listener)",
        anonymous: true,
        tls: false,
        calls: &[Call::Create, Call::Stream, Call::Count, Call::Throttled],
    },
    Mode {
        id: "boto3-bearer",
        runner: Runner::Boto3,
        format: Kind::Bedrock,
        client: "boto3 `bedrock-runtime`",
        how: "`AWS_BEARER_TOKEN_BEDROCK` = gateway key (HTTPS listener)",
        anonymous: false,
        tls: true,
        calls: &[Call::Create, Call::Stream, Call::Count, Call::Throttled],
    },
];

#[derive(Debug, Clone)]
struct Cell {
    id: String,
    mode: Mode,
    provider: Kind,
    call: Call,
    model: &'static str,
    prompt: String,
    /// The usage this cell asks the mock for (`x-mock-usage`).
    usage: MockUsage,
}

impl Cell {
    /// Claude Code always streams.
    fn stream(&self) -> bool {
        matches!(self.call, Call::Stream | Call::Rejected | Call::Models)
    }

    fn custom_headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("x-conformance-cell", self.id.clone()),
            ("x-mock-usage", serde_json::to_string(&self.usage).unwrap()),
        ];
        if matches!(self.call, Call::Throttled | Call::Rejected) {
            h.push(("x-mock-status", self.call.status().to_string()));
        }
        h
    }

    fn python_case(&self) -> Value {
        let call = match (self.mode.runner, self.call) {
            (Runner::Boto3, Call::Create) => "invoke",
            (_, Call::Create) => "create",
            (_, Call::Stream) => "stream",
            (_, Call::Count) => "count",
            (_, Call::Throttled) => "throttled",
            (_, Call::Rejected | Call::Models) => panic!("a Claude Code call: {:?}", self.call),
        };
        let client = match self.mode.id {
            "py-api-key" => "api_key",
            "py-auth-token" => "auth_token",
            "py-bedrock-sigv4" => "bedrock_sigv4",
            "py-bedrock-key" => "bedrock_key",
            "py-vertex" => "vertex",
            "boto3-sigv4" => "sigv4",
            "boto3-bearer" => "bearer",
            other => panic!("not a Python mode: {other}"),
        };
        let usage: Value = serde_json::to_value(&self.usage).unwrap();
        json!({"id": self.id, "client": client, "call": call, "model": self.model, "prompt": self.prompt, "usage": usage})
    }
}

fn cells() -> Vec<Cell> {
    let mut out = Vec::new();
    for mode in MODES {
        for &call in mode.calls {
            for provider in KINDS {
                if call == Call::Models && provider != Kind::Anthropic {
                    continue;
                }
                let n = out.len() as u64 + 1;
                let id = format!("{}-{}-{}", mode.id, call.id(), provider.name());
                out.push(Cell {
                    prompt: format!("Conformance cell {id}: reply with one word."),
                    id,
                    mode: *mode,
                    provider,
                    call,
                    model: provider.client_model(mode.format),
                    usage: MockUsage {
                        input_tokens: 1000 + n,
                        output_tokens: 2000 + n,
                        cache_read_input_tokens: 3000 + n,
                        cache_creation_5m_input_tokens: 4000 + n,
                        cache_creation_1h_input_tokens: 5000 + n,
                        ..Default::default()
                    },
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running the clients

struct Endpoints {
    keyed: String,
    anonymous: String,
    tls: String,
    ca_file: PathBuf,
    key: String,
}

/// What a client run gave: for Claude Code its exit, stdout and stderr; for the SDKs the JSON
/// result its script printed.
#[derive(Debug, Default, Clone)]
struct Ran {
    exit: Option<i32>,
    stdout: String,
    stderr: String,
    result: Value,
    /// For model discovery, what Claude Code kept of the listing: its cache
    /// (`~/.claude/cache/gateway-models.json`, `{"baseUrl", "fetchedAt", "models": [{"id", ...}]}`
    /// in 2.1.332), or null.
    discovered: Value,
}

async fn run_claude(clients: &Clients, cell: &Cell, ep: &Endpoints, home: &Path) -> Ran {
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    let mut cmd = tokio::process::Command::new(&clients.claude);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .current_dir(home)
        .args(["-p", &cell.prompt, "--model", cell.model, "--output-format", "json"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut headers = cell.custom_headers();
    if cell.call == Call::Models {
        cmd.env("CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY", "1");
    }
    match cell.mode.id {
        "cc-api-key" => {
            cmd.env("ANTHROPIC_BASE_URL", &ep.keyed).env("ANTHROPIC_API_KEY", &ep.key);
        }
        "cc-auth-token" => {
            cmd.env("ANTHROPIC_BASE_URL", &ep.keyed).env("ANTHROPIC_AUTH_TOKEN", &ep.key);
        }
        "cc-key-helper" => {
            let helper = home.join("key-helper.sh");
            std::fs::write(&helper, format!("#!/bin/sh\necho {}\n", ep.key)).unwrap();
            std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            let settings = json!({"apiKeyHelper": helper.display().to_string()});
            std::fs::write(home.join(".claude/settings.json"), settings.to_string()).unwrap();
            cmd.env("ANTHROPIC_BASE_URL", &ep.keyed);
        }
        "cc-bedrock-skip" => {
            cmd.env("CLAUDE_CODE_USE_BEDROCK", "1")
                .env("ANTHROPIC_BEDROCK_BASE_URL", &ep.anonymous)
                .env("CLAUDE_CODE_SKIP_BEDROCK_AUTH", "1")
                .env("AWS_REGION", "us-east-1");
        }
        "cc-bedrock-bearer" => {
            cmd.env("CLAUDE_CODE_USE_BEDROCK", "1")
                .env("ANTHROPIC_BEDROCK_BASE_URL", &ep.keyed)
                .env("AWS_BEARER_TOKEN_BEDROCK", &ep.key)
                .env("AWS_REGION", "us-east-1");
        }
        "cc-vertex-skip" | "cc-vertex-header" => {
            let base = if cell.mode.anonymous { &ep.anonymous } else { &ep.keyed };
            cmd.env("CLAUDE_CODE_USE_VERTEX", "1")
                .env("ANTHROPIC_VERTEX_BASE_URL", format!("{base}/v1"))
                .env("CLAUDE_CODE_SKIP_VERTEX_AUTH", "1")
                .env("ANTHROPIC_VERTEX_PROJECT_ID", PROJECT)
                .env("CLOUD_ML_REGION", VERTEX_REGION);
            if !cell.mode.anonymous {
                headers.push((KEY_HEADER, ep.key.clone()));
            }
        }
        other => panic!("not a Claude Code mode: {other}"),
    }
    let custom: Vec<String> = headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
    cmd.env("ANTHROPIC_CUSTOM_HEADERS", custom.join("\n"));
    let child = cmd.output();
    match tokio::time::timeout(Duration::from_secs(90), child).await {
        Ok(Ok(out)) => Ran {
            exit: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            result: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            discovered: std::fs::read(home.join(".claude/cache/gateway-models.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null),
        },
        Ok(Err(e)) => Ran { stderr: format!("claude did not start: {e}"), ..Default::default() },
        Err(_) => Ran { stderr: "claude ran for more than 90 s (killed)".into(), ..Default::default() },
    }
}

/// Runs one of the Python scripts on `cases`; returns each case's result by id.
async fn run_python(
    clients: &Clients,
    script: &str,
    cases: &[&Cell],
    ep: &Endpoints,
    home: &Path,
) -> Vec<(String, Value)> {
    if cases.is_empty() {
        return Vec::new();
    }
    let job = json!({
        "keyed": ep.keyed, "anonymous": ep.anonymous, "tls": ep.tls, "ca_file": ep.ca_file, "key": ep.key,
        "cases": cases.iter().map(|c| c.python_case()).collect::<Vec<_>>(),
    });
    let mut child = tokio::process::Command::new(&clients.python)
        .arg(repo().join("tests/conformance").join(script))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        // No AWS or Google configuration of the machine's may take part.
        .env("AWS_CONFIG_FILE", home.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(job.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} ran for more than 120 s"))
        .unwrap();
    let results: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}), exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    results.as_array().unwrap().iter().map(|r| (r["id"].as_str().unwrap().to_string(), r.clone())).collect()
}

// ---------------------------------------------------------------------------------------------
// Checking a cell

struct World<'a> {
    gw: &'a Gateway,
    key: &'a TestKey,
    /// What each provider got (Anthropic, Bedrock, Vertex).
    received: [Vec<Received>; 3],
    /// What each tap (keyed, anonymous) saw, once every client is done.
    seen: [Vec<Exchange>; 2],
    keyed_url: String,
    claude_version: &'a str,
}

fn betas_of(headers: impl Iterator<Item = String>, body: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let header: BTreeSet<String> = headers
        .flat_map(|h| h.split(',').map(|b| b.trim().to_string()).collect::<Vec<_>>())
        .filter(|b| !b.is_empty())
        .collect();
    let body: BTreeSet<String> = body["anthropic_beta"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    (header, body)
}

/// A Bedrock CountTokens body carries the InvokeModel body base64-encoded.
fn provider_body(kind: Kind, call: Call, body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if kind == Kind::Bedrock && call == Call::Count {
        use base64::Engine as _;
        let inner = v["input"]["invokeModel"]["body"].as_str().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD.decode(inner).unwrap_or_default();
        return serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    }
    v
}

fn expected_path(cell: &Cell) -> String {
    let (_, id) = cell.provider.family();
    match (cell.provider, cell.call) {
        (Kind::Anthropic, Call::Count) => "/v1/messages/count_tokens".into(),
        (Kind::Anthropic, _) => "/v1/messages".into(),
        (Kind::Bedrock, Call::Count) => format!("/model/{id}/count-tokens"),
        (Kind::Bedrock, _) => {
            format!("/model/{id}/{}", if cell.stream() { "invoke-with-response-stream" } else { "invoke" })
        }
        (Kind::Vertex, Call::Count) => {
            format!(
                "/v1/projects/{PROJECT}/locations/{VERTEX_REGION}/publishers/anthropic/models/count-tokens:rawPredict"
            )
        }
        (Kind::Vertex, _) => format!(
            "/v1/projects/{PROJECT}/locations/{VERTEX_REGION}/publishers/anthropic/models/{id}:{}",
            if cell.stream() { "streamRawPredict" } else { "rawPredict" }
        ),
    }
}

/// A cell's request as the client sent it (read by the tap, or by the script behind TLS).
fn sent_json(x: &Exchange) -> Value {
    let v: Value = serde_json::from_slice(&x.body).unwrap_or(Value::Null);
    if v["input"]["invokeModel"]["body"].is_string() {
        // A Bedrock CountTokens request: what the client asked for is the wrapped body.
        return provider_body(Kind::Bedrock, Call::Count, &x.body);
    }
    v
}

fn check(w: &World<'_>, cell: &Cell, ran: &Ran) -> Vec<String> {
    let mut fails = Vec::new();
    let mut fail = |m: String| fails.push(m);
    let u = &cell.usage;
    let cache_creation = u.cache_creation_5m_input_tokens + u.cache_creation_1h_input_tokens;
    let usage_line = json!({
        "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens, "cache_creation_input_tokens": cache_creation,
    });
    let provider_message = provider_error(cell.provider);

    // 1. What the client got.
    let r = &ran.result;
    match (cell.mode.runner, cell.call) {
        (Runner::ClaudeCode, Call::Rejected) => {
            if ran.exit == Some(0) && r["is_error"] != true {
                fail(format!(
                    "a provider's 400: claude exited 0 without is_error\nstdout: {}\nstderr: {}",
                    ran.stdout, ran.stderr
                ));
            }
            let text = r["result"].as_str().unwrap_or_default();
            if !text.contains(&provider_message) {
                fail(format!(
                    "claude printed the result {text:?}, without the provider's message {provider_message:?}\nstdout: {}\nstderr: {}",
                    ran.stdout, ran.stderr
                ));
            }
            if !r["api_error_status"].is_null() && r["api_error_status"] != 400 {
                fail(format!("claude's api_error_status is {}, not 400", r["api_error_status"]));
            }
        }
        (Runner::ClaudeCode, _) => {
            if ran.exit != Some(0) || r["is_error"] != false {
                fail(format!("claude exited {:?}\nstdout: {}\nstderr: {}", ran.exit, ran.stdout, ran.stderr));
            }
            let text = r["result"].as_str().unwrap_or_default();
            if !text.contains("chunk 0 of the mock's answer.") {
                fail(format!("claude printed {text:?}, not the mock's text"));
            }
            for (field, want) in usage_line.as_object().unwrap() {
                if r["usage"][field] != *want {
                    fail(format!("claude's usage.{field} is {}, the mock sent {want}", r["usage"][field]));
                }
            }
        }
        (_, Call::Create | Call::Stream) => {
            if let Some(e) = r.get("error") {
                fail(format!("the client raised {e}"));
            } else {
                let want = if cell.stream() { "chunk 0 of the mock's answer." } else { "Hello from the mock." };
                if !r["text"].as_str().unwrap_or_default().contains(want) {
                    fail(format!("the client got the text {}, not the mock's", r["text"]));
                }
                if r["usage"] != usage_line {
                    fail(format!("the client got usage {}, the mock sent {usage_line}", r["usage"]));
                }
                if cell.mode.runner == Runner::Boto3 && cell.stream() {
                    let events = r["events"].as_array().cloned().unwrap_or_default();
                    if events.first() != Some(&json!("message_start")) || events.last() != Some(&json!("message_stop"))
                    {
                        fail(format!("boto3's stream had the events {events:?}"));
                    }
                }
            }
        }
        (_, Call::Count) => {
            if r["input_tokens"] != json!(u.input_tokens) {
                fail(format!("count_tokens gave {r}, the mock counted {}", u.input_tokens));
            }
        }
        (Runner::AnthropicSdk, Call::Throttled) => {
            let e = &r["error"];
            if e["type"] != "RateLimitError" || e["status"] != 429 {
                fail(format!("a 429 from the provider should raise anthropic.RateLimitError; the client got {r}"));
            }
        }
        (Runner::Boto3, Call::Throttled) => {
            let e = &r["error"];
            let message = e["message"].as_str().unwrap_or_default();
            if e["type"] != "ClientError" || e["code"] != "ThrottlingException" || message.is_empty() {
                fail(format!("a 429 from the provider should raise ClientError ThrottlingException with a message; the client got {r}"));
            }
        }
        (_, Call::Rejected | Call::Models) => fail(format!("{:?} is a Claude Code cell", cell.call)),
    }

    // 2. What the client sent, as the tap saw it (or the script, behind TLS), and what it was
    // answered. One request, except that Claude Code answers a 400 by sending the request again
    // without one feature at a time (a beta, deferred tools): every one is a request of this cell.
    let marker = cell.prompt.as_bytes();
    let has_marker = |b: &[u8]| b.windows(marker.len()).any(|w| w == marker);
    let sent: Vec<Exchange> = if cell.mode.tls {
        let sent = &r["sent"];
        let headers = sent["headers"]
            .as_object()
            .map(|h| {
                h.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or_default().to_string())).collect()
            })
            .unwrap_or_default();
        let url = sent["url"].as_str().unwrap_or_default();
        let mut response_headers = Vec::new();
        if let Some(rid) = r["request_id"].as_str() {
            response_headers.push(("x-tollgate-request-id".to_string(), rid.to_string()));
        }
        vec![Exchange {
            method: "POST".into(),
            target: url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap_or_default(),
            headers,
            body: sent["body"].as_str().unwrap_or_default().as_bytes().to_vec(),
            sent_at: None,
            status: None,
            response_headers,
            response_body: Vec::new(),
        }]
    } else {
        let seen = &w.seen[usize::from(cell.mode.anonymous)];
        let mine: Vec<Exchange> = seen
            .iter()
            .filter(|x| {
                // A Bedrock CountTokens body carries the prompt base64-encoded.
                header(&x.headers, "x-conformance-cell") == Some(cell.id.as_str())
                    && (has_marker(&x.body)
                        || has_marker(provider_body(Kind::Bedrock, Call::Count, &x.body).to_string().as_bytes()))
            })
            .cloned()
            .collect();
        let many = cell.call == Call::Rejected;
        if (many && mine.is_empty()) || (!many && mine.len() != 1) {
            fail(format!(
                "the tap saw {} requests of this cell's, not {}: {:?}",
                mine.len(),
                if many { "1 or more" } else { "1" },
                mine.iter().map(|x| &x.target).collect::<Vec<_>>()
            ));
        }
        let want = cell.call.status();
        for x in &mine {
            if x.status != Some(want) {
                fail(format!("the client was answered {:?}, not {want}", x.status));
            }
            if cell.call == Call::Rejected {
                if let Some(m) = client_error_mismatch(cell.mode.format, x, &provider_message) {
                    fail(m);
                }
            }
        }
        mine
    };

    // 3. What the provider got: as many requests as the client sent, in the same order.
    let mut got = Vec::new();
    for (kind, received) in KINDS.iter().zip(&w.received) {
        for req in received {
            let cell_header = req.headers.get("x-conformance-cell").and_then(|v| v.to_str().ok());
            if cell_header == Some(cell.id.as_str())
                && (has_marker(&req.body)
                    || has_marker(provider_body(*kind, Call::Count, &req.body).to_string().as_bytes()))
            {
                got.push((*kind, req));
            }
        }
    }
    if got.len() != sent.len().max(1) || got.iter().any(|(k, _)| *k != cell.provider) {
        fail(format!(
            "the providers got {} requests of this cell's (on {:?}), not {} on {}",
            got.len(),
            got.iter().map(|(k, _)| k.name()).collect::<Vec<_>>(),
            sent.len().max(1),
            cell.provider.name()
        ));
    }
    for (x, (kind, req)) in sent.iter().zip(&got).filter(|(_, (k, _))| *k == cell.provider) {
        for m in check_forwarded(w, cell, x, *kind, req) {
            fail(m);
        }
    }

    // 4. The usage record of each request.
    if sent.is_empty() {
        fail("the client's answer had no x-tollgate-request-id".into());
    }
    for x in &sent {
        let Some(rid) = header(&x.response_headers, "x-tollgate-request-id") else {
            fail("the client's answer had no x-tollgate-request-id".into());
            continue;
        };
        for m in check_record(w, cell, &w.gw.record(rid)) {
            fail(m);
        }
    }

    // 5. Model discovery.
    if cell.call == Call::Models {
        for m in check_discovery(w, cell, ran, sent.first()) {
            fail(m);
        }
    }
    fails
}

/// What is wrong with a provider's 400 as the client got it: its format's error shape, with the
/// provider's message (Anthropic `{"type":"error","error":{"type","message"}}`; Bedrock
/// `{"message"}` and `x-amzn-errortype`; Vertex Google's `{"error":{"code","message"}}`).
fn client_error_mismatch(format: Kind, x: &Exchange, message: &str) -> Option<String> {
    let body: Value = serde_json::from_slice(&x.response_body).unwrap_or(Value::Null);
    let ok = match format {
        Kind::Anthropic => {
            body["type"] == "error"
                && body["error"]["type"] == "invalid_request_error"
                && body["error"]["message"] == message
        }
        Kind::Bedrock => {
            body["message"] == message
                && header(&x.response_headers, "x-amzn-errortype").is_some_and(|t| t.starts_with("ValidationException"))
        }
        Kind::Vertex => body["error"]["code"] == 400 && body["error"]["message"] == message,
    };
    (!ok).then(|| {
        format!(
            "a provider's 400 reached the {} client as {} (x-amzn-errortype {:?}), not in its error shape with {message:?}",
            format.name(),
            String::from_utf8_lossy(&x.response_body),
            header(&x.response_headers, "x-amzn-errortype")
        )
    })
}

/// One request the provider got against the one the client sent: the path, the query, every
/// beta, the API version, and the credentials.
fn check_forwarded(w: &World<'_>, cell: &Cell, x: &Exchange, kind: Kind, req: &Received) -> Vec<String> {
    let mut fails = Vec::new();
    let mut fail = |m: String| fails.push(m);
    let sent_json = sent_json(x);
    let body = provider_body(kind, cell.call, &req.body);
    let (path, query) = req.uri.split_once('?').unwrap_or((req.uri.as_str(), ""));
    if path != expected_path(cell) {
        fail(format!("the provider got {path}, not {}", expected_path(cell)));
    }
    // An Anthropic client's query (`?beta=true`) reaches the Anthropic API as it came.
    let sent_query = x.target.split_once('?').map_or("", |(_, q)| q);
    if kind == Kind::Anthropic && cell.mode.format == Kind::Anthropic && query != sent_query {
        fail(format!("the client sent the query {sent_query:?}, the provider got {query:?}"));
    }

    // Every beta the client sent, where this provider takes them (less its policy's drops).
    let (client_h, client_b) =
        betas_of(x.headers.iter().filter(|(n, _)| n == "anthropic-beta").map(|(_, v)| v.clone()), &sent_json);
    let dropped = |b: &String| kind != Kind::Anthropic && DROPPED_OFF_ANTHROPIC.iter().any(|p| b.starts_with(p));
    let want: BTreeSet<String> = client_h.union(&client_b).filter(|b| !dropped(b)).cloned().collect();
    let (got_h, got_b) = betas_of(
        req.headers.get_all("anthropic-beta").iter().map(|v| v.to_str().unwrap_or_default().to_string()),
        &body,
    );
    let got_where = if kind == Kind::Bedrock { &got_b } else { &got_h };
    if *got_where != want {
        fail(format!(
            "betas: the client sent {want:?} (header {client_h:?}, body {client_b:?}); the {} provider got {got_where:?} (header {got_h:?}, body {got_b:?})",
            kind.name()
        ));
    }
    if kind == Kind::Bedrock && !got_h.is_empty() {
        fail(format!("the Bedrock provider got an anthropic-beta header too: {got_h:?}"));
    }
    if cell.mode.runner != Runner::ClaudeCode && !SDK_BETAS.iter().all(|b| want.contains(*b)) {
        fail(format!("the client sent the betas {want:?}, not the script's {SDK_BETAS:?}"));
    }

    // The API version.
    let versions: Vec<&str> =
        req.headers.get_all("anthropic-version").iter().map(|v| v.to_str().unwrap_or_default()).collect();
    let client_version_header = header(&x.headers, "anthropic-version");
    let client_body_version = sent_json["anthropic_version"].as_str();
    match kind {
        Kind::Anthropic => {
            let want = client_version_header.unwrap_or("2023-06-01");
            if versions != [want] {
                fail(format!("the Anthropic provider got anthropic-version {versions:?}, not [{want:?}]"));
            }
        }
        Kind::Bedrock | Kind::Vertex => {
            if !versions.is_empty() {
                fail(format!("the {} provider got an anthropic-version header {versions:?}", kind.name()));
            }
            let own = (cell.mode.format == kind).then_some(client_body_version).flatten();
            let default = if kind == Kind::Bedrock { "bedrock-2023-05-31" } else { "vertex-2023-10-16" };
            let got = body["anthropic_version"].as_str();
            let ok = match (kind, own) {
                (Kind::Vertex, Some(own)) => got == Some(own),
                (_, own) => got == Some(default) || (own.is_some() && got == own),
            };
            if !ok {
                fail(format!(
                    "the {} provider got anthropic_version {got:?} (the client sent {client_body_version:?})",
                    kind.name()
                ));
            }
        }
    }

    // The gateway's credential, and nothing the client authenticated with.
    let secret_ok = match kind {
        Kind::Anthropic => req.headers.get("x-api-key").is_some_and(|v| v == PROVIDER_SECRET),
        _ => req.headers.get("authorization").is_some_and(|v| v == format!("Bearer {PROVIDER_SECRET}").as_str()),
    };
    if !secret_ok {
        fail(format!("the {} provider did not get the gateway's provider credential", kind.name()));
    }
    for (name, value) in req.headers.iter() {
        let value = String::from_utf8_lossy(value.as_bytes());
        for secret in [w.key.key.as_str(), GOOGLE_TOKEN, AWS_ACCESS_KEY] {
            if value.contains(secret) {
                fail(format!("a client credential reached the provider in {name}: {value}"));
            }
        }
        if name.as_str() == KEY_HEADER || name.as_str().starts_with("x-amz") {
            fail(format!("the provider got {name}"));
        }
    }
    if String::from_utf8_lossy(&req.body).contains(&w.key.key) {
        fail("the gateway key reached the provider in the body".into());
    }
    fails
}

/// The usage record of one of the cell's requests.
fn check_record(w: &World<'_>, cell: &Cell, rec: &Value) -> Vec<String> {
    let mut fails = Vec::new();
    let mut fail = |m: String| fails.push(m);
    let u = &cell.usage;
    let failed = cell.call.status() != 200;
    let expect = [
        ("format", json!(cell.mode.format.name())),
        ("provider", json!(cell.provider.name())),
        ("provider_model", json!(cell.provider.family().1)),
        ("requested_model", json!(cell.model)),
        ("key_id", json!("k")),
        ("auth", json!(if cell.mode.anonymous { "listener" } else { "key" })),
        ("status", json!(cell.call.status())),
        ("outcome", json!(if failed { "upstream_error" } else { "complete" })),
        ("stream", json!(cell.stream())),
    ];
    for (field, want) in expect {
        if rec[field] != want {
            fail(format!("record.{field} is {}, not {want}", rec[field]));
        }
    }
    let billed = matches!(cell.call, Call::Create | Call::Stream | Call::Models);
    let n = |v: u64| if billed { v } else { 0 };
    let want_usage = [
        ("input_tokens", n(u.input_tokens)),
        ("output_tokens", n(u.output_tokens)),
        ("cache_read_input_tokens", n(u.cache_read_input_tokens)),
        ("cache_creation_5m_input_tokens", n(u.cache_creation_5m_input_tokens)),
        ("cache_creation_1h_input_tokens", n(u.cache_creation_1h_input_tokens)),
    ];
    for (field, want) in want_usage {
        if rec["usage"][field] != json!(want) {
            fail(format!("record.usage.{field} is {}, the mock reported {want}", rec["usage"][field]));
        }
    }
    if cell.mode.runner == Runner::ClaudeCode {
        let ua = rec["user_agent"].as_str().unwrap_or_default();
        if !ua.starts_with(&format!("claude-cli/{}", w.claude_version)) {
            fail(format!("record.user_agent is {ua:?}"));
        }
    }
    fails
}

/// Claude Code's model discovery: one `GET /v1/models` with the credentials of its inference
/// request (`prompt`, the cell's request to the Messages API), answered 200 with the key's models
/// in the Models API's shape; and Claude Code kept the ids it takes (`claude` or `anthropic` in
/// the id, in any case, in 2.1.332).
fn check_discovery(w: &World<'_>, cell: &Cell, ran: &Ran, prompt: Option<&Exchange>) -> Vec<String> {
    let mut fails = Vec::new();
    let mut fail = |m: String| fails.push(m);
    let lists: Vec<&Exchange> = w.seen[0]
        .iter()
        .filter(|x| header(&x.headers, "x-conformance-cell") == Some(cell.id.as_str()) && x.method == "GET")
        .collect();
    let [list] = lists.as_slice() else {
        fail(format!(
            "with CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY, claude sent {} GET requests, not one GET /v1/models: {:?}",
            lists.len(),
            lists.iter().map(|x| &x.target).collect::<Vec<_>>()
        ));
        return fails;
    };
    if list.target.split('?').next() != Some("/v1/models") {
        fail(format!("claude listed models at {}, not /v1/models", list.target));
    }
    // Its inference credentials: the gateway key, in the same headers as its Messages request.
    let credentials =
        |h: &Headers| [header(h, "x-api-key").map(str::to_string), header(h, "authorization").map(str::to_string)];
    let listed_with = credentials(&list.headers);
    let key = w.key.key.as_str();
    let is_key = |v: &Option<String>| v.as_deref().is_some_and(|v| v == key || v == format!("Bearer {key}"));
    if !listed_with.iter().any(is_key) || listed_with.iter().any(|v| v.is_some() && !is_key(v)) {
        fail(format!("claude listed models with the credentials {listed_with:?}, not the gateway key"));
    }
    if let Some(p) = prompt {
        if credentials(&p.headers) != listed_with {
            fail(format!(
                "claude listed models with {listed_with:?} but sent its prompt with {:?}",
                credentials(&p.headers)
            ));
        }
    }
    if list.status != Some(200) {
        fail(format!(
            "GET /v1/models was answered {:?}: {}",
            list.status,
            String::from_utf8_lossy(&list.response_body)
        ));
        return fails;
    }

    // The Models API's shape, with the key's models: ids this gateway routes, a claude one among them.
    let body: Value = serde_json::from_slice(&list.response_body).unwrap_or(Value::Null);
    let data = body["data"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = data.iter().filter_map(|m| m["id"].as_str()).collect();
    if data.is_empty() || ids.len() != data.len() {
        fail(format!("GET /v1/models answered {body}, not a list of models"));
    }
    for m in &data {
        let rfc3339 = m["created_at"].as_str().is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok());
        if m["type"] != "model" || !m["display_name"].is_string() || !rfc3339 {
            fail(format!("a model in GET /v1/models is {m}, not a Models API model"));
        }
    }
    if body["has_more"] != false
        || body["first_id"].as_str() != ids.first().copied()
        || body["last_id"].as_str() != ids.last().copied()
    {
        fail(format!(
            "GET /v1/models has has_more {}, first_id {}, last_id {} for the ids {ids:?}",
            body["has_more"], body["first_id"], body["last_id"]
        ));
    }
    if !ids.iter().any(|id| id.starts_with("claude")) {
        fail(format!("GET /v1/models offered no id starting with claude: {ids:?}"));
    }
    for id in &ids {
        if !KINDS.iter().any(|k| id.contains(k.family().0)) {
            fail(format!("GET /v1/models offered {id}, which no route of the key's serves"));
        }
    }
    if !ids.contains(&cell.model) {
        fail(format!("GET /v1/models did not offer {}, the model the cell uses", cell.model));
    }

    // What Claude Code kept.
    let d = &ran.discovered;
    let kept: Vec<&str> =
        d["models"].as_array().map(|m| m.iter().filter_map(|m| m["id"].as_str()).collect()).unwrap_or_default();
    let takes = |id: &&str| {
        let id = id.to_ascii_lowercase();
        id.contains("claude") || id.contains("anthropic")
    };
    let want: Vec<&str> = ids.iter().copied().filter(takes).collect();
    if d["baseUrl"] != w.keyed_url.as_str() || kept != want {
        fail(format!(
            "claude kept {d} of the listing (~/.claude/cache/gateway-models.json), not the ids {want:?} at {}",
            w.keyed_url
        ));
    }
    fails
}

// ---------------------------------------------------------------------------------------------
// The gateway

fn config(mocks: [&MockProvider; 3], key: &TestKey, anonymous_port: u16, tls_port: u16, tls: &str) -> String {
    let mut text = String::new();
    for (kind, mock) in KINDS.iter().zip(mocks) {
        let place = match kind {
            Kind::Anthropic => String::new(),
            Kind::Bedrock => "region = \"us-east-1\"\n".into(),
            Kind::Vertex => format!("project = \"{PROJECT}\"\nregion = \"{VERTEX_REGION}\"\n"),
        };
        let (family, id) = kind.family();
        text += &format!(
            "[[provider]]\nname = \"{k}\"\nkind = \"{k}\"\n{place}base_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
             health = {{ probe = \"none\" }}\n\n\
             [[model]]\nname = \"{family}\"\npatterns = [\"*{family}*\"]\nmax_attempts = 1\n\
             deployments = [{{ provider = \"{k}\", model = \"{id}\" }}]\n\n",
            k = kind.name(),
            url = mock.url(),
        );
    }
    text += &format!(
        "[[key]]\nid = \"k\"\nhash = \"{}\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:{anonymous_port}\"\nanonymous_key = \"k\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:{tls_port}\"\n{tls}\n",
        key.hash
    );
    text
}

/// A certificate for `localhost` and the CA that signed it, each with its own name (OpenSSL, under
/// Python's `ssl`, takes a certificate whose issuer is its own subject for a self-signed one).
fn tls_pems() -> (String, String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "Tollgate conformance CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (cert.pem(), key.serialize_pem(), ca.pem())
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The matrix

fn matrix(clients: &Clients, cells: &[Cell], results: &[(bool, Option<&str>)]) -> String {
    let mut out = format!(
        "Claude Code {}, `anthropic` {} (Python), boto3 {}; {}.\n\n\
         | client | how it reaches the gateway | → Anthropic API | → Bedrock | → Vertex AI |\n|---|---|---|---|---|\n",
        clients.claude_version,
        clients.anthropic_version,
        clients.boto3_version,
        chrono::Utc::now().format("%Y-%m-%d"),
    );
    let mut gaps: Vec<&str> = Vec::new();
    // "✓ a, b; ✗ c [1]" for the cells `pick` takes, each under its call's label.
    let mut marks = |pick: &dyn Fn(&Cell) -> bool, label: &dyn Fn(&Cell) -> &'static str| {
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for (cell, (passed, gap)) in cells.iter().zip(results) {
            if !pick(cell) {
                continue;
            }
            let label = label(cell);
            if *passed {
                ok.push(label.to_string());
            } else {
                let note = match gap {
                    Some(why) => {
                        if !gaps.contains(why) {
                            gaps.push(why);
                        }
                        format!("{label} [{}]", gaps.iter().position(|g| g == why).unwrap() + 1)
                    }
                    None => label.to_string(),
                };
                bad.push(note);
            }
        }
        let mut parts = Vec::new();
        if !ok.is_empty() {
            parts.push(format!("✓ {}", ok.join(", ")).trim_end().to_string());
        }
        if !bad.is_empty() {
            parts.push(format!("✗ {}", bad.join(", ")).trim_end().to_string());
        }
        parts.join("; ")
    };
    for mode in MODES {
        let mut row = format!("| {} | {} |", mode.client, mode.how);
        // A Claude Code row names its calls only if it has more than its prompt.
        let named = mode.runner != Runner::ClaudeCode || mode.calls.contains(&Call::Rejected);
        for provider in KINDS {
            let pick = |c: &Cell| c.mode.id == mode.id && c.provider == provider && c.call != Call::Models;
            let label = |c: &Cell| if named { c.call.label() } else { "" };
            row += &format!(" {} |", marks(&pick, &label));
        }
        out += &row;
        out.push('\n');
    }
    out += "\n| client | how it reaches the gateway | model discovery: `GET /v1/models` at start |\n|---|---|---|\n";
    for mode in MODES.iter().filter(|m| m.calls.contains(&Call::Models)) {
        let pick = |c: &Cell| c.mode.id == mode.id && c.call == Call::Models;
        out += &format!(
            "| {}, `CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY=1` | {} | {} |\n",
            mode.client,
            mode.how,
            marks(&pick, &|_| "")
        );
    }
    for (i, why) in gaps.iter().enumerate() {
        out += &format!("\n[{}] {why}.\n", i + 1);
    }
    out
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_the_gateway() {
    let started = Instant::now();
    let clients = find_clients();
    eprintln!(
        "conformance: Claude Code {} ({}), anthropic {} and boto3 {} ({})",
        clients.claude_version,
        clients.claude.display(),
        clients.anthropic_version,
        clients.boto3_version,
        clients.python.display()
    );

    // Each provider's errors carry a message of its own, which a cell of a provider's 400 looks
    // for in what the client shows.
    let mock =
        |kind| MockProvider::start(Behavior { error_message: Some(provider_error(kind)), ..Behavior::default() });
    let mocks =
        [mock(Kind::Anthropic).await.unwrap(), mock(Kind::Bedrock).await.unwrap(), mock(Kind::Vertex).await.unwrap()];
    let key = new_key();
    let work = tempfile::tempdir().unwrap();
    let (cert, cert_key, ca_pem) = tls_pems();
    let (cert_path, key_path, ca_path) =
        (work.path().join("cert.pem"), work.path().join("key.pem"), work.path().join("ca.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, cert_key).unwrap();
    std::fs::write(&ca_path, ca_pem).unwrap();
    let anonymous_port = free_port();
    let tls_port = loop {
        let p = free_port();
        if p != anonymous_port {
            break p;
        }
    };
    let tls = format!("tls = {{ cert = \"{}\", key = \"{}\" }}", cert_path.display(), key_path.display());
    let gw = start_gateway_full(
        &format!("key_header = \"{KEY_HEADER}\""),
        "",
        &config([&mocks[0], &mocks[1], &mocks[2]], &key, anonymous_port, tls_port, &tls),
    );
    // (The HTTPS listener starts with the others; a bare TCP probe of it would log a handshake error.)
    wait_listening(anonymous_port);
    let keyed_tap = Tap::start(gw.port).await;
    let anonymous_tap = Tap::start(anonymous_port).await;
    let ep = Endpoints {
        keyed: keyed_tap.url(),
        anonymous: anonymous_tap.url(),
        tls: format!("https://localhost:{tls_port}"),
        ca_file: ca_path,
        key: key.key.clone(),
    };

    let cells = cells();
    let mut ran: Vec<Ran> = vec![Ran::default(); cells.len()];

    // Everything but the 429s at once (a 429 cools its provider's endpoint down for a while),
    // Claude Code four at a time.
    let python = |runner: Runner, throttled: bool| -> Vec<&Cell> {
        cells.iter().filter(|c| c.mode.runner == runner && (c.call == Call::Throttled) == throttled).collect()
    };
    let (sdk, boto) = (python(Runner::AnthropicSdk, false), python(Runner::Boto3, false));
    let limit = Arc::new(tokio::sync::Semaphore::new(4));
    let claude_runs = cells.iter().enumerate().filter(|(_, c)| c.mode.runner == Runner::ClaudeCode).map(|(i, c)| {
        let (limit, ep, clients, home) = (limit.clone(), &ep, &clients, work.path().join(&c.id));
        async move {
            let _slot = limit.acquire().await.unwrap();
            (i, run_claude(clients, c, ep, &home).await)
        }
    });
    let t0 = Instant::now();
    let (claude_results, sdk_results, boto_results) = tokio::join!(
        futures_util::future::join_all(claude_runs),
        run_python(&clients, "anthropic_sdk.py", &sdk, &ep, work.path()),
        run_python(&clients, "boto3_bedrock.py", &boto, &ep, work.path()),
    );
    eprintln!("conformance: clients ran in {:.1} s", t0.elapsed().as_secs_f64());
    let (sdk, boto) = (python(Runner::AnthropicSdk, true), python(Runner::Boto3, true));
    let (sdk_throttled, boto_throttled) = tokio::join!(
        run_python(&clients, "anthropic_sdk.py", &sdk, &ep, work.path()),
        run_python(&clients, "boto3_bedrock.py", &boto, &ep, work.path()),
    );
    for (i, r) in claude_results {
        ran[i] = r;
    }
    for (id, result) in sdk_results.into_iter().chain(boto_results).chain(sdk_throttled).chain(boto_throttled) {
        let i = cells.iter().position(|c| c.id == id).unwrap();
        ran[i] = Ran { result, ..Default::default() };
    }

    let world = World {
        gw: &gw,
        key: &key,
        received: [mocks[0].received(), mocks[1].received(), mocks[2].received()],
        seen: [keyed_tap.exchanges(), anonymous_tap.exchanges()],
        keyed_url: keyed_tap.url(),
        claude_version: &clients.claude_version,
    };
    let mut report = Vec::new();
    let mut results = Vec::new();
    for (cell, ran) in cells.iter().zip(&ran) {
        let fails = check(&world, cell, ran);
        let gap = known_gap(&cell.id);
        match (fails.is_empty(), gap) {
            (true, None) => {}
            (false, None) => report.push(format!("✗ {}:\n    {}", cell.id, fails.join("\n    "))),
            (false, Some(g)) if ran.result["error"]["status"] == g.status => {}
            (false, Some(g)) => report.push(format!(
                "✗ {}: a known gap ({}), but it now fails otherwise than with {}:\n    {}",
                cell.id,
                g.why,
                g.status,
                fails.join("\n    ")
            )),
            (true, Some(g)) => report.push(format!(
                "✗ {}: passes, but KNOWN_GAPS says it fails ({}): take it out of KNOWN_GAPS and update the README's matrix",
                cell.id, g.why
            )),
        }
        results.push((fails.is_empty(), gap.map(|g| g.why)));
    }
    let table = matrix(&clients, &cells, &results);
    let _ = std::fs::create_dir_all(&clients.dir);
    let _ = std::fs::write(clients.dir.join("last-run.md"), &table);
    eprintln!("\n{table}");
    eprintln!(
        "conformance: {} cells ({} passing, {} known gaps) in {:.1} s",
        cells.len(),
        results.iter().filter(|r| r.0).count(),
        results.iter().filter(|r| !r.0 && r.1.is_some()).count(),
        started.elapsed().as_secs_f64()
    );
    assert!(report.is_empty(), "{} cells failed:\n{}", report.len(), report.join("\n"));
}
