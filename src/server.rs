//! Assembles the Pingora server: the proxy listeners, the admin listener, background tasks,
//! and the audit writer that outlives them to flush on the way out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server};
use pingora::services::listening::Service;
use prometheus::IntGauge;
use tokio::sync::broadcast::error::RecvError;

use crate::admin::Admin;
use crate::audit::AuditWriter;
use crate::config::Config;
use crate::connections::{Guarded, HeadLimits, ListenerSlots};
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::runtime::Runtime;
use crate::store::{PostgresStore, SqliteStore, Store};

/// Read buffer per client connection.
const LISTENER_READ_BUFFER: usize = 8 << 10;

/// Runs until SIGTERM (graceful: in-flight requests get `server.grace_period`) or SIGINT.
/// With `upgrade`, takes the listening sockets over from a running instance (SIGQUIT it).
/// SIGHUP (`systemctl reload`) reloads `config_path`.
pub fn run(config: Config, config_path: Option<std::path::PathBuf>, upgrade: bool) -> anyhow::Result<()> {
    // Google's credentials library takes rustls's process-wide crypto provider: the same ring
    // the rest of Tollgate uses. (An error only says one is installed already.)
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = Arc::new(Metrics::new());
    let store = open_store(&config.store, &metrics)?;
    let runtime =
        Arc::new(Runtime::new(config, config_path, store.clone(), metrics.clone()).map_err(anyhow::Error::msg)?);
    // The config as it was at start; listeners and threads stay as they are until a restart.
    let config = runtime.config().clone();
    let providers = runtime.state.load().providers.clone();
    for p in &providers {
        p.resolve_blocking();
    }
    let (audit, audit_writer) = crate::audit::start(&config.audit, metrics.audit_dropped.clone())?;
    let (telemetry, trace_exporter) =
        crate::telemetry::start(&config.telemetry, metrics.otel_spans.clone()).map_err(anyhow::Error::msg)?;
    let _ = runtime.audit.set(audit.clone());
    watch_hangup(runtime.clone(), audit.clone())?;
    watch_keys(runtime.clone(), config.store.key_poll)?;
    crate::refresh::start(runtime.clone())?;
    let alerts = crate::alerts::start(runtime.clone())?;
    // After the first fetch of credentials that come from a cloud.
    for p in &providers {
        if let Some(reason) = p.unready_reason().or_else(|| p.credential_problem()) {
            tracing::warn!("{reason}; requests routed to it will fail until this is fixed");
        }
    }

    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: config.upgrade_socket().display().to_string(),
        pid_file: config.pid_file().display().to_string(),
        daemon: false,
        ..Default::default()
    };
    let opt = Opt { upgrade, daemon: false, nocapture: false, test: false, conf: None };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let metrics_in_flight = metrics.in_flight.clone();
    let gateway = Gateway::new(runtime.clone(), &config, audit, telemetry, metrics.clone());
    let mut slots = Vec::new();
    for l in &config.listeners {
        let address = l.address.get_ref().parse().with_context(|| format!("listener {}", l.address.get_ref()))?;
        slots.push(ListenerSlots {
            address,
            slots: Arc::new(tokio::sync::Semaphore::new(l.max_connections)),
            max: l.max_connections,
            open: metrics.open_connections.with_label_values(&[l.address.get_ref()]),
        });
    }
    let head = HeadLimits {
        header_timeout: config.server.header_timeout,
        max_header_bytes: config.server.max_header_bytes,
        max_headers: config.server.max_headers,
    };
    let app = Guarded::new(
        pingora_proxy::http_proxy(&server.configuration, gateway),
        slots,
        head,
        metrics.client_refused.clone(),
    );
    let mut proxy = Service::new("tollgate".to_string(), app);
    for l in &config.listeners {
        let addr = l.address.get_ref();
        // A small read buffer per connection: request headers are a few KB and bodies are read
        // in large reads that bypass it. Pingora's default (64 KiB, touched in full when a large
        // body follows the header) costs 64 KiB of memory per open stream.
        let mut endpoint = ListenerConfig::tcp(addr.as_str())
            .l4_buffer(L4BufferSettings::new(LISTENER_READ_BUFFER, pingora::listeners::DEFAULT_L4_WRITE_BUFFER_SIZE));
        if let Some(tls) = &l.tls {
            let (settings, cert) =
                crate::tls::listener_settings(tls).with_context(|| format!("TLS listener {addr}"))?;
            runtime.add_certificate(cert);
            endpoint = endpoint.tls(settings);
        }
        proxy.add_listener(endpoint);
        tracing::info!(address = %addr, tls = l.tls.is_some(), "listening");
    }
    server.add_service(proxy);

    if let Some(admin) = &config.admin {
        let mut service = Service::new("tollgate-admin".into(), HttpServer::new_app(Admin::new(runtime.clone())));
        service.threads = Some(1);
        match &admin.tls {
            Some(tls) => {
                let (settings, cert) = crate::tls::listener_settings(tls)
                    .with_context(|| format!("admin TLS {}", admin.address.get_ref()))?;
                runtime.add_certificate(cert);
                service.add_tls_with_settings(admin.address.get_ref(), None, settings);
            }
            None => service.add_tcp(admin.address.get_ref()),
        }
        tracing::info!(address = %admin.address.get_ref(), tls = admin.tls.is_some(), mtls = admin.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), "admin listening");
        server.add_service(service);
    }
    for p in &providers {
        server.add_boxed_service(p.pool.service(&p.name));
    }

    let writers =
        Arc::new(Mutex::new(Writers { audit: Some(audit_writer), alerts: Some(alerts), traces: trace_exporter }));
    let limits = runtime.limiter.clone();
    watch_drain(&server, metrics_in_flight, config.server.grace_period, writers.clone(), store.clone(), limits.clone());
    server.run(RunArgs::default());
    tracing::info!("stopped; flushing the audit log, the shared limiter, the ledger and traces");
    writers.lock().unwrap_or_else(|p| p.into_inner()).finish();
    limits.flush(LIMITS_FLUSH);
    store.close();
    writers.lock().unwrap_or_else(|p| p.into_inner()).finish_traces();
    Ok(())
}

