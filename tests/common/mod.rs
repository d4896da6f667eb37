//! Test harness: the real `tollgate` binary on loopback ports, against the in-process mock
//! provider, driven by a real HTTP client.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

#[allow(unused_imports)]
pub use tollgate::mock::{Behavior, MockProvider, MockUsage};

/// The provider credential the gateway is given; tests check it reaches the mock.
pub const PROVIDER_SECRET: &str = "sk-ant-test-provider-secret";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port other than `taken`: the kernel may hand a just-released port out again, and a
/// config with the same address twice is refused.
pub fn other_port(taken: u16) -> u16 {
    loop {
        let p = free_port();
        if p != taken {
            return p;
        }
    }
}

/// A key known to the test: the plaintext and the config entry.
pub struct TestKey {
    pub key: String,
    pub hash: String,
}

pub fn new_key() -> TestKey {
    let (key, hash) = tollgate::auth::generate_key();
    TestKey { key, hash }
}

pub struct Gateway {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    pub dir: TempDir,
    pub audit_path: PathBuf,
    pub config_path: PathBuf,
    /// How the process was started, for [`Gateway::restart`].
    envs: Vec<(String, String)>,
    env_remove: Vec<String>,
    log_to_file: bool,
}

/// Starts the gateway with `config` (providers, models, keys...) after the harness's own
/// server, listener, admin and audit sections.
pub fn start_gateway(config: &str) -> Gateway {
    start_gateway_with("", config)
}

/// Like [`start_gateway`], with `server_extra` lines added to `[server]` and `listener_extra`
/// to the `[[listener]]` table.
pub fn start_gateway_with(server_extra: &str, config: &str) -> Gateway {
    start_gateway_full(server_extra, "", config)
}

pub fn start_gateway_full(server_extra: &str, listener_extra: &str, config: &str) -> Gateway {
    launch(Sections { server: server_extra, listener: listener_extra, ..Default::default() }, &[], config)
}

/// Lines added to the harness's own tables.
#[derive(Default)]
struct Sections<'a> {
    server: &'a str,
    listener: &'a str,
    admin: &'a str,
    /// Lines added to `[audit]` (which always sets `path` and `flush_interval`).
    audit: &'a str,
    /// Lines added to `[store]` (which always sets `path`, and `flush_interval = "50ms"` and a
    /// `spool` in the gateway's directory unless these lines set them).
    store: &'a str,
    /// Send the gateway's output (its log) to `gateway.log` in its directory.
    log_to_file: bool,
    /// Variables taken out of the environment the gateway inherits from the test.
    env_remove: &'a [String],
}

/// Writes the harness's tables (with `extra` lines), then `config`, and starts the binary on it.
fn launch(extra: Sections<'_>, envs: &[(&str, &str)], config: &str) -> Gateway {
    // Another test's gateway can take a port between `free_port` and the bind: then this one
    // exits, and is started again on other ports.
    let mut attempt = 1;
    loop {
        match launch_once(&extra, envs, config) {
            Ok(gw) => return gw,
            Err(e) if e.stolen && attempt < 3 => attempt += 1,
            Err(e) => panic!("{}", e.why),
        }
    }
}

/// [`launch`] on two free ports, once.
fn launch_once(extra: &Sections<'_>, envs: &[(&str, &str)], config: &str) -> Result<Gateway, NotListening> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = other_port(port);
    let audit_path = dir.path().join("audit.jsonl");
    let mut store = String::new();
    if !extra.store.contains("flush_interval") {
        store.push_str("flush_interval = \"50ms\"\n");
    }
    if !extra.store.contains("spool") {
        store.push_str(&format!("spool = \"{}/spool.jsonl\"\n", dir.path().display()));
    }
    store.push_str(extra.store);
    let text = format!(
        "[server]\nthreads = 2\ngrace_period = \"5s\"\nupgrade_socket = \"{d}/upgrade.sock\"\npid_file = \"{d}/pid\"\n{server}\n\
         [[listener]]\naddress = \"127.0.0.1:{port}\"\n{listener}\n\
         [admin]\naddress = \"127.0.0.1:{admin_port}\"\n{admin}\n\
         [audit]\npath = \"{audit}\"\nflush_interval = \"20ms\"\n{audit_extra}\n\n\
         [store]\npath = \"{d}/tollgate.db\"\n{store}\n\n{config}",
        d = dir.path().display(),
        audit = audit_path.display(),
        server = extra.server,
        listener = extra.listener,
        admin = extra.admin,
        audit_extra = extra.audit,
    );
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, text).unwrap();
    let mut gw = Gateway {
        child: None,
        port,
        admin_port,
        dir,
        audit_path,
        config_path,
        envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        env_remove: extra.env_remove.to_vec(),
        log_to_file: extra.log_to_file,
    };
    gw.spawn();
    gw.listening()?;
    Ok(gw)
}

