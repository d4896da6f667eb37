//! Corporate egress: provider traffic through an HTTP proxy that tunnels with `CONNECT`, with
//! `Proxy-Authorization` from a secret reference (re-read on reload) or from `HTTPS_PROXY`,
//! `no_proxy` and `proxy = "direct"` bypasses, a private CA for a TLS-inspecting setup, and the
//! errors a client and an operator get when any of it is wrong.
//!
//! The proxy is a real one, written here: it reads the `CONNECT` head, checks the credentials,
//! dials the target itself (it resolves the provider's name; the gateway resolves only the
//! proxy's) and copies bytes both ways. It records every `CONNECT` it saw and counts tunnels.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// The corporate proxy.
// ---------------------------------------------------------------------------------------------

/// One `CONNECT` as the proxy saw it, and the status it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Connect {
    target: String,
    host: Option<String>,
    auth: Option<String>,
    status: u16,
}

#[derive(Default)]
struct ProxyState {
    /// The `Proxy-Authorization` value wanted; `None`: anyone may tunnel.
    expected: Mutex<Option<String>>,
    /// Answer every `CONNECT` with this status line instead (a policy refusal).
    refuse: Mutex<Option<&'static str>>,
    connects: Mutex<Vec<Connect>>,
    /// Tunnels opened (answered 200) so far.
    tunnels: AtomicUsize,
    /// Tunnels open now.
    open: AtomicUsize,
}

/// A real HTTP `CONNECT` proxy on a loopback port; it stops with the test's runtime.
struct CorpProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
}

fn basic(userinfo: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(userinfo))
}

impl CorpProxy {
    /// Starts a proxy that wants `userinfo` (`user:password`) when given.
    async fn start(userinfo: Option<&str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        *state.expected.lock().unwrap() = userinfo.map(basic);
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                tokio::spawn(serve(client, s.clone()));
            }
        });
        CorpProxy { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn expect(&self, userinfo: Option<&str>) {
        *self.state.expected.lock().unwrap() = userinfo.map(basic);
    }

    fn refuse(&self, status_line: &'static str) {
        *self.state.refuse.lock().unwrap() = Some(status_line);
    }

    fn connects(&self) -> Vec<Connect> {
        self.state.connects.lock().unwrap().clone()
    }

    fn tunnels(&self) -> usize {
        self.state.tunnels.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }
}

/// Where the proxy dials a target host: its own resolver, which knows the corporate names
/// (`*.corp.invalid`) the gateway's host cannot resolve.
fn proxy_resolves(host: &str) -> String {
    if host == "localhost" || host.ends_with(".corp.invalid") {
        "127.0.0.1".into()
    } else {
        host.into()
    }
}

