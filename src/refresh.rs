//! Keeps every credential that expires fresh, off the request path: the JWT issuers' key sets,
//! Vertex's OAuth tokens and Bedrock's temporary AWS credentials. One thread runs a pass four
//! times a second; each fetch that is due runs as a task of its own, so a hung metadata service or STS
//! delays nothing else, and a panicking fetch loses only that fetch.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::Jwks;
use crate::providers::TokenSource;
use crate::runtime::Runtime;

/// How often revoked sign-ins and disabled people are read from the store.
const SSO_SYNC: Duration = Duration::from_secs(2);

/// A key set larger than this is refused: real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// An OAuth token answer larger than this is refused: real ones are under 4 KiB.
const MAX_TOKEN_BYTES: usize = 64 << 10;

/// Starts the refresh thread. Returns after its first pass has fetched what it could (or 10 s),
/// so tokens verify, and Vertex and Bedrock answer, from the first request.
pub fn start(runtime: Arc<Runtime>) -> anyhow::Result<()> {
    // Always running (it sleeps when there is nothing to fetch): a reload may add sources.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (first, done) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("tollgate-refresh".into()).spawn(move || {
        // No redirects: key sets and tokens come from the URL the operator named, nowhere else.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client");
        let aws_http = crate::providers::aws_http_client();
        let busy = Busy::default();
        let mut first = Some(first);
        let mut sso_synced = Instant::now();
        rt.block_on(async move {
            loop {
                let mut started = Vec::new();
                let state = runtime.state.load_full();
                let now = Instant::now();
                for jwks in state.jwt.jwks().into_iter().filter(|j| j.due(now)) {
                    let key = Arc::as_ptr(&jwks) as usize;
                    started.extend(busy.spawn(key, fetch_jwks(client.clone(), jwks)));
                }
                for creds in state.providers.iter().flat_map(|p| p.aws_credentials()).filter(|c| c.due(now)) {
                    let key = Arc::as_ptr(&creds) as usize;
                    let http = aws_http.clone();
                    started.extend(busy.spawn(key, async move { creds.refresh(&http).await }));
                }
                for source in state.providers.iter().flat_map(|p| p.token_sources()).filter(|s| s.due(now)) {
                    let key = Arc::as_ptr(&source) as usize;
                    started.extend(busy.spawn(key, fetch_token(client.clone(), source)));
                }
                // Revocations made by other gateways of a fleet reach this one within seconds.
                if state.sso.is_some() && now.duration_since(sso_synced) >= SSO_SYNC {
                    sso_synced = now;
                    let runtime = runtime.clone();
                    started.extend(busy.spawn(usize::MAX, async move {
                        let synced = tokio::task::spawn_blocking(move || {
                            let state = runtime.state.load_full();
                            state.sso.as_ref().map(|s| s.sync(&*runtime.store))
                        })
                        .await;
                        if let Ok(Some(Err(e))) = synced {
                            tracing::warn!(error = %e, "cannot read revoked sign-ins; will retry");
                        }
                    }));
                }
                if let Some(tx) = first.take() {
                    for task in started {
                        let _ = task.await;
                    }
                    let _ = tx.send(());
                }
                // Four passes a second: Google's library is asked this often, so an expired
                // token it is renewing is noticed within a quarter of a second.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    })?;
    let _ = done.recv_timeout(Duration::from_secs(10));
    Ok(())
}

/// The sources being fetched now: a slow fetch is not started again on the next pass.
#[derive(Clone, Default)]
struct Busy(Arc<Mutex<HashSet<usize>>>);

impl Busy {
    fn spawn(
        &self,
        key: usize,
        fetch: impl Future<Output = ()> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(key) {
            return None;
        }
        // Released when the task ends, whether it returns or panics.
        let release = Release(self.clone(), key);
        Some(tokio::spawn(async move {
            let _release = release;
            fetch.await;
        }))
    }
}

struct Release(Busy, usize);

impl Drop for Release {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

async fn fetch_jwks(client: reqwest::Client, jwks: Arc<Jwks>) {
    let fetched = async {
        let resp = client.get(&jwks.url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("JWKS at {} answered {}", jwks.url, resp.status()));
        }
        read_capped(resp, MAX_JWKS_BYTES).await.map_err(|e| format!("JWKS at {}: {e}", jwks.url))
    };
    jwks.apply(fetched.await);
}

/// A Vertex token: from Google's library, or by the JWT bearer grant with a service-account key.
async fn fetch_token(client: reqwest::Client, source: Arc<TokenSource>) {
    if !source.is_key() {
        source.refresh_from_library().await;
        return;
    }
    // The token's life counts from the ask, not the answer: a slow answer shortens it.
    let asked = std::time::Instant::now();
    let fetched = async {
        let assertion = source.assertion(crate::providers::unix_now())?;
        let form = [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)];
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let resp = client
            .post(&source.token_uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("token endpoint {} answered {}", source.token_uri, resp.status()));
        }
        read_capped(resp, MAX_TOKEN_BYTES).await.map_err(|e| format!("token endpoint: {e}"))
    };
    source.apply(fetched.await, asked);
}

/// Reads a response body, refusing it past `max` bytes (as it arrives, not after).
async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("the body is larger than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
