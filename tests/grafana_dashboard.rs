//! The Grafana dashboard shipped in `contrib/grafana/tollgate.json` asks only for what the gateway
//! really exports. The real binary runs against mock providers and gets the traffic that makes
//! every labelled metric the dashboard uses appear (a vector with no sample yet is not in a
//! scrape at all); then every `tollgate_…` name in every query of the dashboard (panel targets and
//! template variables) must be in the scrape, and every label a query matches or groups on must be
//! on the metrics it queries. The dashboard's shape (panels with a position, the `${datasource}`
//! data source and at least one query) is checked too.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Every deployment serves this id, priced below, so the team's budget admits every request.
const MODEL_ID: &str = "claude-sonnet-4-5-20250929";

/// Labels Prometheus adds to every series it scrapes: the gateway does not export them, but a
/// query may group on them.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// Metrics the dashboard must show at least once, one per area.
const AREAS: &[&str] = &[
    "tollgate_cost_usd_total",
    "tollgate_tokens_total",
    "tollgate_request_duration_seconds_bucket",
    "tollgate_upstream_errors_total",
    "tollgate_budget_remaining_usd",
    "tollgate_endpoint_up",
];

fn dashboard() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/tollgate.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every query text in `v`, wherever it is nested: targets' `expr`, and template variables'
/// `query` and `definition` (a string, or an object holding one).
fn queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                if matches!(k.as_str(), "expr" | "query" | "definition") {
                    if let Value::String(s) = x {
                        out.push(s.clone());
                    }
                }
                queries(x, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|x| queries(x, out)),
        _ => {}
    }
}

/// Every panel, those inside collapsed rows included.
fn all_panels(panels: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in panels {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(all_panels(inner));
        }
    }
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The length of the metric or label name at the start of `s`.
fn name_len(s: &str) -> usize {
    s.find(|c: char| !is_name_char(c)).unwrap_or(s.len())
}

/// For `s` starting with `open`: the text up to the matching `close`, and what follows it.
/// Quoted strings are skipped.
fn enclosed(s: &str, open: char, close: char) -> Option<(&str, &str)> {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            quote = Some(c);
        } else if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return Some((&s[open.len_utf8()..i], &s[i + close.len_utf8()..]));
            }
        }
    }
    None
}

/// `s` split at each comma outside quotes, braces, brackets and parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut depth = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The label names of the matchers (or of the exposition's `name="value"` pairs) inside braces.
fn label_names(inner: &str) -> Vec<String> {
    split_top(inner)
        .into_iter()
        .map(str::trim)
        .map(|m| m[..name_len(m)].to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The metric names of a text exposition (from `# TYPE` lines and samples), each with the label
/// names its samples carry.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                out.entry(name.to_string()).or_default();
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = name_len(line);
        let labels = out.entry(line[..end].to_string()).or_default();
        if line[end..].starts_with('{') {
            let (inner, _) = enclosed(&line[end..], '{', '}').unwrap_or_else(|| panic!("unterminated labels: {line}"));
            labels.extend(label_names(inner));
        }
    }
    out
}

/// The labels of `name` if the scrape has it: a name it exports, or a histogram's base name
/// whose `_bucket` series it exports.
fn known(exported: &BTreeMap<String, BTreeSet<String>>, name: &str) -> Option<BTreeSet<String>> {
    let bucket = exported.get(&format!("{name}_bucket"));
    let own = exported.get(name);
    if bucket.is_none() && own.is_none() {
        return None;
    }
    Some(bucket.into_iter().chain(own).flatten().cloned().collect())
}

/// What one query asks of the scrape.
#[derive(Debug, Default, PartialEq)]
struct Asks {
    /// Each `tollgate_…` name, with the label names its selector matches on.
    selectors: Vec<(String, Vec<String>)>,
    /// Label names a query groups on (`by (…)`, `without (…)`) or lists (`label_values`), with
    /// the metric they must be on when the query names it (label_values), else None: on one of
    /// the query's metrics.
    labels: Vec<(String, Option<String>)>,
}

/// Starts of the whole-word occurrences of `word` in `q`.
fn words<'a>(q: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    q.match_indices(word).map(|(i, _)| i).filter(move |&i| {
        let before = q[..i].chars().next_back().is_none_or(|c| !is_name_char(c));
        let after = q[i + word.len()..].chars().next().is_none_or(|c| !is_name_char(c));
        before && after
    })
}