async fn serve(mut client: TcpStream, state: Arc<ProxyState>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 16 << 10 {
            return;
        }
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let early = head.split_off(end);
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (request_line.next().unwrap_or_default(), request_line.next().unwrap_or_default());
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let auth = headers.get("proxy-authorization").cloned();
    let expected = state.expected.lock().unwrap().clone();
    let refuse = *state.refuse.lock().unwrap();
    let mut upstream = None;
    let status = if method != "CONNECT" {
        405
    } else if let Some(line) = refuse {
        line[..3].parse().unwrap()
    } else if expected.is_some() && auth != expected {
        407
    } else {
        let dial = target.rsplit_once(':').map(|(h, p)| format!("{}:{p}", proxy_resolves(h)));
        match dial {
            Some(d) => match TcpStream::connect(&d).await {
                Ok(s) => {
                    upstream = Some(s);
                    200
                }
                Err(_) => 502,
            },
            None => 400,
        }
    };
    state.connects.lock().unwrap().push(Connect {
        target: target.to_string(),
        host: headers.get("host").cloned(),
        auth,
        status,
    });
    let answer = match (status, refuse) {
        (200, _) => "HTTP/1.1 200 Connection established\r\n\r\n".to_string(),
        (407, _) => "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string(),
        (_, Some(line)) => format!("HTTP/1.1 {line}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        (s, None) => format!("HTTP/1.1 {s} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
    if client.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let Some(mut upstream) = upstream else { return };
    state.tunnels.fetch_add(1, Ordering::SeqCst);
    state.open.fetch_add(1, Ordering::SeqCst);
    if early.is_empty() || upstream.write_all(&early).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------------------------
// Configs and the gateway.
// ---------------------------------------------------------------------------------------------

const ADMIN_ENV: &str = "TG_TEST_ADMIN_TOKEN";
const ADMIN_TOKEN: &str = "egress-test-admin-token";
const MODEL: &str = "claude-sonnet-4-5";
const PROVIDER_MODEL: &str = "claude-sonnet-4-5-20250929";
/// The mock's default usage (25 in, 15 out) at $3 / $15 per million tokens, in nano-dollars.
const COST_NANOS: u64 = 25 * 3_000 + 15 * 15_000;

/// Starts the gateway (log to a file, admin token set) with the proxy variables of the test's
/// own environment blanked (an empty one counts as unset), then `envs`.
fn start(envs: &[(&str, &str)], config: &str) -> Gateway {
    let mut all =
        vec![("HTTPS_PROXY", ""), ("https_proxy", ""), ("NO_PROXY", ""), ("no_proxy", ""), (ADMIN_ENV, ADMIN_TOKEN)];
    all.extend_from_slice(envs);
    start_gateway_logged(&format!("token = \"env:{ADMIN_ENV}\""), &all, config)
}

/// An Anthropic provider `name` at `base_url`, without health probes (they would open tunnels
/// of their own), with `extra` lines.
fn provider(name: &str, base_url: &str, extra: &str) -> String {
    format!(
        "[[provider]]\nname = \"{name}\"\nkind = \"anthropic\"\nbase_url = \"{base_url}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\" }}\n{extra}\n\n"
    )
}

/// Model `name` on `provider`, priced.
fn model(name: &str, provider: &str) -> String {
    format!(
        "[[model]]\nname = \"{name}\"\ndeployments = [{{ provider = \"{provider}\", model = \"{PROVIDER_MODEL}\" }}]\n\n"
    )
}

fn price_and_key(key: &TestKey) -> String {
    format!(
        "[[price]]\nmatch = \"{PROVIDER_MODEL}\"\ninput = 3.0\noutput = 15.0\ncache_read = 0.3\ncache_write_5m = 3.75\ncache_write_1h = 6.0\n\n\
         [[key]]\nid = \"alice\"\nhash = \"{}\"\nteam = \"platform\"\n",
        key.hash
    )
}

/// `[egress]` lines, `provider` sections and model `claude-sonnet-4-5` on provider `mock`.
fn config(egress: &str, providers: &str, key: &TestKey) -> String {
    format!("[egress]\n{egress}\n\n{providers}{}{}", model(MODEL, "mock"), price_and_key(key))
}

/// A private CA, a TLS mock whose certificate it signed for `names`, and the CA's PEM file.
struct TlsMock {
    mock: MockProvider,
    ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsMock {
    async fn start(names: &[&str]) -> Self {
        let ca = Ca::new();
        let (cert, key) = ca.leaf(names);
        let mock = MockProvider::start_tls(Behavior::default(), &cert, &key).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("corp-ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        TlsMock { mock, ca_file, _dir: dir }
    }

    fn port(&self) -> u16 {
        self.mock.addr.port()
    }

    /// `https://localhost:PORT`.
    fn url(&self) -> String {
        format!("https://localhost:{}", self.port())
    }
}

/// Sends a Messages request; its status, request id and body.
async fn send(gw: &Gateway, key: &TestKey, stream: bool) -> (u16, String, bytes::Bytes) {
    let resp = messages_request(gw, key).body(messages_body(MODEL, stream, 10)).send().await.unwrap();
    let status = resp.status().as_u16();
    let id = resp.headers().get("x-tollgate-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, id, resp.bytes().await.unwrap())
}

/// Sends a non-streamed request that must succeed.
#[track_caller]
fn assert_ok(got: &(u16, String, bytes::Bytes), gw: &Gateway) {
    assert_eq!(got.0, 200, "{}\n{}", String::from_utf8_lossy(&got.2), gw.log());
}

/// The exact Anthropic error body of a gateway failure.
fn error_body(message: &str) -> Value {
    json!({"type": "error", "error": {"type": "api_error", "message": message}})
}

async fn admin_get(gw: &Gateway, path: &str) -> Value {
    let resp = client().get(gw.admin_url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Polls the ledger until it holds `n` requests.
async fn wait_ledger(gw: &Gateway, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = admin_get(gw, "/admin/usage?group_by=key").await;
        if v["rows"][0]["requests"] == n {
            return v;
        }
        assert!(Instant::now() < deadline, "the ledger never held {n} requests: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn connect_ok(target: &str, auth: Option<&str>) -> Connect {
    Connect { target: target.into(), host: Some(target.into()), auth: auth.map(basic), status: 200 }
}

// ---------------------------------------------------------------------------------------------
// 1. Through an authenticating proxy, TLS to the provider trusted through a private CA.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_through_an_authenticating_proxy_to_a_privately_signed_provider() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(Some("svc-tollgate:s3cr3t")).await;
    let key = new_key();
    let egress = format!(
        "proxy = \"{}\"\nproxy_auth = \"env:TG_EGRESS_AUTH\"\nca_file = \"{}\"",
        proxy.url(),
        tls.ca_file.display()
    );
    let gw =
        start(&[("TG_EGRESS_AUTH", "svc-tollgate:s3cr3t")], &config(&egress, &provider("mock", &tls.url(), ""), &key));

    // Non-streamed.
    let got = send(&gw, &key, false).await;
    assert_ok(&got, &gw);
    let v: Value = serde_json::from_slice(&got.2).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["model"], PROVIDER_MODEL);
    assert_eq!(v["usage"]["input_tokens"], 25);
    assert_eq!(v["usage"]["output_tokens"], 15);
    let rec = gw.record(&got.1);
    assert_eq!(rec["provider"], "mock");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["upstream_status"], 200);
    assert_eq!(rec["outcome"], "complete");
    assert_eq!(rec["stream"], false);
    assert_eq!(rec["usage"]["input_tokens"], 25);
    assert_eq!(rec["usage"]["output_tokens"], 15);
    assert_eq!(rec["cost_nanos"], COST_NANOS);

    // Streamed: the SSE stream arrives byte for byte.
    let got = send(&gw, &key, true).await;
    assert_ok(&got, &gw);
    let expected: Vec<u8> = tollgate::mock::sse_events(PROVIDER_MODEL, &MockUsage::default(), 3).concat();
    assert_eq!(got.2, expected);
    let rec = gw.record(&got.1);
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["outcome"], "complete");
    assert_eq!(rec["usage"]["input_tokens"], 25);
    assert_eq!(rec["usage"]["output_tokens"], 15);
    assert_eq!(rec["cost_nanos"], COST_NANOS);

    // The proxy was asked for the provider by name, with the configured credentials; both
    // requests went through the one tunnel.
    let target = format!("localhost:{}", tls.port());
    assert_eq!(proxy.connects(), vec![connect_ok(&target, Some("svc-tollgate:s3cr3t"))]);
    assert_eq!(proxy.tunnels(), 1);

    // The provider got both requests as if directly: its Host, its credential, the model id.
    let received = tls.mock.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert_eq!(r.uri, "/v1/messages");
        assert_eq!(r.headers["host"], target);
        assert_eq!(r.headers["x-api-key"], PROVIDER_SECRET);
        assert!(r.headers.get("proxy-authorization").is_none(), "proxy credentials leaked to the provider");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["model"], PROVIDER_MODEL);
    }

    // The ledger has both, priced.
    let v = wait_ledger(&gw, 2).await;
    let row = &v["rows"][0];
    assert_eq!(row["group"], json!({"key": "alice"}));
    assert_eq!((row["input_tokens"].as_u64(), row["output_tokens"].as_u64()), (Some(50), Some(30)));
    assert_eq!(row["cost_nanos"], 2 * COST_NANOS);
    assert_eq!(v["total_cost_nanos"], 2 * COST_NANOS);
}

// ---------------------------------------------------------------------------------------------
// 2. Pooling through the tunnel.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_pooled_tunnel() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(None).await;
    let key = new_key();
    let egress = format!("proxy = \"{}\"\nca_file = \"{}\"", proxy.url(), tls.ca_file.display());
    let gw = start(&[], &config(&egress, &provider("mock", &tls.url(), ""), &key));

    const N: usize = 10;
    for i in 0..N {
        let got = send(&gw, &key, i % 2 == 1).await;
        assert_ok(&got, &gw);
    }
    assert_eq!(tls.mock.received().len(), N);
    // Measured: 10 sequential requests (5 non-streamed, 5 streamed) -> 1 CONNECT, 1 tunnel,
    // still open (pooled) afterwards.
    assert_eq!(proxy.connects().len(), 1, "{:?}", proxy.connects());
    assert_eq!(proxy.tunnels(), 1);
    assert_eq!(proxy.open(), 1, "the tunnel stays up in the pool");

    // Requests at once (each answered after 300 ms, so they overlap) need tunnels of their
    // own: the pooled one and 3 new. All 4 go back to the pool and serve what follows.
    let slow = Behavior { header_delay: Duration::from_millis(300), ..Behavior::default() };
    tls.mock.set_behavior(slow);
    let sends = (0..4).map(|_| send(&gw, &key, false));
    for got in futures_util::future::join_all(sends).await {
        assert_ok(&got, &gw);
    }
    tls.mock.set_behavior(Behavior::default());
    eprintln!(
        "egress pooling: {N} sequential requests -> 1 tunnel; 4 overlapping -> {} tunnels in all, {} open",
        proxy.tunnels(),
        proxy.open()
    );
    assert_eq!((proxy.tunnels(), proxy.open()), (4, 4));
    for _ in 0..N {
        assert_ok(&send(&gw, &key, false).await, &gw);
    }
    assert_eq!((proxy.tunnels(), proxy.open()), (4, 4), "sequential requests after the burst open no new tunnel");
    assert!(proxy.connects().iter().all(|c| c.status == 200));
}

// ---------------------------------------------------------------------------------------------
// 3. What a client gets when the proxy says no.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_proxy_credentials_are_a_502_naming_the_407() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(Some("svc-tollgate:right")).await;
    let key = new_key();
    let egress = format!(
        "proxy = \"{}\"\nproxy_auth = \"env:TG_EGRESS_AUTH\"\nca_file = \"{}\"",
        proxy.url(),
        tls.ca_file.display()
    );
    let gw =
        start(&[("TG_EGRESS_AUTH", "svc-tollgate:wrong")], &config(&egress, &provider("mock", &tls.url(), ""), &key));

    let expected = error_body(&format!(
        "provider mock: cannot connect: ConnectProxyFailure: egress proxy 127.0.0.1:{} wants credentials (407): \
         set or check proxy_auth",
        proxy.port()
    ));
    for stream in [false, true] {
        let (status, id, body) = send(&gw, &key, stream).await;
        assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), expected);
        let rec = gw.record(&id);
        assert_eq!(rec["status"], 502);
        assert_eq!(rec["usage"]["input_tokens"], 0);
    }
    let target = format!("localhost:{}", tls.port());
    let refused =
        Connect { target: target.clone(), host: Some(target), auth: Some(basic("svc-tollgate:wrong")), status: 407 };
    assert_eq!(proxy.connects(), vec![refused.clone(), refused], "one CONNECT per request, no retry");
    assert_eq!(proxy.tunnels(), 0);
    assert!(tls.mock.received().is_empty(), "the request reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_credentials_at_all_are_the_same_407() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(Some("svc-tollgate:right")).await;
    let key = new_key();
    let egress = format!("proxy = \"{}\"\nca_file = \"{}\"", proxy.url(), tls.ca_file.display());
    let gw = start(&[], &config(&egress, &provider("mock", &tls.url(), ""), &key));
    let (status, _, body) = send(&gw, &key, false).await;
    assert_eq!(status, 502);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        error_body(&format!(
            "provider mock: cannot connect: ConnectProxyFailure: egress proxy 127.0.0.1:{} wants credentials (407): \
             set or check proxy_auth",
            proxy.port()
        ))
    );
    assert_eq!(proxy.connects()[0].auth, None, "no Proxy-Authorization without proxy_auth");
    assert!(tls.mock.received().is_empty());
}

