//! The engineer's side of sign-in: `tollgate login` runs the device sign-in through the gateway
//! and keeps the session's refresh credential; `tollgate token` prints a valid gateway token,
//! refreshing it when it is close to expiring, which is all Claude Code's `apiKeyHelper` needs.
//!
//! The credentials live in `$TOLLGATE_HOME`, else `$XDG_CONFIG_HOME/tollgate`, else
//! `~/.config/tollgate`, in `credentials.json`, readable by its owner only (0600, in a folder
//! the user owns and nobody else may write to), replaced whole on every change so a crash never
//! leaves half a file. A gateway is reached over HTTPS, or plain HTTP on a loopback address.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// RFC 8628 §3.5: poll every 5 seconds unless the provider says otherwise.
const DEFAULT_INTERVAL: u64 = 5;
/// A token is refreshed when less than this remains (Claude Code asks every 5 minutes).
const REFRESH_MARGIN: u64 = 360;

/// What `tollgate login` keeps (no `Debug`: it holds the credentials).
#[derive(Serialize, Deserialize)]
pub struct Credentials {
    pub gateway: String,
    pub refresh_token: String,
    pub access_token: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// Seconds a token lives, as the gateway last said.
    pub lifetime: u64,
    pub user: String,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn credentials_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("TOLLGATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("tollgate"));
    }
    let home = std::env::var_os("HOME").filter(|d| !d.is_empty()).ok_or("neither TOLLGATE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".config/tollgate"))
}

/// The credentials folder, created 0700 when missing; one that others may write to, or that
/// belongs to someone else, is refused: they could swap the file under us.
fn private_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let dir = credentials_dir()?;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} must be a folder of yours that nobody else can write to (chmod 700 it, or set TOLLGATE_HOME)",
            dir.display()
        ));
    }
    Ok(dir)
}

fn load() -> Result<Credentials, String> {
    let path = private_dir()?.join("credentials.json");
    let raw = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "not signed in: run `tollgate login --gateway URL`".to_string(),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    serde_json::from_slice(&raw).map_err(|e| format!("{} is damaged ({e}): run `tollgate login` again", path.display()))
}

fn save(c: &Credentials) -> Result<(), String> {
    let dir = private_dir()?;
    let path = dir.join("credentials.json");
    let tmp = dir.join(format!(".credentials.json.{}", hex::encode(rand::random::<[u8; 8]>())));
    let write = || -> std::io::Result<()> {
        // A new file, never one already there, never through a link.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(c).expect("credentials serialize"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

/// One call to the gateway: the status and the JSON it answered.
async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|e| format!("cannot reach the gateway at {url}: {e}"))?;
    let status = resp.status().as_u16();
    let value =
        resp.json::<Value>().await.map_err(|_| format!("the gateway answered {status} without JSON at {url}"))?;
    Ok((status, value))
}

fn message(v: &Value) -> String {
    v["error"]["message"].as_str().unwrap_or("no message").to_string()
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())
}

fn from_answer(gateway: &str, v: &Value, refresh: Option<String>) -> Result<Credentials, String> {
    let lifetime = v["expires_in"].as_u64().unwrap_or(3600);
    Ok(Credentials {
        gateway: gateway.to_string(),
        refresh_token: refresh
            .or_else(|| v["refresh_token"].as_str().map(str::to_string))
            .ok_or("the gateway sent no refresh credential")?,
        access_token: v["access_token"].as_str().ok_or("the gateway sent no token")?.to_string(),
        expires_at: now() + lifetime,
        lifetime,
        user: v["user"].as_str().unwrap_or_default().to_string(),
    })
}

/// Whether the gateway's URL keeps the credentials private on the way: HTTPS, or plain HTTP to
/// this machine.
fn check_gateway_url(gateway: &str) -> Result<(), String> {
    let uri: http::Uri = gateway.parse().map_err(|_| format!("{gateway:?} is not a URL"))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if loopback => Ok(()),
        _ => Err(format!("the gateway must be an https:// URL (plain http only on this machine), not {gateway:?}")),
    }
}

