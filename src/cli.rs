//! The admin commands of the `tollgate` CLI: calls to the admin API, printed as tables (or the
//! API's JSON with `--json`). The API's address and token come from the same config file the
//! gateway runs with, so on the gateway's host no flag is needed.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Map, Value};

/// Key fields as given on the command line.
#[derive(Debug, Default)]
pub struct KeyFields {
    pub user: Option<String>,
    pub team: Option<String>,
    pub models: Option<String>,
    pub budget: Option<String>,
    pub period: Option<String>,
    pub rpm: Option<u32>,
    pub input_tpm: Option<u64>,
    pub output_tpm: Option<u64>,
    pub concurrency: Option<u32>,
    pub expires: Option<String>,
    pub meta: Vec<String>,
}

impl KeyFields {
    /// The JSON body of a create or update call: only the fields given. For an update,
    /// `current` is the key as it is: limits and budget fields not given keep their values
    /// (the API replaces `limits` and `budget` whole).
    fn to_json(&self, current: Option<&Value>) -> Result<Map<String, Value>, String> {
        let mut m = Map::new();
        if let Some(u) = &self.user {
            m.insert("user".into(), json!(u));
        }
        if let Some(t) = &self.team {
            m.insert("team".into(), json!(t));
        }
        if let Some(models) = &self.models {
            let list: Vec<&str> = models.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            m.insert("models".into(), if list.is_empty() { Value::Null } else { json!(list) });
        }
        let current_budget = current.map(|k| &k["budget"]).filter(|b| b.is_object());
        match (&self.budget, &self.period) {
            (Some(b), _) if b == "none" => {
                m.insert("budget".into(), Value::Null);
            }
            (Some(b), period) => {
                let usd: f64 = b.parse().map_err(|_| format!("--budget {b:?} is not a USD amount"))?;
                let period = match (period, current_budget) {
                    (Some(p), _) => json!(p),
                    (None, Some(cur)) => cur["period"].clone(),
                    (None, None) => json!("monthly"),
                };
                m.insert("budget".into(), json!({ "usd": usd, "period": period }));
            }
            (None, Some(p)) => {
                let cur = current_budget.ok_or("--period needs --budget: the key has no budget")?;
                m.insert("budget".into(), json!({ "usd": cur["usd"], "period": p }));
            }
            (None, None) => {}
        }
        let mut limits = current.and_then(|k| k["limits"].as_object().cloned()).unwrap_or_default();
        let given =
            [self.rpm.is_some(), self.input_tpm.is_some(), self.output_tpm.is_some(), self.concurrency.is_some()];
        for (name, v) in [
            ("rpm", self.rpm.map(u64::from)),
            ("input_tpm", self.input_tpm),
            ("output_tpm", self.output_tpm),
            ("concurrency", self.concurrency.map(u64::from)),
        ] {
            if let Some(v) = v {
                limits.insert(name.into(), json!(v));
            }
        }
        if given.contains(&true) {
            m.insert("limits".into(), Value::Object(limits));
        }
        if let Some(e) = &self.expires {
            m.insert("expires".into(), if e == "never" { Value::Null } else { json!(e) });
        }
        if !self.meta.is_empty() {
            let mut meta = Map::new();
            for kv in &self.meta {
                let (k, v) = kv.split_once('=').ok_or_else(|| format!("--meta {kv:?}: write name=value"))?;
                meta.insert(k.into(), json!(v));
            }
            m.insert("metadata".into(), Value::Object(meta));
        }
        Ok(m)
    }
}