/// A "proxy" that reads what it is sent, answers `answer` (if any) and closes.
async fn canned_proxy(answer: Option<&'static [u8]>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                if let Some(answer) = answer {
                    let _ = s.write_all(answer).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tunnel_a_dead_proxy_and_a_silent_proxy_are_clear_errors() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(None).await;
    proxy.refuse("403 Forbidden");
    // A port nothing listens on; a proxy that accepts and never answers; one that answers
    // something that is not HTTP; one that hangs up without answering.
    let dead = free_port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let garbage = canned_proxy(Some(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")).await;
    let hangs_up = canned_proxy(None).await;
    let key = new_key();
    let ca = format!("ca_file = \"{}\"", tls.ca_file.display());
    let via = |name: &str, port: u16, extra: &str| {
        provider(name, &tls.url(), &format!("proxy = \"http://127.0.0.1:{port}\"\n{extra}"))
    };
    let providers = [
        provider("mock", &tls.url(), ""),
        via("dead", dead, ""),
        via("silent", silent_port, "connect_timeout = \"300ms\""),
        via("garbage", garbage, ""),
        via("hangs-up", hangs_up, ""),
    ]
    .concat();
    let models: String =
        ["dead", "silent", "garbage", "hangs-up"].iter().map(|p| model(&format!("m-{p}"), p)).collect();
    let gw =
        start(&[], &format!("{}{models}", config(&format!("proxy = \"{}\"\n{ca}", proxy.url()), &providers, &key)));
    let ask = |m: String| {
        let (gw, key) = (&gw, &key);
        async move {
            let started = Instant::now();
            let resp = messages_request(gw, key).body(messages_body(&m, false, 10)).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap(), started.elapsed())
        }
    };
    let target = format!("localhost:{}", tls.port());

    // The proxy's policy refuses the target: its status is in the message.
    let (status, _, body) = send(&gw, &key, false).await;
    assert_eq!(status, 502);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        error_body(&format!(
            "provider mock: cannot connect: ConnectProxyFailure: egress proxy 127.0.0.1:{} refused CONNECT {target} \
             with 403",
            proxy.port()
        ))
    );

    for (name, port, reason) in [
        ("dead", dead, ": Connection refused (os error 111)".to_string()),
        ("garbage", garbage, " did not answer CONNECT in HTTP".to_string()),
        ("hangs-up", hangs_up, " closed the tunnel: unexpected end of file".to_string()),
    ] {
        let (status, v, _) = ask(format!("m-{name}")).await;
        assert_eq!(
            (status, v),
            (
                502,
                error_body(&format!(
                    "provider {name}: cannot connect: ConnectProxyFailure: egress proxy 127.0.0.1:{port}{reason}"
                ))
            )
        );
    }

    // A proxy that never answers CONNECT: a connect timeout (2 x connect_timeout for TCP and
    // the CONNECT exchange), not a hang.
    let (status, v, took) = ask("m-silent".into()).await;
    assert_eq!((status, v), (504, error_body("provider silent: connect timed out")));
    assert!(took >= Duration::from_millis(550) && took < Duration::from_secs(3), "{took:?}");
    assert!(tls.mock.received().is_empty());
    drop(silent);
}