/// Starts the gateway on a complete config written by an earlier [`start_gateway`] (its ports
/// are replaced by fresh ones).
pub fn start_gateway_raw(full_config: &str) -> Gateway {
    let body_start = full_config.find("[[provider]]").expect("a config with providers");
    start_gateway(&full_config[body_start..])
}

/// Why a gateway is not listening: it exited, and whether another process holds its port.
struct NotListening {
    stolen: bool,
    why: String,
}

/// Process `pid` holds a socket listening on 127.0.0.1:`port` (read from /proc: the socket's
/// inode in /proc/net/tcp, among the process's open files).
fn listens(pid: u32, port: u16) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// `/readyz` with [`HARNESS_ADMIN_TOKEN`] (the reasons in full): its status and body.
    pub async fn readyz(&self) -> (u16, Value) {
        let resp = client().get(self.admin_url("/readyz")).bearer_auth(HARNESS_ADMIN_TOKEN).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// Starts the binary on this gateway's config, its log appended to `gateway.log` when it
    /// is kept.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the gateway is running");
        let log = self.log_to_file.then(|| {
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("gateway.log")).unwrap()
        });
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        for name in &self.env_remove {
            command.env_remove(name);
        }
        let child = command
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("TG_TEST_PROVIDER_KEY", PROVIDER_SECRET)
            .env("TOLLGATE_LOG", "warn")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(match &log {
                Some(f) => Stdio::from(f.try_clone().unwrap()),
                None => Stdio::inherit(),
            })
            .stderr(match &log {
                Some(f) => Stdio::from(f.try_clone().unwrap()),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("the tollgate binary starts");
        self.child = Some(child);
    }

    /// Starts the gateway again after [`Gateway::stop`]: same config, ports, store and
    /// environment; waits until it listens.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_listening();
    }

    /// Starts the gateway again after [`Gateway::stop`] and waits (up to 20 s) for the process
    /// to exit by itself: for a start that must fail. Its exit status.
    pub fn restart_expecting_exit(&mut self) -> std::process::ExitStatus {
        self.spawn();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway did not exit\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where a gateway on PostgreSQL started by [`start_gateway_store`] spools ledger rows.
    pub fn spool_path(&self) -> PathBuf {
        self.dir.path().join("spool.jsonl")
    }

    fn wait_listening(&mut self) {
        if let Err(e) = self.listening() {
            panic!("{}", e.why);
        }
    }

    /// Waits (up to 20 s) until this gateway's own process listens on both its ports: a
    /// connection alone could reach another test's gateway that took a port first.
    fn listening(&mut self) -> Result<(), NotListening> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = self.child.as_ref().map(|c| c.id());
        for port in [self.port, self.admin_port] {
            while !pid.is_some_and(|pid| listens(pid, port)) {
                // A gateway that exited at start will not listen: say so at once, with its log.
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    self.child = None;
                    let stolen = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
                    let why = format!("the gateway exited ({status}) before listening on {port}\n{}", self.log());
                    return Err(NotListening { stolen, why });
                }
                assert!(Instant::now() < deadline, "gateway did not start listening on {port}\n{}", self.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Waits (up to 10 s) until at least `n` usage records are written.
    pub fn wait_for_records(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.records().len() < n {
            assert!(std::time::Instant::now() < deadline, "only {} of {n} records", self.records().len());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// All usage records written so far.
    pub fn records(&self) -> Vec<Value> {
        self.audit_lines().into_iter().filter(|l| l.get("event").is_none()).collect()
    }

    /// The audit log's events (sign-ins, revocations) written so far.
    pub fn events(&self) -> Vec<Value> {
        self.audit_lines().into_iter().filter(|l| l.get("event").is_some()).collect()
    }

    fn audit_lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        // A read may race the writer: its last line is whole only once its newline is there.
        text[..text.rfind('\n').map_or(0, |end| end + 1)]
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// Waits for the record of `request_id`.
    pub fn record(&self, request_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.records().into_iter().find(|r| r["request_id"] == request_id) {
                return r;
            }
            assert!(Instant::now() < deadline, "no usage record for {request_id}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the gateway logged so far (started with [`start_gateway_logged`]).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// The gateway's process id (for /proc readings).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill").args([format!("-{sig}"), pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Waits up to `within` for the process to exit by itself: its status, or `None` while it
    /// runs (it is killed when the `Gateway` is dropped).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (unless already sent), and wait for the process to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill").args(["-TERM".to_string(), child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                // Not left running after the test.
                let _ = child.kill();
                let _ = child.wait();
                panic!("gateway did not stop within 20 s of SIGTERM (killed)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The smallest useful config: provider `mock` at `url`, model `m` on it, one key.
pub fn one_provider_config(url: &str, key: &TestKey) -> String {
    format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"mock\" }}]\n[[key]]\nid = \"a\"\nhash = \"{}\"\n",
        key.hash
    )
}

/// One provider of each kind on three mocks: `anthropic`, `bedrock` (region `us-east-1`) and
/// `vertex` (project `p1`, region `us-east5`), keyed by `TG_TEST_PROVIDER_KEY`, without health
/// probes. `extra` adds lines to each section, in that order (`idle_timeout = "1s"`, say).
pub fn provider_sections(urls: [&str; 3], extra: [&str; 3]) -> String {
    let [a, b, v] = urls;
    let [xa, xb, xv] = extra;
    format!(
        "[[provider]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{a}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\" }}\n{xa}\n\n\
         [[provider]]\nname = \"bedrock\"\nkind = \"bedrock\"\nregion = \"us-east-1\"\nbase_url = \"{b}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\" }}\n{xb}\n\n\
         [[provider]]\nname = \"vertex\"\nkind = \"vertex\"\nproject = \"p1\"\nregion = \"us-east5\"\nbase_url = \"{v}\"\n\
         credential = \"env:TG_TEST_PROVIDER_KEY\"\nhealth = {{ probe = \"none\" }}\n{xv}\n\n"
    )
}

/// Three mock providers with the same behaviour: one for each provider kind.
pub async fn three_mocks(b: Behavior) -> (MockProvider, MockProvider, MockProvider) {
    (
        MockProvider::start(b.clone()).await.unwrap(),
        MockProvider::start(b.clone()).await.unwrap(),
        MockProvider::start(b).await.unwrap(),
    )
}

/// A Messages request to `gw` carrying `key`, ready for a body and more headers.
pub fn messages_request(gw: &Gateway, key: &TestKey) -> reqwest::RequestBuilder {
    client().post(gw.url("/v1/messages")).header("x-api-key", &key.key)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A Messages request body like the ones Claude Code sends, at a chosen model and size.
pub fn messages_body(model: &str, stream: bool, padding: usize) -> String {
    serde_json::json!({
        "model": model,
        "max_tokens": 64000,
        "stream": stream,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0"},
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a".repeat(padding)}]}],
        "metadata": {"user_id": "{\"device_id\":\"d1\",\"session_id\":\"s1\"}"},
        "tools": [{"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}],
    })
    .to_string()
}

/// A gateway process started by [`respawn`]; killed when dropped (a failing test leaves none).
pub struct Respawned(Child);

impl Respawned {
    pub fn kill_9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Respawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the gateway binary again on `gw`'s config (same ports, same store), after `gw`'s own
/// process stopped.
pub fn respawn(gw: &Gateway, envs: &[(&str, &str)]) -> Respawned {
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "--config"])
        .arg(&gw.config_path)
        .env("TG_TEST_PROVIDER_KEY", PROVIDER_SECRET)
        .env("TOLLGATE_LOG", "warn")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", gw.port)).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not come back");
        std::thread::sleep(Duration::from_millis(20));
    }
    Respawned(child)
}

/// Like [`start_gateway`], with `admin_extra` lines added to the `[admin]` table (e.g.
/// `token = "env:TG_TEST_ADMIN_TOKEN"`) and `envs` set in the gateway's environment.
pub fn start_gateway_admin(admin_extra: &str, envs: &[(&str, &str)], config: &str) -> Gateway {
    launch(Sections { admin: admin_extra, ..Default::default() }, envs, config)
}

/// Lines added to each of the harness's tables, and `envs` in the gateway's environment.
pub fn start_gateway_sections(
    server: &str,
    listener: &str,
    admin: &str,
    envs: &[(&str, &str)],
    config: &str,
) -> Gateway {
    launch(Sections { server, listener, admin, ..Default::default() }, envs, config)
}

/// Like [`start_gateway_admin`], with the gateway's log written to `gateway.log` in its directory
/// (read it with [`Gateway::log`]).
pub fn start_gateway_logged(admin_extra: &str, envs: &[(&str, &str)], config: &str) -> Gateway {
    launch(Sections { admin: admin_extra, log_to_file: true, ..Default::default() }, envs, config)
}

/// Like [`start_gateway_logged`] (no admin extras), with the variables named in `remove` taken
/// out of the environment the gateway would inherit from the test before `envs` are set: a
/// hermetic environment for code that reads ambient configuration (AWS's and Google's credential
/// chains read `AWS_*`, `GOOGLE_*`, `HOME`, proxies...).
///
/// Its admin token is [`HARNESS_ADMIN_TOKEN`]: [`Gateway::readyz`] reads `/readyz` with the
/// reasons in full.
pub fn start_gateway_env(envs: &[(&str, &str)], remove: &[String], config: &str) -> Gateway {
    let mut envs = envs.to_vec();
    envs.push(("TG_HARNESS_ADMIN_TOKEN", HARNESS_ADMIN_TOKEN));
    let admin = "token = \"env:TG_HARNESS_ADMIN_TOKEN\"";
    launch(Sections { admin, log_to_file: true, env_remove: remove, ..Default::default() }, &envs, config)
}

/// The admin token of gateways started by [`start_gateway_env`].
pub const HARNESS_ADMIN_TOKEN: &str = "harness-admin-token-7c1e";

/// Like [`start_gateway_logged`], with `store_extra` lines added to `[store]` (`backend =
/// "postgres"`, `url = "env:..."`, `key_poll = "500ms"`...); the spool is `spool.jsonl` in the
/// gateway's directory ([`Gateway::spool_path`]) unless those lines name one.
pub fn start_gateway_store(store_extra: &str, admin_extra: &str, envs: &[(&str, &str)], config: &str) -> Gateway {
    launch(Sections { store: store_extra, admin: admin_extra, log_to_file: true, ..Default::default() }, envs, config)
}

/// Like [`start_gateway_store`], with `audit_extra` lines added to `[audit]` (rotation,
/// retention); the audit log is [`Gateway::audit_path`].
pub fn start_gateway_audit(
    audit_extra: &str,
    store_extra: &str,
    admin_extra: &str,
    envs: &[(&str, &str)],
    config: &str,
) -> Gateway {
    let sections = Sections {
        audit: audit_extra,
        store: store_extra,
        admin: admin_extra,
        log_to_file: true,
        ..Default::default()
    };
    launch(sections, envs, config)
}

/// The names of the variables in the test's own environment that `matches` picks (for
/// [`start_gateway_env`]'s `remove`).
pub fn inherited_env(matches: impl Fn(&str) -> bool) -> Vec<String> {
    std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()).filter(|n| matches(n)).collect()
}

/// One request a [`RecordingProxy`] passed on, with the answer it got.
#[derive(Debug, Clone)]
pub struct ProxyExchange {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub status: u16,
    pub response_headers: http::HeaderMap,
    pub response: bytes::Bytes,
}

impl ProxyExchange {
    pub fn response_text(&self) -> String {
        String::from_utf8_lossy(&self.response).into_owned()
    }
}

/// A loopback HTTP reverse proxy in front of `target` that keeps a copy of every request and
/// answer (for tests that must see what a client library sent and got: which key signed a call,
/// which credentials an issuer handed out). It passes requests on as they came, `Host` included
/// (a SigV4 signature covers it), and adds nothing (no `X-Forwarded-For`, which metadata servers
/// refuse). It stops when dropped.
pub struct RecordingProxy {
    pub addr: std::net::SocketAddr,
    exchanges: std::sync::Arc<std::sync::Mutex<Vec<ProxyExchange>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl RecordingProxy {
    /// Starts on `127.0.0.1` with a free port, on the current tokio runtime; `target` is
    /// `http://host:port`.
    pub async fn start(target: &str) -> Self {
        use hyper_util::rt::TokioIo;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exchanges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let upstream = reqwest::Client::builder().no_proxy().build().unwrap();
        let (target, log) = (target.trim_end_matches('/').to_string(), exchanges.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (upstream, target, log) = (upstream.clone(), target.clone(), log.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        proxy_one(upstream.clone(), target.clone(), log.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        RecordingProxy { addr, exchanges, _stop: stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every exchange so far, in order.
    pub fn exchanges(&self) -> Vec<ProxyExchange> {
        self.exchanges.lock().unwrap().clone()
    }
}

/// Headers that belong to one connection, not to the request or answer.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "content-length"];

async fn proxy_one(
    upstream: reqwest::Client,
    target: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<ProxyExchange>>>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut headers = parts.headers.clone();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let sent = upstream
        .request(parts.method.clone(), format!("{target}{path}"))
        .headers(headers)
        .body(body.clone())
        .send()
        .await;
    let (status, mut response_headers, response) = match sent {
        Ok(r) => {
            let (status, headers) = (r.status().as_u16(), r.headers().clone());
            (status, headers, r.bytes().await.unwrap_or_default())
        }
        Err(e) => (502, http::HeaderMap::new(), bytes::Bytes::from(format!("recording proxy: {e}"))),
    };
    for name in HOP_BY_HOP {
        response_headers.remove(name);
    }
    log.lock().unwrap().push(ProxyExchange {
        method: parts.method.to_string(),
        path,
        headers: parts.headers,
        body,
        status,
        response_headers: response_headers.clone(),
        response: response.clone(),
    });
    let mut answer = http::Response::new(http_body_util::Full::new(response));
    *answer.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    *answer.headers_mut() = response_headers;
    Ok(answer)
}

/// The data of every SSE event in `sse`, with the model id made neutral (each provider names its
/// own), for comparing answers across providers.
pub fn sse_data(sse: &str) -> Vec<Value> {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            let mut v: Value = serde_json::from_str(d).unwrap();
            if v["message"]["model"].is_string() {
                v["message"]["model"] = serde_json::json!("M");
            }
            v
        })
        .collect()
}

/// A private certificate authority for TLS tests.
pub struct Ca {
    pub pem: String,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), cert, key }
    }

    /// A certificate for `names` (host names or IP addresses) signed by this CA: (certificate
    /// PEM, private key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// What a [`CannedServer`] answers: status, extra headers, body.
type Canned = (u16, Vec<(String, String)>, Vec<u8>);

/// A loopback HTTP server (a JWKS endpoint, say) answering every request with the JSON status,
/// headers and body it holds, and counting requests. Its thread lives as long as the test.
pub struct CannedServer {
    pub url: String,
    answer: std::sync::Arc<std::sync::Mutex<Canned>>,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CannedServer {
    pub fn start(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().unwrap());
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let answer = std::sync::Arc::new(std::sync::Mutex::new((status, headers, body)));
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (shared, counter) = (answer.clone(), hits.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let (status, headers, body) = shared.lock().unwrap().clone();
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            }
        });
        CannedServer { url, answer, hits }
    }

    /// Answers `status` and `body` from now on, without extra headers.
    pub fn set(&self, status: u16, body: Vec<u8>) {
        *self.answer.lock().unwrap() = (status, Vec::new(), body);
    }

    pub fn serve(&self, body: Vec<u8>) {
        self.set(200, body);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Unpadded URL-safe base64, as JWTs and JWKs write it.
pub fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWK of a P-256 key pair's public key.
pub fn ec_jwk(kp: &rcgen::KeyPair, kid: &str) -> Value {
    let raw = kp.public_key_raw();
    assert_eq!((raw.len(), raw[0]), (65, 4), "an uncompressed P-256 point");
    serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..])})
}

/// A private `redis-server` of a test's own on a loopback port, keeping nothing on disk: a test
/// that must stop, pause or restart Redis uses one, never the machine's shared instance. Killed
/// when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts on a free port and waits until it answers PING.
    pub fn start() -> Self {
        let mut s = RedisServer { port: free_port(), child: None, dir: tempfile::tempdir().unwrap() };
        s.restart();
        s
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection to this instance.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }

    /// Kills the server (SIGKILL: it saves nothing) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as when a
    /// network partition or a stalled host cuts it off.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server go on (SIGCONT), its data as it was.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.child.as_ref().expect("redis-server runs").id().to_string();
        let ok = Command::new("kill").args([which, &pid]).status().unwrap().success();
        assert!(ok, "kill {which} {pid}");
    }

    /// Starts the server again on the same port (empty, as a restarted Redis without
    /// persistence is), and waits until it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A Redis Cluster of three primaries on loopback (no replicas), each a `redis-server` of its
/// own; stopped when dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Each node also listens on its port + 10000 (the cluster bus).
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = free_port();
            if p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() && !ports.contains(&p) {
                ports.push(p);
            }
        }
        let children = ports
            .iter()
            .map(|p| {
                Command::new("redis-server")
                    .args(["--port", &p.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes", "--cluster-config-file", &format!("nodes-{p}.conf")])
                    .arg("--dir")
                    .arg(dir.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server starts (is it installed?)")
            })
            .collect();
        let cluster = RedisCluster { ports, children, _dir: dir };
        for p in &cluster.ports {
            cluster.wait_for(*p, |c| redis::cmd("PING").query::<String>(c).is_ok());
        }
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        for p in &cluster.ports {
            cluster.wait_for(*p, |c| {
                redis::cmd("CLUSTER").arg("INFO").query::<String>(c).is_ok_and(|i| i.contains("cluster_state:ok"))
            });
        }
        cluster
    }

    fn wait_for(&self, port: u16, ok: impl Fn(&mut redis::Connection) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)));
            if c.is_ok_and(|mut c| ok(&mut c)) {
                return;
            }
            assert!(Instant::now() < deadline, "redis cluster node {port} not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection to one node.
    pub fn node(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap().get_connection().unwrap()
    }

    /// The port of the node that owns `key`'s slot.
    pub fn owner(&self, key: &str) -> u16 {
        let mut c = self.node(self.ports[0]);
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut c).unwrap();
        // Each range: [from, to, [ip, port, id, ...], replicas...].
        let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
        let int = |v: &redis::Value| redis::from_redis_value_ref::<i64>(v).unwrap();
        let owner = ranges.iter().find(|r| (int(&r[0])..=int(&r[1])).contains(&slot)).expect("every slot is served");
        let primary: Vec<redis::Value> = redis::from_redis_value_ref(&owner[2]).unwrap();
        int(&primary[1]) as u16
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback HTTP reverse proxy in front of `target` that counts the requests it has in
/// flight (from the request's arrival until the upstream answer has been read whole), and the
/// most it ever had at once: put between gateways and a mock provider, it measures how many
/// requests a concurrency limit really lets through.
pub struct InFlightProxy {
    pub addr: std::net::SocketAddr,
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    total: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl InFlightProxy {
    /// Starts on `127.0.0.1` with a free port, on the current tokio runtime; `target` is
    /// `http://host:port`.
    pub async fn start(target: &str) -> Self {
        use hyper_util::rt::TokioIo;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (now, max, total) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let upstream = reqwest::Client::builder().no_proxy().build().unwrap();
        let target = target.trim_end_matches('/').to_string();
        let counters = (now.clone(), max.clone(), total.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (upstream, target, counters) = (upstream.clone(), target.clone(), counters.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (upstream, target, (now, max, total)) =
                            (upstream.clone(), target.clone(), counters.clone());
                        async move {
                            use http_body_util::BodyExt;
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(n, Ordering::SeqCst);
                            total.fetch_add(1, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
                            let mut headers = parts.headers.clone();
                            for name in HOP_BY_HOP {
                                headers.remove(name);
                            }
                            let sent = upstream
                                .request(parts.method, format!("{target}{path}"))
                                .headers(headers)
                                .body(body)
                                .send()
                                .await;
                            let (status, mut response_headers, response) = match sent {
                                Ok(r) => {
                                    let (status, headers) = (r.status().as_u16(), r.headers().clone());
                                    (status, headers, r.bytes().await.unwrap_or_default())
                                }
                                Err(e) => {
                                    (502, http::HeaderMap::new(), bytes::Bytes::from(format!("in-flight proxy: {e}")))
                                }
                            };
                            now.fetch_sub(1, Ordering::SeqCst);
                            for name in HOP_BY_HOP {
                                response_headers.remove(name);
                            }
                            let mut answer = http::Response::new(http_body_util::Full::new(response));
                            *answer.status_mut() =
                                http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
                            *answer.headers_mut() = response_headers;
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        InFlightProxy { addr, now, max, total, _stop: stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests passed on so far.
    pub fn total(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The `p`-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// A loopback TCP proxy in front of `target` (a database, say) that a test can cut and restore:
/// what a network between a gateway and a server it depends on does. Up, it passes bytes both
/// ways; [`TcpProxy::cut`] closes every connection it carries and closes each new one as soon as
/// it is accepted (nothing reaches the target); [`TcpProxy::silence`] keeps connections open
/// but passes nothing on (a network that drops packets: the peer hears nothing, not even a
/// reset). [`TcpProxy::restore`] brings it back up. Plain threads: it does not depend on the
/// test's runtime. It stops when dropped.
pub struct TcpProxy {
    pub port: u16,
    inner: std::sync::Arc<TcpProxyInner>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TcpProxyMode {
    Up,
    Cut,
    Silent,
    Stopped,
}

struct TcpProxyInner {
    target: std::net::SocketAddr,
    mode: std::sync::Mutex<TcpProxyMode>,
    /// Both ends of every connection carried, to close them on a cut.
    open: std::sync::Mutex<Vec<std::net::TcpStream>>,
    accepted: std::sync::atomic::AtomicUsize,
}

impl TcpProxy {
    pub fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(TcpProxyInner {
            target,
            mode: std::sync::Mutex::new(TcpProxyMode::Up),
            open: std::sync::Mutex::new(Vec::new()),
            accepted: std::sync::atomic::AtomicUsize::new(0),
        });
        let shared = inner.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                match shared.mode() {
                    TcpProxyMode::Stopped => return,
                    // Closed at once: the client's handshake finds the connection gone.
                    TcpProxyMode::Cut => {
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        continue;
                    }
                    TcpProxyMode::Up | TcpProxyMode::Silent => {}
                }
                let Ok(server) = std::net::TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                {
                    let mut open = shared.open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let shared = shared.clone();
                    std::thread::spawn(move || shared.pump(from, to));
                }
            }
        });
        TcpProxy { port, inner }
    }

    /// Closes every connection carried and every new one, until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.inner.set(TcpProxyMode::Cut);
    }

    /// Passes nothing on, either way, and closes nothing, until [`TcpProxy::restore`].
    pub fn silence(&self) {
        self.inner.set(TcpProxyMode::Silent);
    }

    pub fn restore(&self) {
        self.inner.set(TcpProxyMode::Up);
    }

    /// Connections accepted so far (those closed at once by a cut included).
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl TcpProxyInner {
    fn mode(&self) -> TcpProxyMode {
        *self.mode.lock().unwrap()
    }

    fn set(&self, mode: TcpProxyMode) {
        *self.mode.lock().unwrap() = mode;
        if matches!(mode, TcpProxyMode::Cut | TcpProxyMode::Stopped) {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Copies `from` to `to` until either closes; while silent, what was read waits.
    fn pump(&self, mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
        use std::io::{Read, Write};
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            loop {
                match self.mode() {
                    TcpProxyMode::Up => break,
                    TcpProxyMode::Silent => std::thread::sleep(Duration::from_millis(5)),
                    TcpProxyMode::Cut | TcpProxyMode::Stopped => {
                        let _ = (from.shutdown(std::net::Shutdown::Both), to.shutdown(std::net::Shutdown::Both));
                        return;
                    }
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = (from.shutdown(std::net::Shutdown::Both), to.shutdown(std::net::Shutdown::Both));
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.inner.set(TcpProxyMode::Stopped);
        // Wakes the accepting thread so it sees the mode and ends.
        let _ = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_millis(200),
        );
    }
}