/// `tollgate login`: prints where to approve the sign-in, waits for it, keeps the credentials.
/// Progress goes to stderr; stdout gets nothing but the verification line and the result.
pub fn login(gateway: &str) -> Result<String, String> {
    let gateway = gateway.trim_end_matches('/').to_string();
    check_gateway_url(&gateway)?;
    runtime()?.block_on(async {
        let client = client()?;
        let (status, start) =
            call(&client, reqwest::Method::POST, &format!("{gateway}/sso/device"), Some(json!({}))).await?;
        if status != 200 {
            return Err(format!("the gateway refused to start a sign-in ({status}): {}", message(&start)));
        }
        let code = start["user_code"].as_str().unwrap_or_default();
        let device_code = start["device_code"].as_str().ok_or("the gateway sent no device code")?.to_string();
        let url =
            start["verification_uri_complete"].as_str().or(start["verification_uri"].as_str()).unwrap_or_default();
        println!("To sign in, open {url} and confirm the code {code}");
        let _ = std::io::stdout().flush();
        let mut interval = start["interval"].as_u64().unwrap_or(DEFAULT_INTERVAL).max(1);
        let deadline = now() + start["expires_in"].as_u64().unwrap_or(600);
        loop {
            tokio::time::sleep(Duration::from_secs(interval)).await;
            if now() > deadline {
                return Err("the sign-in was not approved in time: run `tollgate login` again".into());
            }
            let body = json!({ "device_code": device_code });
            let (status, v) =
                call(&client, reqwest::Method::POST, &format!("{gateway}/sso/device/token"), Some(body)).await?;
            match status {
                202 => {
                    if v["status"] == "slow_down" {
                        interval += 5;
                    }
                }
                200 => {
                    let creds = from_answer(&gateway, &v, None)?;
                    let _lock = lock()?;
                    save(&creds)?;
                    let team = v["team"].as_str().map(|t| format!(" (team {t})")).unwrap_or_default();
                    return Ok(format!("Signed in to {gateway} as {}{team}\n", creds.user));
                }
                _ => return Err(format!("the sign-in failed ({status}): {}", message(&v))),
            }
        }
    })
}

/// `tollgate token`: a gateway token valid for at least a few minutes, refreshed when needed.
pub fn token(force: bool) -> Result<String, String> {
    // Claude Code may run several helpers at once (one per session): one refreshes, the others
    // wait for it and print its token.
    let _lock = lock()?;
    let creds = load()?;
    let remaining = creds.expires_at.saturating_sub(now());
    if !force && remaining > REFRESH_MARGIN.min(creds.lifetime / 2) {
        return Ok(format!("{}\n", creds.access_token));
    }
    let url = format!("{}/sso/refresh", creds.gateway);
    let answered = runtime()?.block_on(async {
        call(&client()?, reqwest::Method::POST, &url, Some(json!({ "refresh_token": creds.refresh_token }))).await
    });
    // The gateway or the identity provider out of reach for a moment: the token held still
    // works until it expires (a refusal, 401 or 403, is final).
    let held = creds.expires_at > now() + 5;
    let (status, v) = match answered {
        Ok(a) => a,
        Err(e) if held && !force => {
            eprintln!("warning: {e}; the token held is valid for {remaining} s more");
            return Ok(format!("{}\n", creds.access_token));
        }
        Err(e) => return Err(e),
    };
    if status != 200 {
        if status >= 500 && held && !force {
            eprintln!("warning: the gateway cannot renew the token now ({status}): {}", message(&v));
            return Ok(format!("{}\n", creds.access_token));
        }
        return Err(format!("the gateway refused a new token ({status}): {}", message(&v)));
    }
    let fresh = from_answer(&creds.gateway, &v, Some(creds.refresh_token.clone()))?;
    save(&fresh)?;
    Ok(format!("{}\n", fresh.access_token))
}

/// Holds an exclusive lock on the credentials folder until dropped.
fn lock() -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = private_dir()?.join(".lock");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; the lock goes with the file.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!("cannot lock {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// `tollgate settings`: Claude Code's managed settings for the signed-in person, as JSON.
pub fn settings() -> Result<String, String> {
    let token = token(false)?;
    let creds = load()?;
    let url = format!("{}/sso/settings", creds.gateway);
    runtime()?.block_on(async {
        let resp = client()?
            .get(&url)
            .bearer_auth(token.trim())
            .send()
            .await
            .map_err(|e| format!("cannot reach the gateway at {url}: {e}"))?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.map_err(|_| format!("the gateway answered {status} without JSON"))?;
        if status != 200 {
            return Err(format!("the gateway refused ({status}): {}", message(&v)));
        }
        Ok(serde_json::to_string_pretty(&v).expect("JSON values serialize") + "\n")
    })
}

/// `tollgate logout`: ends the sign-in at the gateway, then forgets it on this machine.
pub fn logout() -> Result<String, String> {
    let _lock = lock()?;
    let creds = match load() {
        Ok(c) => c,
        Err(_) => return Ok("Not signed in\n".into()),
    };
    let url = format!("{}/sso/logout", creds.gateway);
    let ended = runtime()?.block_on(async {
        call(&client()?, reqwest::Method::POST, &url, Some(json!({ "refresh_token": creds.refresh_token }))).await
    });
    let path = private_dir()?.join("credentials.json");
    std::fs::remove_file(&path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    Ok(match ended {
        Ok((200, _)) => "Signed out\n".into(),
        Ok((status, v)) => format!("Signed out on this machine; the gateway answered {status}: {}\n", message(&v)),
        Err(e) => format!("Signed out on this machine; {e} (an admin can revoke the sign-in there)\n"),
    })
}