// ---------------------------------------------------------------------------------------------
// 4. Trust: the CA that signed the provider's certificate, and no other.
// ---------------------------------------------------------------------------------------------

/// The message of a 502 for a certificate rustls refused: Pingora's error type, then rustls's
/// verdict (in whatever words Pingora wraps it).
#[track_caller]
fn assert_certificate_refused(status: u16, body: &[u8], provider: &str, verdict: &str) {
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(body));
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
    let message = v["error"]["message"].as_str().unwrap();
    let prefix = format!("provider {provider}: cannot connect: TLSHandshakeFailure: ");
    assert!(message.starts_with(&prefix), "{message:?} should start with {prefix:?}");
    assert!(message.contains(verdict), "{message:?} should name the certificate problem {verdict:?}");
}

/// A CA certificate (PEM) with its own name: a CA named like the one that signed (all of
/// [`Ca`]'s are) would be taken for the issuer and refused for a bad signature instead.
fn other_ca(name: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_a_502_naming_the_certificate_problem() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong_ca = dir.path().join("other-ca.pem");
    std::fs::write(&wrong_ca, other_ca("Other Corp Root CA")).unwrap();
    let key = new_key();
    // Provider `mock` trusts `[egress].ca_file` (the wrong CA); provider `own` has the right
    // one as its own `ca_file`, which wins; provider `plain` goes direct with the wrong CA.
    let providers = [
        provider("mock", &tls.url(), ""),
        provider("own", &tls.url(), &format!("ca_file = \"{}\"", tls.ca_file.display())),
        provider("plain", &tls.url(), "proxy = \"direct\""),
    ]
    .concat();
    let egress = format!("proxy = \"{}\"\nca_file = \"{}\"", proxy.url(), wrong_ca.display());
    let models = [model("m-own", "own"), model("m-plain", "plain")].concat();
    let gw = start(&[], &format!("{}{models}", config(&egress, &providers, &key)));

    let ask = |m: &'static str| {
        let (gw, key) = (&gw, &key);
        async move {
            let resp = messages_request(gw, key).body(messages_body(m, false, 10)).send().await.unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap())
        }
    };
    for stream in [false, true] {
        let (status, _, body) = send(&gw, &key, stream).await;
        assert_certificate_refused(status, &body, "mock", "invalid peer certificate: UnknownIssuer");
    }
    assert!(tls.mock.received().is_empty(), "a request went to an untrusted provider");
    // The tunnel itself was open: the handshake inside it failed.
    assert_eq!(proxy.tunnels(), 2);

    // The same verdict on a direct connection.
    let (status, body) = ask("m-plain").await;
    assert_certificate_refused(status, &body, "plain", "invalid peer certificate: UnknownIssuer");
    assert!(tls.mock.received().is_empty());
    assert_eq!(proxy.tunnels(), 2);

    let (status, body) = ask("m-own").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(tls.mock.received().len(), 1);
    assert_eq!(proxy.tunnels(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_through_the_tunnel() {
    // The proxy forwards to the right port, but the certificate there is not for the name asked.
    let tls = TlsMock::start(&["api.other.example"]).await;
    let proxy = CorpProxy::start(None).await;
    let key = new_key();
    let egress = format!("proxy = \"{}\"\nca_file = \"{}\"", proxy.url(), tls.ca_file.display());
    let gw = start(&[], &config(&egress, &provider("mock", &tls.url(), ""), &key));
    let (status, _, body) = send(&gw, &key, false).await;
    assert_certificate_refused(
        status,
        &body,
        "mock",
        "invalid peer certificate: certificate not valid for name \"localhost\"; certificate is only valid for \
         DnsName(\"api.other.example\")",
    );
    assert_eq!(proxy.tunnels(), 1);
    assert!(tls.mock.received().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 5. What bypasses the proxy, and a provider's own proxy.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_and_direct_bypass_the_proxy_and_a_provider_may_have_its_own() {
    let tls = TlsMock::start(&["localhost"]).await;
    let plain = MockProvider::start(Behavior::default()).await.unwrap();
    let plain_port = plain.addr.port();
    let proxy = CorpProxy::start(Some("svc:global")).await;
    let own_proxy = CorpProxy::start(Some("svc:own")).await;
    let open_proxy = CorpProxy::start(None).await;
    let key = new_key();
    let ca = tls.ca_file.display();
    let providers = [
        // `localhost` is not in no_proxy: tunnelled (TLS inside).
        provider("mock", &tls.url(), ""),
        // An IP in no_proxy's 127.0.0.0/8: direct.
        provider("by-ip", &plain.url(), ""),
        // `localhost` again, but the provider says direct.
        provider("direct", &tls.url(), "proxy = \"direct\""),
        // Plain HTTP through the provider's own proxy, with its own credentials.
        provider(
            "own",
            &format!("http://localhost:{plain_port}"),
            &format!("proxy = \"{}\"\nproxy_auth = \"env:TG_OWN_AUTH\"", own_proxy.url()),
        ),
        // Its own proxy without proxy_auth: the corporate proxy's credentials are not for it.
        provider("own-noauth", &tls.url(), &format!("proxy = \"{}\"", open_proxy.url())),
    ]
    .concat();
    let egress = format!(
        "proxy = \"{}\"\nproxy_auth = \"env:TG_EGRESS_AUTH\"\nno_proxy = [\"10.0.0.0/8\", \"127.0.0.0/8\", \".corp.example\"]\n\
         ca_file = \"{ca}\"",
        proxy.url()
    );
    let models = [
        model("m-ip", "by-ip"),
        model("m-direct", "direct"),
        model("m-own", "own"),
        model("m-own-noauth", "own-noauth"),
    ]
    .concat();
    let gw = start(
        &[("TG_EGRESS_AUTH", "svc:global"), ("TG_OWN_AUTH", "svc:own")],
        &format!("{}{models}", config(&egress, &providers, &key)),
    );
    let ask = |m: &'static str| {
        let gw = &gw;
        let key = &key;
        async move {
            let resp = messages_request(gw, key).body(messages_body(m, false, 10)).send().await.unwrap();
            let status = resp.status().as_u16();
            assert_eq!(status, 200, "{m}: {}\n{}", resp.text().await.unwrap(), gw.log());
        }
    };

    ask(MODEL).await;
    let tunnelled = format!("localhost:{}", tls.port());
    assert_eq!(proxy.connects(), vec![connect_ok(&tunnelled, Some("svc:global"))]);

    ask("m-ip").await;
    ask("m-direct").await;
    assert_eq!(proxy.connects().len(), 1, "no CONNECT for no_proxy or direct: {:?}", proxy.connects());
    assert_eq!(tls.mock.received().len(), 2);
    assert_eq!(plain.received().len(), 1);
    assert_eq!(plain.received()[0].headers["host"], plain.addr.to_string());

    ask("m-own").await;
    let own_target = format!("localhost:{plain_port}");
    assert_eq!(own_proxy.connects(), vec![connect_ok(&own_target, Some("svc:own"))]);
    assert_eq!(proxy.connects().len(), 1, "the provider's own proxy replaces the global one");
    let r = &plain.received()[1];
    assert_eq!(r.headers["host"], own_target);
    assert_eq!(r.uri, "/v1/messages", "origin-form inside the tunnel, not an absolute URI");
    assert!(r.headers.get("proxy-authorization").is_none());

    ask("m-own-noauth").await;
    assert_eq!(open_proxy.connects(), vec![connect_ok(&tunnelled, None)]);
    assert_eq!(proxy.connects().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_forms_that_name_the_provider_send_it_direct() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(None).await;
    let key = new_key();
    for no_proxy in ["\"localhost\"", "\".localhost\"", "\"LOCALHOST:443\"", "\"*\""] {
        let egress = format!(
            "proxy = \"{}\"\nno_proxy = [\"10.1.2.3\", {no_proxy}]\nca_file = \"{}\"",
            proxy.url(),
            tls.ca_file.display()
        );
        let gw = start(&[], &config(&egress, &provider("mock", &tls.url(), ""), &key));
        assert_ok(&send(&gw, &key, false).await, &gw);
    }
    assert_eq!(tls.mock.received().len(), 4);
    assert!(proxy.connects().is_empty(), "{:?}", proxy.connects());

    // A name that only contains the host's name is no match: tunnelled.
    let egress = format!(
        "proxy = \"{}\"\nno_proxy = [\"calhost\", \"host\"]\nca_file = \"{}\"",
        proxy.url(),
        tls.ca_file.display()
    );
    let gw = start(&[], &config(&egress, &provider("mock", &tls.url(), ""), &key));
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_resolves_the_provider_name_the_gateway_only_the_proxy_name() {
    // `api.corp.invalid` resolves nowhere but at the proxy; the proxy is named `localhost`.
    let tls = TlsMock::start(&["api.corp.invalid"]).await;
    let proxy = CorpProxy::start(None).await;
    let key = new_key();
    let egress = format!("proxy = \"http://localhost:{}\"\nca_file = \"{}\"", proxy.port(), tls.ca_file.display());
    let url = format!("https://api.corp.invalid:{}/", tls.port());
    let gw = start(&[], &config(&egress, &provider("mock", &url, ""), &key));
    assert_ok(&send(&gw, &key, true).await, &gw);
    let target = format!("api.corp.invalid:{}", tls.port());
    assert_eq!(proxy.connects(), vec![connect_ok(&target, None)]);
    assert_eq!(tls.mock.received()[0].headers["host"], target);
    // /readyz: the endpoint counts as resolved (the proxy's address).
    let ready = client().get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// 6. HTTPS_PROXY and NO_PROXY from the environment.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_and_no_proxy_from_the_environment_are_honoured() {
    // A proxy from the environment takes https endpoints off the loopback only (as Go's and
    // curl's clients do): the provider is named where only the proxy resolves it.
    let tls = TlsMock::start(&["api.corp.invalid", "localhost"]).await;
    let remote = format!("https://api.corp.invalid:{}", tls.port());
    let proxy = CorpProxy::start(Some("svc@corp:p:ss")).await;
    let key = new_key();
    let egress = format!("ca_file = \"{}\"", tls.ca_file.display());
    let cfg = config(&egress, &provider("mock", &remote, ""), &key);
    // Percent-encoded user info, decoded before it is sent.
    let env_url = format!("http://svc%40corp:p%3Ass@127.0.0.1:{}", proxy.port());
    let target = format!("api.corp.invalid:{}", tls.port());

    let gw = start(&[("HTTPS_PROXY", env_url.as_str())], &cfg);
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects(), vec![connect_ok(&target, Some("svc@corp:p:ss"))]);
    drop(gw);

    // The lower-case spelling, too.
    let gw = start(&[("https_proxy", env_url.as_str())], &cfg);
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects().len(), 2);
    drop(gw);

    // proxy_auth in the config wins over the URL's user info.
    proxy.expect(Some("svc:from-config"));
    let egress_auth = format!("{egress}\nproxy_auth = \"env:TG_EGRESS_AUTH\"");
    let gw = start(
        &[("HTTPS_PROXY", env_url.as_str()), ("TG_EGRESS_AUTH", "svc:from-config")],
        &config(&egress_auth, &provider("mock", &remote, ""), &key),
    );
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects()[2], connect_ok(&target, Some("svc:from-config")));
    drop(gw);
    proxy.expect(Some("svc@corp:p:ss"));

    // NO_PROXY (and no_proxy) naming the provider: direct (and so unreachable by that name:
    // the answer is a 502 without a CONNECT).
    for (name, value) in
        [("NO_PROXY", "example.com,corp.invalid"), ("no_proxy", " .example.com , 127.0.0.1, .corp.invalid ")]
    {
        let gw = start(&[("HTTPS_PROXY", env_url.as_str()), (name, value)], &cfg);
        let (status, _, body) = send(&gw, &key, false).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 503, "{v}");
        assert!(message.starts_with("provider mock: no endpoint resolved: cannot resolve api.corp.invalid"), "{v}");
    }
    assert_eq!(proxy.connects().len(), 3, "NO_PROXY was not honoured: {:?}", proxy.connects());

    // A loopback endpoint, and a plain-http one, never go through a proxy from the environment.
    let local = config(&egress, &provider("mock", &tls.url(), ""), &key);
    let gw = start(&[("HTTPS_PROXY", env_url.as_str())], &local);
    assert_ok(&send(&gw, &key, false).await, &gw);
    drop(gw);
    let plain = MockProvider::start(Behavior::default()).await.unwrap();
    let gw = start(&[("HTTPS_PROXY", env_url.as_str())], &config("", &provider("mock", &plain.url(), ""), &key));
    assert_ok(&send(&gw, &key, false).await, &gw);
    drop(gw);
    assert_eq!(proxy.connects().len(), 3, "loopback or http went through the env proxy: {:?}", proxy.connects());

    // NO_PROXY that does not name it: through the proxy.
    let gw = start(&[("HTTPS_PROXY", env_url.as_str()), ("NO_PROXY", "example.com,10.0.0.0/8")], &cfg);
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects().len(), 4);

    // `[egress].no_proxy` replaces NO_PROXY.
    let egress_np = format!("{egress}\nno_proxy = [\"example.com\"]");
    let gw = start(
        &[("HTTPS_PROXY", env_url.as_str()), ("NO_PROXY", "corp.invalid")],
        &config(&egress_np, &provider("mock", &remote, ""), &key),
    );
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects().len(), 5);

    // `[egress].proxy` wins over HTTPS_PROXY (which points nowhere here).
    let other = CorpProxy::start(None).await;
    let egress_proxy = format!("{egress}\nproxy = \"{}\"", other.url());
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let gw = start(&[("HTTPS_PROXY", nowhere.as_str())], &config(&egress_proxy, &provider("mock", &remote, ""), &key));
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(other.connects(), vec![connect_ok(&target, None)]);
    assert_eq!(proxy.connects().len(), 5);
    // Through a proxy 6 times, directly to the loopback name once.
    assert_eq!(tls.mock.received().len(), 7);
}