/// Reloads the config on SIGHUP, and reopens the audit log (for logrotate, which moves the
/// file and then signals). The handler is installed here, before any listener opens, so a
/// SIGHUP can never find the default action (terminate) in place.
fn watch_hangup(runtime: Arc<Runtime>, audit: crate::audit::AuditLog) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut hangups = rt.block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) })?;
    std::thread::Builder::new().name("tollgate-reload".into()).spawn(move || {
        rt.block_on(async move {
            while hangups.recv().await.is_some() {
                audit.reopen();
                let r = runtime.clone();
                // Reading files and the store: off the runtime's thread.
                match tokio::task::spawn_blocking(move || r.reload()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "config reload refused; the running config stays"),
                    Err(e) => tracing::error!(error = %e, "config reload failed"),
                }
            }
        })
    })?;
    Ok(())
}

/// Ends the process as soon as the drain is done instead of sleeping out the whole grace period.
///
/// After SIGTERM Pingora closes the listeners and then sleeps for the full grace period, even
/// with nothing in flight; with a grace period long enough for real streams (minutes) every
/// stop would take that long. This watches for the grace period to start, waits until no request
/// is in flight (or the grace period ends), flushes the audit log and exits.
fn watch_drain(
    server: &Server,
    in_flight: IntGauge,
    grace: Duration,
    writers: Arc<Mutex<Writers>>,
    store: Arc<dyn Store>,
    limits: crate::limits::Limits,
) {
    let mut phases = server.watch_execution_phase();
    std::thread::Builder::new()
        .name("tollgate-drain".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    let deadline = Instant::now() + grace;
                    while in_flight.get() > 0 && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    tracing::info!(
                        in_flight = in_flight.get(),
                        "drained; flushing the audit log, the shared limiter, the ledger and traces"
                    );
                    writers.lock().unwrap_or_else(|p| p.into_inner()).finish();
                    limits.flush(LIMITS_FLUSH);
                    store.close();
                    writers.lock().unwrap_or_else(|p| p.into_inner()).finish_traces();
                    std::process::exit(0);
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        })
        .expect("can spawn a thread");
}

/// The threads that write what requests left behind, finished once on the way out (by the
/// drain or after the server stops, whichever comes first).
struct Writers {
    audit: Option<AuditWriter>,
    alerts: Option<crate::alerts::Alerts>,
    traces: Option<crate::telemetry::Exporter>,
}

impl Writers {
    /// The audit log, and the alerts' claims (in the store, which is closed after this).
    fn finish(&mut self) {
        if let Some(w) = self.audit.take() {
            w.shutdown();
        }
        if let Some(a) = self.alerts.take() {
            a.shutdown();
        }
    }

    /// Traces last: a dead collector can take `export_timeout`, and the ledger comes first.
    fn finish_traces(&mut self) {
        if let Some(t) = self.traces.take() {
            t.shutdown();
        }
    }
}

/// The longest a stopping gateway waits for Redis to take its settlements and credits.
const LIMITS_FLUSH: Duration = Duration::from_secs(2);

/// The store `[store]` names: this gateway's SQLite file, or the fleet's PostgreSQL.
pub fn open_store(c: &crate::config::StoreConfig, metrics: &Metrics) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match c.backend {
        crate::config::StoreBackend::Sqlite => Arc::new(
            SqliteStore::open(&c.path, c.flush_interval).with_context(|| format!("store {}", c.path.display()))?,
        ),
        crate::config::StoreBackend::Postgres => {
            let target = pg_target(c).map_err(anyhow::Error::msg)?;
            Arc::new(
                PostgresStore::open(target, c.spool.clone(), c.flush_interval, metrics.backend.clone())
                    .context("the ledger database (store.url)")?,
            )
        }
    })
}

/// The fleet's database as `[store]` names it: its URL (a secret reference) and TLS settings.
pub fn pg_target(c: &crate::config::StoreConfig) -> Result<crate::store::PgTarget, String> {
    let url = c.url.as_ref().ok_or("store.url is required for postgres")?;
    let url = url.resolve().map_err(|e| format!("store.url: {e}"))?;
    crate::store::PgTarget::new(url.expose(), c.ca_file.as_deref()).map_err(|e| e.to_string())
}

/// Applies to this gateway the keys other gateways of the fleet created, changed or deleted:
/// the store's version of its keys is polled every `every`.
fn watch_keys(runtime: Arc<Runtime>, every: Duration) -> anyhow::Result<()> {
    // A store of this gateway alone has no version to poll; a shared one is polled even if it
    // cannot answer now.
    if matches!(runtime.store.keys_version(), Ok(None)) {
        return Ok(());
    }
    std::thread::Builder::new().name("tollgate-keys".into()).spawn(move || {
        let mut seen = runtime.store.keys_version().ok().flatten();
        loop {
            std::thread::sleep(every);
            match runtime.store.keys_version() {
                Ok(v) if v != seen => match runtime.refresh_keys() {
                    Ok(()) => seen = v,
                    Err(e) => tracing::warn!(error = %e, "keys changed in the store but were not applied"),
                },
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the store's keys"),
            }
        }
    })?;
    Ok(())
}