fn asks(q: &str) -> Asks {
    let mut a = Asks::default();
    for (i, _) in q.match_indices("tollgate_") {
        if q[..i].chars().next_back().is_some_and(is_name_char) {
            continue;
        }
        let name = &q[i..i + name_len(&q[i..])];
        let rest = q[i + name.len()..].trim_start();
        let matchers = if rest.starts_with('{') {
            let (inner, _) = enclosed(rest, '{', '}').unwrap_or_else(|| panic!("unterminated selector in {q}"));
            label_names(inner)
        } else {
            Vec::new()
        };
        a.selectors.push((name.to_string(), matchers));
    }
    for word in ["by", "without"] {
        for i in words(q, word) {
            let rest = q[i + word.len()..].trim_start();
            if !rest.starts_with('(') {
                continue;
            }
            let (inner, _) = enclosed(rest, '(', ')').unwrap_or_else(|| panic!("unterminated {word} (…) in {q}"));
            for label in split_top(inner).into_iter().map(str::trim).filter(|l| !l.is_empty()) {
                a.labels.push((label.to_string(), None));
            }
        }
    }
    for i in words(q, "label_values") {
        let rest = q[i + "label_values".len()..].trim_start();
        let (inner, _) = enclosed(rest, '(', ')').unwrap_or_else(|| panic!("unterminated label_values in {q}"));
        let args = split_top(inner);
        match args.as_slice() {
            [selector, label] => {
                let selector = selector.trim();
                let metric = &selector[..name_len(selector)];
                a.labels.push((label.trim().to_string(), Some(metric.to_string())));
            }
            [label] => a.labels.push((label.trim().to_string(), None)),
            _ => panic!("label_values with {} arguments: {q}", args.len()),
        }
    }
    a
}

/// What in `queries` the scrape does not have, one line each.
fn unmet(queries: &[String], exported: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut problems = Vec::new();
    for q in queries {
        let a = asks(q);
        let mut on_query: BTreeSet<String> = BTreeSet::new();
        for (name, matchers) in &a.selectors {
            let Some(labels) = known(exported, name) else {
                problems.push(format!("{name} is not exported (query: {q})"));
                continue;
            };
            for m in matchers {
                if !labels.contains(m) && !TARGET_LABELS.contains(&m.as_str()) {
                    problems.push(format!("{name} has no label {m} (query: {q})"));
                }
            }
            on_query.extend(labels);
        }
        for (label, metric) in &a.labels {
            let ok = TARGET_LABELS.contains(&label.as_str())
                || match metric {
                    Some(m) => known(exported, m).is_some_and(|ls| ls.contains(label)),
                    None if a.selectors.is_empty() => exported.values().any(|ls| ls.contains(label)),
                    None => on_query.contains(label),
                };
            if !ok {
                problems.push(format!("label {label} is on none of the metrics the query reads (query: {q})"));
            }
        }
    }
    problems
}