// ---------------------------------------------------------------------------------------------
// 7. Reload re-reads proxy_auth.
// ---------------------------------------------------------------------------------------------

/// Waits until the gateway logged "config reloaded" `n` times.
async fn wait_reloads(gw: &Gateway, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.log().matches("config reloaded").count() < n {
        assert!(Instant::now() < deadline, "no reload logged\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_proxy_credentials_are_used_by_new_tunnels_after_sighup() {
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(Some("svc:first")).await;
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("proxy-auth");
    std::fs::write(&secret, "svc:first\n").unwrap();
    let egress = format!(
        "proxy = \"{}\"\nproxy_auth = \"file:{}\"\nca_file = \"{}\"",
        proxy.url(),
        secret.display(),
        tls.ca_file.display()
    );
    // Idle tunnels leave the pool quickly, so each step below opens a fresh one.
    let gw = start(
        &[("TOLLGATE_LOG", "info")],
        &config(&egress, &provider("mock", &tls.url(), "pool_idle_timeout = \"200ms\""), &key),
    );
    let target = format!("localhost:{}", tls.port());
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects(), vec![connect_ok(&target, Some("svc:first"))]);

    // Rotated on disk, and at the proxy.
    std::fs::write(&secret, "svc:second\n").unwrap();
    proxy.expect(Some("svc:second"));
    gw.signal("HUP");
    wait_reloads(&gw, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(proxy.open(), 0, "the idle tunnel left the pool");
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects()[1..], [connect_ok(&target, Some("svc:second"))]);

    // The secret cannot be read any more: the reload keeps the running credentials.
    std::fs::remove_file(&secret).unwrap();
    gw.signal("HUP");
    wait_reloads(&gw, 2).await;
    assert!(gw.log().contains("cannot read secret file"), "{}", gw.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.connects()[2..], [connect_ok(&target, Some("svc:second"))]);
    assert_eq!(proxy.tunnels(), 3);
    assert_eq!(tls.mock.received().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_are_re_read_even_when_the_provider_credential_cannot_be() {
    // Two secrets of one provider, rotated at different times: the API key's file is being
    // replaced (missing for a moment) when the proxy's is rotated and SIGHUP comes.
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(Some("svc:first")).await;
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let (api_key, proxy_auth) = (dir.path().join("api-key"), dir.path().join("proxy-auth"));
    std::fs::write(&api_key, "sk-ant-from-file").unwrap();
    std::fs::write(&proxy_auth, "svc:first").unwrap();
    let egress = format!(
        "proxy = \"{}\"\nproxy_auth = \"file:{}\"\nca_file = \"{}\"",
        proxy.url(),
        proxy_auth.display(),
        tls.ca_file.display()
    );
    let section = provider("mock", &tls.url(), "pool_idle_timeout = \"200ms\"")
        .replace("credential = \"env:TG_TEST_PROVIDER_KEY\"", &format!("credential = \"file:{}\"", api_key.display()));
    let gw = start(&[("TOLLGATE_LOG", "info")], &config(&egress, &section, &key));
    assert_ok(&send(&gw, &key, false).await, &gw);

    std::fs::remove_file(&api_key).unwrap();
    std::fs::write(&proxy_auth, "svc:second").unwrap();
    proxy.expect(Some("svc:second"));
    gw.signal("HUP");
    wait_reloads(&gw, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = send(&gw, &key, false).await;
    let target = format!("localhost:{}", tls.port());
    assert_eq!(
        proxy.connects()[1..],
        [connect_ok(&target, Some("svc:second"))],
        "the rotated proxy_auth was not read again: {}",
        String::from_utf8_lossy(&got.2)
    );
    assert_ok(&got, &gw);
    assert_eq!(tls.mock.received()[1].headers["x-api-key"], "sk-ant-from-file", "the running API key stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_tunnel_outlives_a_credential_rotation() {
    // The proxy checks credentials once per tunnel: requests on a tunnel opened with the old
    // ones keep flowing after the rotation, until the tunnel closes.
    let tls = TlsMock::start(&["localhost"]).await;
    let proxy = CorpProxy::start(Some("svc:first")).await;
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("proxy-auth");
    std::fs::write(&secret, "svc:first").unwrap();
    let egress = format!(
        "proxy = \"{}\"\nproxy_auth = \"file:{}\"\nca_file = \"{}\"",
        proxy.url(),
        secret.display(),
        tls.ca_file.display()
    );
    let gw = start(&[("TOLLGATE_LOG", "info")], &config(&egress, &provider("mock", &tls.url(), ""), &key));
    assert_ok(&send(&gw, &key, false).await, &gw);
    std::fs::write(&secret, "svc:second").unwrap();
    proxy.expect(Some("svc:second"));
    gw.signal("HUP");
    wait_reloads(&gw, 1).await;
    assert_ok(&send(&gw, &key, false).await, &gw);
    assert_eq!(proxy.tunnels(), 1, "the pooled tunnel was used");
    // A second tunnel (two requests at once, answered after 300 ms so they overlap) carries
    // the new credentials.
    tls.mock.set_behavior(Behavior { header_delay: Duration::from_millis(300), ..Behavior::default() });
    let (a, b) = tokio::join!(send(&gw, &key, true), send(&gw, &key, true));
    assert_ok(&a, &gw);
    assert_ok(&b, &gw);
    assert_eq!(proxy.tunnels(), 2);
    assert_eq!(proxy.connects()[1..], [connect_ok(&format!("localhost:{}", tls.port()), Some("svc:second"))]);
}

// ---------------------------------------------------------------------------------------------
// 8. Config errors.
// ---------------------------------------------------------------------------------------------

/// `tollgate check` on a small config with `egress` lines and `provider_extra` lines in its
/// provider, with the test's proxy variables removed and `envs` set.
fn check(egress: &str, provider_extra: &str, envs: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:{}\"\n\n[egress]\n{egress}\n\n\
         [[provider]]\nname = \"corp\"\nkind = \"anthropic\"\nbase_url = \"https://api.anthropic.com\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\n{provider_extra}\n\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"corp\", model = \"{PROVIDER_MODEL}\" }}]\n",
        free_port()
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .arg(&path)
        .env("TG_TEST_PROVIDER_KEY", PROVIDER_SECRET)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn config_check_refuses_bad_proxy_settings_clearly() {
    // Good ones pass.
    for (egress, extra, envs) in [
        ("proxy = \"http://proxy.corp.example:3128\"", "", &[][..]),
        ("proxy = \"http://10.0.0.1\"\nproxy_auth = \"env:TG_AUTH\"", "", &[("TG_AUTH", "svc:pw")][..]),
        ("proxy = \"http://[::1]:8080/\"\nno_proxy = [\"*\"]", "proxy = \"direct\"", &[][..]),
        ("", "proxy = \"http://proxy.corp.example:3128\"", &[][..]),
        ("", "", &[("HTTPS_PROXY", "http://u%40corp:p@proxy.corp.example:3128")][..]),
    ] {
        let (ok, out) = check(egress, extra, envs);
        assert!(ok, "{egress:?} {extra:?} {envs:?}: {out}");
    }

    let http_only = "the proxy must be an http:// URL (Tollgate speaks plain HTTP to it and tunnels TLS with CONNECT)";
    let no_creds = "the proxy URL holds credentials: give them as proxy_auth (a secret reference)";
    for (egress, extra, envs, message) in [
        ("proxy = \"https://proxy.corp.example:3128\"", "", &[][..], format!("egress.proxy: {http_only}")),
        ("proxy = \"proxy.corp.example:3128\"", "", &[][..], format!("egress.proxy: {http_only}")),
        ("proxy = \"http://svc:hunter2@proxy.corp.example:3128\"", "", &[][..], format!("egress.proxy: {no_creds}")),
        (
            "proxy = \"http://proxy.corp.example:99999\"",
            "",
            &[][..],
            "proxy port \"99999\" is not a port number".into(),
        ),
        ("proxy = \"http://proxy.corp.example:3128/path\"", "", &[][..], "the proxy URL takes no path".into()),
        ("proxy = \"http://:3128\"", "", &[][..], "the proxy URL has no host".into()),
        ("", "proxy = \"drect\"", &[][..], format!("provider \"corp\": proxy: {http_only}")),
        ("", "proxy = \"https://proxy.corp.example\"", &[][..], format!("provider \"corp\": proxy: {http_only}")),
        ("", "proxy = \"http://svc:hunter2@proxy:3128\"", &[][..], format!("provider \"corp\": proxy: {no_creds}")),
        ("proxies = \"http://proxy:3128\"", "", &[][..], "unknown field `proxies`".into()),
        ("", "", &[("HTTPS_PROXY", "https://proxy.corp.example:3128")][..], format!("HTTPS_PROXY: {http_only}")),
        (
            "proxy = \"http://proxy:3128\"\nproxy_auth = \"env:TG_AUTH\"",
            "",
            &[][..],
            "proxy_auth: environment variable TG_AUTH is not set".into(),
        ),
        (
            "proxy = \"http://proxy:3128\"\nproxy_auth = \"env:TG_AUTH\"",
            "",
            &[("TG_AUTH", "only-a-token")][..],
            "proxy_auth must hold user:password".into(),
        ),
    ] {
        let (ok, out) = check(egress, extra, envs);
        assert!(!ok, "{egress:?} {extra:?} {envs:?} was accepted: {out}");
        assert!(out.contains(&message), "{egress:?} {extra:?}: {out:?} should contain {message:?}");
        assert!(!out.contains("hunter2"), "the error repeats the password: {out}");
    }
}

#[test]
fn the_gateway_will_not_start_with_an_https_proxy() {
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:{}\"\n\n[store]\npath = \"{}/t.db\"\n\n\
         [egress]\nproxy = \"https://proxy.corp.example:3128\"\n\n{}{}{}",
        free_port(),
        dir.path().display(),
        provider("mock", "https://localhost:1", ""),
        model(MODEL, "mock"),
        price_and_key(&key),
    );
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("TG_TEST_PROVIDER_KEY", PROVIDER_SECRET)
        .env("TOLLGATE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the gateway started with an https:// egress proxy");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("egress.proxy: the proxy must be an http:// URL"), "{stderr}");
}