/// One admin operation.
pub enum Call {
    ListKeys,
    CreateKey {
        id: Option<String>,
        fields: KeyFields,
    },
    ShowKey(String),
    UpdateKey {
        id: String,
        fields: KeyFields,
    },
    /// `disable`, `enable` or `rotate`.
    KeyAction(String, &'static str),
    DeleteKey(String),
    Usage(Vec<(String, String)>),
    Budgets,
    Reload,
    /// People signed in through the identity provider.
    People,
    /// `revoke`, `disable` or `enable` a person.
    PersonAction(String, &'static str),
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Runs `call` against the admin API and returns what to print.
pub fn run(config_path: &Path, admin_url: Option<&str>, raw_json: bool, call: Call) -> Result<String, String> {
    let (base, token) = endpoint(config_path, admin_url)?;
    let (method, path, body) = match &call {
        Call::ListKeys => (reqwest::Method::GET, "/admin/keys".to_string(), None),
        Call::CreateKey { id, fields } => {
            let mut body = fields.to_json(None)?;
            if let Some(id) = id {
                body.insert("id".into(), json!(id));
            }
            (reqwest::Method::POST, "/admin/keys".into(), Some(Value::Object(body)))
        }
        Call::ShowKey(id) => (reqwest::Method::GET, format!("/admin/keys/{}", enc(id)), None),
        Call::UpdateKey { id, fields } => {
            let current = request(&base, &token, reqwest::Method::GET, &format!("/admin/keys/{}", enc(id)), None)?;
            let body = Value::Object(fields.to_json(Some(&current))?);
            (reqwest::Method::PATCH, format!("/admin/keys/{}", enc(id)), Some(body))
        }
        Call::KeyAction(id, action) => (reqwest::Method::POST, format!("/admin/keys/{}/{action}", enc(id)), None),
        Call::DeleteKey(id) => (reqwest::Method::DELETE, format!("/admin/keys/{}", enc(id)), None),
        Call::Usage(q) => {
            let query: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(q).finish();
            (reqwest::Method::GET, format!("/admin/usage?{query}"), None)
        }
        Call::Budgets => (reqwest::Method::GET, "/admin/budgets".into(), None),
        Call::Reload => (reqwest::Method::POST, "/admin/reload".into(), None),
        Call::People => (reqwest::Method::GET, "/admin/people".into(), None),
        Call::PersonAction(user, action) => {
            (reqwest::Method::POST, format!("/admin/people/{}/{action}", enc(user)), None)
        }
    };
    let value = request(&base, &token, method, &path, body.as_ref())?;
    if raw_json {
        return Ok(serde_json::to_string_pretty(&value).expect("JSON values serialize") + "\n");
    }
    Ok(match call {
        Call::ListKeys => keys_table(value["keys"].as_array().map(Vec::as_slice).unwrap_or_default()),
        Call::CreateKey { .. } | Call::KeyAction(_, "rotate") => {
            let mut out = key_detail(&value);
            let _ = writeln!(out, "\nsecret: {}", value["secret"].as_str().unwrap_or("?"));
            out + "Give the secret to its owner now: it is not shown again.\n"
        }
        Call::ShowKey(_) | Call::UpdateKey { .. } | Call::KeyAction(..) => key_detail(&value),
        Call::DeleteKey(id) => format!("deleted key {id}\n"),
        Call::Usage(_) => usage_table(&value),
        Call::Budgets => budgets_table(value["budgets"].as_array().map(Vec::as_slice).unwrap_or_default()),
        Call::Reload => "reloaded\n".into(),
        Call::People => people_table(value["people"].as_array().map(Vec::as_slice).unwrap_or_default()),
        Call::PersonAction(user, action) => {
            format!("{user}: {action}d, {} sign-ins revoked\n", value["sessions_revoked"].as_u64().unwrap_or(0))
        }
    })
}

/// One call; a non-2xx answer becomes `"<status> <message>"`.
fn request(
    base: &str,
    token: &Option<String>,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let (status, value) = rt.block_on(async {
        let client = http_client()?;
        let mut req = client.request(method, format!("{base}{path}")).timeout(std::time::Duration::from_secs(30));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| format!("cannot reach the admin API at {base}: {e}"))?;
        let status = resp.status();
        let value: Value = resp.json().await.map_err(|e| format!("the admin API sent no JSON: {e}"))?;
        Ok::<_, String>((status, value))
    })?;
    if !status.is_success() {
        let msg = value["error"]["message"].as_str().unwrap_or("no message");
        return Err(format!("{} {msg}", status.as_u16()));
    }
    Ok(value)
}

/// The client for the admin API. For an admin listener with TLS, `TOLLGATE_ADMIN_CA` names the
/// PEM file of the CA to trust (when it is not a public one), and `TOLLGATE_ADMIN_CLIENT_CERT`
/// a PEM file with the client certificate and its key, for one that requires them (mTLS).
fn http_client() -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    if let Some(path) = std::env::var_os("TOLLGATE_ADMIN_CA") {
        let pem = std::fs::read(&path).map_err(|e| format!("TOLLGATE_ADMIN_CA {}: {e}", path.to_string_lossy()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("TOLLGATE_ADMIN_CA {}: {e}", path.to_string_lossy()))?;
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    if let Some(path) = std::env::var_os("TOLLGATE_ADMIN_CLIENT_CERT") {
        let pem =
            std::fs::read(&path).map_err(|e| format!("TOLLGATE_ADMIN_CLIENT_CERT {}: {e}", path.to_string_lossy()))?;
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("TOLLGATE_ADMIN_CLIENT_CERT {}: {e}", path.to_string_lossy()))?;
        builder = builder.identity(identity);
    }
    builder.build().map_err(|e| format!("cannot build the admin API client: {e}"))
}

/// The admin API's URL and token: flags and environment first, then the config file.
fn endpoint(config_path: &Path, admin_url: Option<&str>) -> Result<(String, Option<String>), String> {
    let loaded = crate::config::load(config_path);
    // Without a URL the config is needed, and why it cannot be read is the error to show.
    let config = match (&loaded, admin_url) {
        (Err(e), None) => return Err(format!("no --admin-url given, and the config cannot be read: {e}")),
        _ => loaded.ok(),
    };
    let base = match admin_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let admin = config
                .as_ref()
                .and_then(|c| c.admin.as_ref())
                .ok_or_else(|| format!("no --admin-url given and {} has no [admin] section", config_path.display()))?;
            let scheme = if admin.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", admin.address.get_ref())
        }
    };
    let token = match std::env::var("TOLLGATE_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
        _ => match config.as_ref().and_then(|c| c.admin.as_ref()).and_then(|a| a.token.as_ref()) {
            Some(r) => Some(r.get_ref().resolve().map_err(|e| format!("admin.token: {e}"))?.expose().to_string()),
            None => None,
        },
    };
    Ok((base, token))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(header.to_vec(), &mut out);
    for r in &rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn budget_cell(status: &Value) -> String {
    let b = &status["budget"];
    if b.is_null() {
        return "-".into();
    }
    format!("${} of ${} {}", text(&b["spent_usd"]), text(&b["limit_usd"]), text(&b["period"]))
}

fn keys_table(keys: &[Value]) -> String {
    let rows = keys
        .iter()
        .map(|k| {
            vec![
                text(&k["id"]),
                text(&k["source"]),
                text(&k["user"]),
                text(&k["team"]),
                text(&k["models"]),
                budget_cell(&k["status"]),
                if k["disabled"].as_bool() == Some(true) { "disabled".into() } else { "active".into() },
            ]
        })
        .collect();
    table(&["ID", "SOURCE", "USER", "TEAM", "MODELS", "SPENT", "STATE"], rows)
}

fn key_detail(k: &Value) -> String {
    let mut out = String::new();
    for field in ["id", "source", "user", "team", "models", "expires", "disabled", "created", "updated"] {
        if let Some(v) = k.get(field) {
            let _ = writeln!(out, "{field:<9} {}", text(v));
        }
    }
    let _ = writeln!(out, "{:<9} {}", "budget", budget_cell(&k["status"]));
    if let Some(l) = k["limits"].as_object().filter(|l| !l.is_empty()) {
        let parts: Vec<String> = l.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let _ = writeln!(out, "{:<9} {}", "limits", parts.join(" "));
    }
    if let Some(m) = k["metadata"].as_object().filter(|m| !m.is_empty()) {
        let _ = writeln!(out, "{:<9} {}", "metadata", Value::Object(m.clone()));
    }
    out
}

fn usage_table(v: &Value) -> String {
    let groups: Vec<String> = v["group_by"].as_array().map(|g| g.iter().map(text).collect()).unwrap_or_default();
    let mut header: Vec<String> = groups.iter().map(|g| g.to_uppercase()).collect();
    header.extend(
        ["REQUESTS", "INPUT", "OUTPUT", "CACHE READ", "CACHE WRITE", "COST USD", "ESTIMATED"].map(String::from),
    );
    let rows: Vec<Vec<String>> = v["rows"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let mut row: Vec<String> = groups.iter().map(|g| text(&r["group"][g])).collect();
            let n = |f: &str| r[f].as_u64().unwrap_or(0);
            row.extend([
                n("requests").to_string(),
                n("input_tokens").to_string(),
                n("output_tokens").to_string(),
                n("cache_read_tokens").to_string(),
                (n("cache_write_5m_tokens") + n("cache_write_1h_tokens")).to_string(),
                text(&r["cost_usd"]),
                n("estimated").to_string(),
            ]);
            row
        })
        .collect();
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut out = table(&header_refs, rows);
    let _ = writeln!(out, "total: ${} (days in {})", text(&v["total_cost_usd"]), text(&v["time_zone"]));
    out
}