/// Sends `request` as it is on a connection of its own and returns all the gateway answers.
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a Messages request for `model`: the status and the body.
async fn send(gw: &Gateway, key: &TestKey, model: &str, stream: bool) -> (u16, String) {
    let resp = messages_request(gw, key).body(messages_body(model, stream, 10)).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[test]
fn the_query_reader_finds_names_matchers_and_grouping() {
    let q = r#"histogram_quantile(0.95, sum by (le, model) (rate(tollgate_x_bucket{model=~"a,b}", team="t"}[5m]))) / on() tollgate_y"#;
    let a = asks(q);
    let selectors: Vec<(String, Vec<String>)> =
        vec![("tollgate_x_bucket".into(), vec!["model".into(), "team".into()]), ("tollgate_y".into(), Vec::new())];
    assert_eq!(a.selectors, selectors);
    let labels: Vec<(String, Option<String>)> = vec![("le".into(), None), ("model".into(), None)];
    assert_eq!(a.labels, labels);
    let a = asks(r#"label_values(tollgate_requests_total{team=~"$team"}, model)"#);
    let selectors: Vec<(String, Vec<String>)> = vec![("tollgate_requests_total".into(), vec!["team".into()])];
    assert_eq!(a.selectors, selectors);
    let labels: Vec<(String, Option<String>)> = vec![("model".into(), Some("tollgate_requests_total".into()))];
    assert_eq!(a.labels, labels);

    let scrape = "# HELP tollgate_h h\n# TYPE tollgate_h histogram\n\
                  tollgate_h_bucket{le=\"0.5\",model=\"m,\\\"x}\"} 1\ntollgate_h_sum{model=\"m\"} 0.1\n\
                  tollgate_h_count{model=\"m\"} 1\n# TYPE tollgate_g gauge\ntollgate_g 0\n";
    let e = exported(scrape);
    let bucket_labels: BTreeSet<String> = ["le".to_string(), "model".to_string()].into_iter().collect();
    assert_eq!(e["tollgate_h_bucket"], bucket_labels);
    assert!(known(&e, "tollgate_h").is_some_and(|l| l.contains("le")));
    assert!(known(&e, "tollgate_h_sum").is_some());
    assert!(known(&e, "tollgate_g").is_some() && known(&e, "tollgate_absent").is_none());
    let qs = |q: &str| vec![q.to_string()];
    assert!(unmet(&qs("sum by (model) (rate(tollgate_h_sum[5m]))"), &e).is_empty());
    assert!(unmet(&qs("sum by (instance) (tollgate_g)"), &e).is_empty());
    assert_eq!(unmet(&qs("tollgate_absent"), &e).len(), 1);
    assert_eq!(unmet(&qs("tollgate_g{team=\"t\"}"), &e).len(), 1);
    assert_eq!(unmet(&qs("sum by (team) (tollgate_g)"), &e).len(), 1);
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["id"], Value::Null);
    assert_eq!(d["uid"], "tollgate");
    assert_eq!(d["title"], "Tollgate");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", d["schemaVersion"]);

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no variable {name}"));
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let datasource = json!({"type": "prometheus", "uid": "${datasource}"});
    for name in ["team", "model"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"], datasource, "{name}");
        let mut q = Vec::new();
        queries(v, &mut q);
        assert!(
            q.iter().any(|q| q.starts_with("label_values(tollgate_requests_total") && q.contains(name)),
            "{name}: {q:?}"
        );
    }

    let panels = all_panels(d["panels"].as_array().expect("panels"));
    assert!(panels.len() > 10, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no numeric id"));
        assert!(ids.insert(id), "{title}: id {id} used twice");
        let g = &p["gridPos"];
        let [h, w, x, _y] =
            ["h", "w", "x", "y"].map(|k| g[k].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{k}")));
        assert!(h > 0 && w > 0 && x + w <= 24, "{title}: gridPos {g}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], datasource, "{title}: data source");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert!(t["refId"].as_str().is_some_and(|r| !r.is_empty()), "{title}: a target without refId");
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{title}: a target without expr");
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"], datasource, "{title}: target data source");
            }
        }
    }

    let mut qs = Vec::new();
    queries(&d, &mut qs);
    let used: BTreeSet<String> = qs.iter().flat_map(|q| asks(q).selectors).map(|(name, _)| name).collect();
    for area in AREAS {
        assert!(used.contains(*area), "the dashboard does not use {area}; it uses {used:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_an_exported_metric() {
    // Every token class, so every class of tollgate_tokens_total has a sample.
    let usage = MockUsage {
        input_tokens: 25,
        output_tokens: 15,
        cache_read_input_tokens: 4000,
        cache_creation_5m_input_tokens: 100,
        cache_creation_1h_input_tokens: 200,
        ..Default::default()
    };
    let good = MockProvider::start(Behavior { usage, ..Behavior::default() }).await.unwrap();
    // Answers 429: its endpoint cools down at once and the request falls back to `mock`.
    let busy = MockProvider::start(Behavior { status: Some(429), ..Behavior::default() }).await.unwrap();
    // Nobody listens there: a connect error.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (alice, limited) = (new_key(), new_key());
    let config = format!(
        r#"
[[provider]]
name = "mock"
kind = "anthropic"
base_url = "{good}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[provider]]
name = "busy"
kind = "anthropic"
base_url = "{busy}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[provider]]
name = "dead"
kind = "anthropic"
base_url = "{closed}"
credential = "env:TG_TEST_PROVIDER_KEY"
health = {{ probe = "none" }}

[[model]]
name = "claude-sonnet-4-5"
deployments = [{{ provider = "mock", model = "{MODEL_ID}" }}]

[[model]]
name = "fallback"
deployments = [{{ provider = "busy", model = "{MODEL_ID}" }}, {{ provider = "mock", model = "{MODEL_ID}" }}]

[[model]]
name = "unreachable"
deployments = [{{ provider = "dead", model = "{MODEL_ID}" }}]

[[team]]
id = "platform"
budget = {{ usd = 100.0, period = "daily" }}
limits = {{ rpm = 1000 }}

[[key]]
id = "alice"
hash = "{alice}"
team = "platform"

[[key]]
id = "limited"
hash = "{limited}"
limits = {{ rpm = 1 }}

[[price]]
match = "{MODEL_ID}"
input = 3.0
output = 15.0
cache_read = 0.3
cache_write_5m = 3.75
cache_write_1h = 6.0
"#,
        good = good.url(),
        busy = busy.url(),
        alice = alice.hash,
        limited = limited.hash,
    );
    let gw = start_gateway(&config);

    // Requests, tokens, cost, duration and time to first byte, streamed and not, for a team.
    for stream in [false, true] {
        let (status, body) = send(&gw, &alice, "claude-sonnet-4-5", stream).await;
        assert_eq!(status, 200, "{body}");
    }
    // A 429 from `busy`: a cool-down, a retried attempt, and a fallback answered by `mock`.
    let (status, body) = send(&gw, &alice, "fallback", false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(busy.received().len(), 1, "the first deployment was tried");
    // A connect error: an upstream error and a failed attempt.
    let (status, body) = send(&gw, &alice, "unreachable", false).await;
    assert!(status >= 500, "{status}: {body}");
    // A rate limit refusal.
    assert_eq!(send(&gw, &limited, "claude-sonnet-4-5", false).await.0, 200);
    let (status, body) = send(&gw, &limited, "claude-sonnet-4-5", false).await;
    assert_eq!(status, 429, "{body}");
    // A client refusal: CONNECT is refused before it is a request.
    let port = gw.port;
    let answer = tokio::task::spawn_blocking(move || {
        raw(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");

    let dashboard = dashboard();
    let mut qs = Vec::new();
    queries(&dashboard, &mut qs);
    let wanted: BTreeSet<String> = qs.iter().flat_map(|q| asks(q).selectors).map(|(name, _)| name).collect();
    assert!(wanted.len() >= AREAS.len(), "the dashboard's queries name only {wanted:?}");

    // Metrics are counted as each request ends, just after its answer: wait until the scrape has
    // everything (or give up and report what is missing).
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, scrape) = loop {
        let text = c.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        let scrape = exported(&text);
        let complete = wanted.iter().all(|n| known(&scrape, n).is_some()) && unmet(&qs, &scrape).is_empty();
        if complete || Instant::now() > deadline {
            break (text, scrape);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The traffic above did what it is there for (else a failure below would blame the dashboard).
    let has = |prefix: &str, part: &str| text.lines().any(|l| l.starts_with(prefix) && l.contains(part));
    assert!(has("tollgate_fallbacks_total{", "model=\"fallback\""), "{text}");
    assert!(has("tollgate_endpoint_cooldowns_total{", "provider=\"busy\""), "{text}");
    assert!(has("tollgate_upstream_errors_total{", "kind=\"connect_error\",provider=\"dead\""), "{text}");
    assert!(has("tollgate_refused_total{", "reason=\"rpm\""), "{text}");
    assert!(has("tollgate_client_refused_total{", "reason=\"connect\""), "{text}");
    assert!(has("tollgate_budget_remaining_usd{", "id=\"platform\",scope=\"team\""), "{text}");
    assert!(has("tollgate_rate_limit_remaining{", "limit=\"rpm\""), "{text}");
    assert!(has("tollgate_tokens_total{", "class=\"cache_write_5m\""), "{text}");

    let problems = unmet(&qs, &scrape);
    assert!(
        problems.is_empty(),
        "the dashboard asks for what the gateway does not export:\n{}\n\nscrape:\n{text}",
        problems.join("\n")
    );
}
