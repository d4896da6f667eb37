//! The exporter thread: takes the queued spans every `export_interval` (sooner when a batch
//! fills up) and posts them to the collector as one OTLP/HTTP protobuf request. A batch the
//! collector does not take (down, slow, refusing) is dropped and counted, not retried: the
//! queue stays bounded and the next batch is not held up behind a dead collector.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::otlp::{self, Value};
use super::Shared;
use crate::config::Secret;

/// Spans in one export at most; a larger queue goes out in several.
const MAX_EXPORT: usize = 2048;

pub(super) struct Settings {
    pub endpoint: String,
    pub headers: Vec<(String, Secret)>,
    pub resource: Vec<(&'static str, Value)>,
    pub interval: Duration,
    pub timeout: Duration,
    pub shared: Arc<Shared>,
}

/// The running exporter; [`Exporter::shutdown`] sends what is queued and stops.
pub struct Exporter {
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Exporter {
    pub(super) fn start(settings: Settings) -> std::io::Result<Self> {
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = crate::background::spawn("tollgate-otel", move || run(settings, &stop))?;
        Ok(Exporter { stopping, thread })
    }

    pub fn shutdown(self) {
        self.stopping.store(true, Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

static FAILURES_LOGGED: AtomicU64 = AtomicU64::new(0);

fn run(s: Settings, stopping: &AtomicBool) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "telemetry exporter cannot start: no traces will be sent");
            return;
        }
    };
    let client = match reqwest::Client::builder().timeout(s.timeout).redirect(reqwest::redirect::Policy::none()).build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "telemetry exporter cannot build its HTTP client: no traces will be sent");
            return;
        }
    };
    let mut taken = Vec::with_capacity(MAX_EXPORT);
    loop {
        std::thread::park_timeout(s.interval);
        let stop = stopping.load(Ordering::Acquire);
        loop {
            {
                let mut batch = s.shared.batch.lock().unwrap_or_else(|p| p.into_inner());
                let n = batch.len().min(MAX_EXPORT);
                taken.extend(batch.drain(..n));
            }
            if taken.is_empty() {
                break;
            }
            let n = taken.len() as u64;
            let body = otlp::encode_request(&s.resource, &taken);
            taken.clear();
            let result = rt.block_on(post(&client, &s, body));
            let counter = &s.shared.spans;
            match result {
                Ok(()) => counter.with_label_values(&["exported"]).inc_by(n),
                Err(why) => {
                    counter.with_label_values(&["dropped_export"]).inc_by(n);
                    // One line per hundred failed exports: seen, without flooding the log.
                    if FAILURES_LOGGED.fetch_add(1, Ordering::Relaxed).is_multiple_of(100) {
                        tracing::warn!(endpoint = %without_userinfo(&s.endpoint), spans = n, "traces not exported: {why}");
                    }
                }
            }
            if !stop && n < MAX_EXPORT as u64 {
                break;
            }
        }
        if stop {
            return;
        }
    }
}

async fn post(client: &reqwest::Client, s: &Settings, body: Vec<u8>) -> Result<(), String> {
    let mut req = client.post(&s.endpoint).header(http::header::CONTENT_TYPE, "application/x-protobuf").body(body);
    for (name, value) in &s.headers {
        let mut v =
            http::HeaderValue::from_str(value.expose()).map_err(|_| format!("header {name}: not a header value"))?;
        v.set_sensitive(true);
        req = req.header(name.as_str(), v);
    }
    let resp = req.send().await.map_err(|e| without_url(&e))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {status}"))
    }
}

/// reqwest's errors carry the URL; the endpoint is logged once beside it already.
fn without_url(e: &reqwest::Error) -> String {
    let mut why = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    why
}

/// The endpoint as logged: a `user:password@` in it is a credential.
fn without_userinfo(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme && !url[scheme + 3..at].contains('/') => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_the_endpoint_are_not_logged() {
        assert_eq!(super::without_userinfo("https://u:p@collector:4318/v1/traces"), "https://collector:4318/v1/traces");
        assert_eq!(super::without_userinfo("http://collector/v1/traces?a=b@c"), "http://collector/v1/traces?a=b@c");
    }
}