fn people_table(people: &[Value]) -> String {
    let rows = people
        .iter()
        .map(|p| {
            let live = p["sessions"].as_array().map_or(0, |s| s.iter().filter(|s| s["revoked_ms"].is_null()).count());
            let groups: Vec<&str> = p["groups"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            vec![
                text(&p["user"]),
                text(&p["team"]),
                groups.join(","),
                live.to_string(),
                if p["disabled"].as_bool() == Some(true) { "yes".into() } else { "no".into() },
                p["last_seen_ms"]
                    .as_i64()
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(&["USER", "TEAM", "GROUPS", "SIGN-INS", "DISABLED", "LAST SEEN"], rows)
}

fn budgets_table(list: &[Value]) -> String {
    let rows = list
        .iter()
        .map(|b| {
            let d = &b["budget"];
            vec![
                text(&b["scope"]),
                text(&b["id"]),
                text(&d["period"]),
                format!("${}", text(&d["limit_usd"])),
                format!("${}", text(&d["spent_usd"])),
                format!("${}", text(&d["reserved_usd"])),
                format!("${}", text(&d["remaining_usd"])),
                text(&d["resets_at"]),
            ]
        })
        .collect();
    table(&["SCOPE", "ID", "PERIOD", "LIMIT", "SPENT", "RESERVED", "REMAINING", "RESETS"], rows)
}
