//! Spend alerts: a thread of its own looks at every budget every `alerts.check_every` and
//! calls the configured webhooks when one crosses a threshold (50, 80, 100 % of its limit) or
//! is on course to run out before its period ends.
//!
//! Each alert fires once per budget, period and threshold: the store claims it (a row with a
//! primary key), so in a fleet only the first gateway to see it sends it, and a restart does
//! not send it again. Delivery is retried with backoff until every webhook took it; an alert
//! claimed but not delivered when the gateway stopped is sent by the next start. None of this
//! runs on the request path: the thread reads the limiter's counts as the admin API does.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::{rfc3339, WebhookFormat};
use crate::limits::{now_ms, Scope, ScopeStatus};
use crate::metering::usd;
use crate::runtime::Runtime;
use crate::store::AlertMark;

/// The first retry of a failed delivery, doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// One webhook call may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A projection needs this share of the period behind it: one early request is no trend.
const PROJECT_AFTER: f64 = 0.05;
/// A claim not renewed for this long belongs to a gateway that stopped (or lost its webhooks
/// that long): another takes the alert over. Retries renew it; the longest backoff is shorter.
const LEASE_MS: i64 = 180_000;
/// Undelivered alerts older than this are not taken over: news a week old is no alert.
const MAX_AGE_MS: i64 = 7 * 86_400_000;
/// Alerts remembered as claimed; past it the memory is cleared and the store answers again.
const MAX_KNOWN: usize = 100_000;

/// An alert on its way: the webhooks (by index) that have not taken it yet.
struct Delivery {
    mark: AlertMark,
    waiting: Vec<usize>,
    backoff: Duration,
    next: Instant,
}

/// The alerts thread; [`Alerts::shutdown`] releases what it has not delivered.
pub struct Alerts {
    stopping: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Alerts {
    /// Stops the thread after its current webhook call; alerts it could not deliver are
    /// released in the store, for the next gateway to start (or any other) to send at once.
    pub fn shutdown(self) {
        self.stopping.store(true, Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

pub fn start(runtime: Arc<Runtime>) -> std::io::Result<Alerts> {
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = stopping.clone();
    let thread = crate::background::spawn("tollgate-alerts", move || run(&runtime, &stop))?;
    Ok(Alerts { stopping, thread })
}

fn run(runtime: &Runtime, stopping: &AtomicBool) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "spend alerts cannot start");
            return;
        }
    };
    // No redirects: a webhook that moved answers 3xx, which is a failed delivery to fix, not a
    // reason to post the alert somewhere else.
    let http =
        match reqwest::Client::builder().timeout(CALL_TIMEOUT).redirect(reqwest::redirect::Policy::none()).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "spend alerts cannot build an HTTP client");
                return;
            }
        };
    // What this gateway knows to be claimed already (by it or another): no store round trip
    // for it again.
    let mut known: HashSet<(String, String, i64, String)> = HashSet::new();
    let mut deliveries: Vec<Delivery> = Vec::new();
    loop {
        let config = runtime.config();
        let alerts = &config.alerts;
        let webhooks = alerts.webhooks.len();
        if webhooks > 0 {
            let now = now_ms();
            if known.len() > MAX_KNOWN {
                known.clear();
            }
            // Alerts a stopped gateway claimed and never delivered.
            match runtime.store.reclaim_alerts(now - LEASE_MS, now - MAX_AGE_MS) {
                Ok(marks) => {
                    for mark in marks {
                        if !deliveries.iter().any(|d| d.mark == mark) {
                            tracing::info!(alert = %mark.alert, scope = %mark.scope, id = %mark.id, "taking over an undelivered spend alert");
                            known.insert(key_of(&mark));
                            deliveries.push(Delivery::new(mark, webhooks));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot look for undelivered alerts; trying again"),
            }
            for scope in runtime.scopes() {
                if scope.policy.budget.is_none() || !alerts.scopes.iter().any(|s| s == scope.kind.name()) {
                    continue;
                }
                let status = runtime.limiter_status(&scope);
                for mark in due(&scope, &status, &alerts.thresholds, alerts.projected, now) {
                    if !known.insert(key_of(&mark)) {
                        continue;
                    }
                    match runtime.store.claim_alert(&mark) {
                        Ok(true) => {
                            tracing::info!(scope = %scope, alert = %mark.alert, "spend alert");
                            deliveries.push(Delivery::new(mark, webhooks));
                        }
                        Ok(false) => {}
                        Err(e) => {
                            // Not claimed: look again next pass.
                            known.remove(&key_of(&mark));
                            tracing::warn!(scope = %scope, error = %e, "cannot record a spend alert; trying again");
                        }
                    }
                }
            }
            rt.block_on(deliver(runtime, &http, &config.alerts.webhooks, &mut deliveries));
        }
        let wait = deliveries
            .iter()
            .map(|d| d.next.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(alerts.check_every)
            .min(alerts.check_every);
        drop(config);
        std::thread::park_timeout(wait.max(Duration::from_millis(50)));
        if stopping.load(Ordering::Acquire) {
            for d in &deliveries {
                if let Err(e) = runtime.store.renew_alert(&d.mark, 0) {
                    tracing::warn!(error = %e, alert = %d.mark.alert, "cannot release an undelivered alert; another gateway takes it over when its claim expires");
                }
            }
            return;
        }
    }
}

impl Delivery {
    fn new(mark: AlertMark, webhooks: usize) -> Self {
        Delivery { mark, waiting: (0..webhooks).collect(), backoff: FIRST_BACKOFF, next: Instant::now() }
    }
}

fn key_of(m: &AlertMark) -> (String, String, i64, String) {
    (m.scope.clone(), m.id.clone(), m.period_start_ms, m.alert.clone())
}

/// The alerts `status` calls for now: each threshold reached, and the projection.
fn due(scope: &Scope, status: &ScopeStatus, thresholds: &[u32], projected: bool, now: i64) -> Vec<AlertMark> {
    let (Some(limit), Some(start)) = (status.limit_nanos, status.period_start_ms) else { return Vec::new() };
    if limit == 0 {
        return Vec::new();
    }
    let spent = status.spent_nanos;
    let base = json!({
        "type": "tollgate.spend_alert",
        "scope": scope.kind.name(),
        "id": &*scope.id,
        "spent_usd": usd(spent),
        "limit_usd": usd(limit),
        "spent_percent": (spent as f64 * 100.0 / limit as f64 * 10.0).round() / 10.0,
        "period": status.period,
        "period_start": rfc3339(start),
        "resets_at": status.resets_at_ms.map(rfc3339),
        "at": rfc3339(now),
    });
    let mark = |alert: String, extra: serde_json::Value| {
        let mut doc = base.clone();
        doc["alert"] = json!(alert);
        if let (Some(doc), serde_json::Value::Object(extra)) = (doc.as_object_mut(), extra) {
            doc.extend(extra);
        }
        AlertMark {
            scope: scope.kind.name().to_string(),
            id: scope.id.to_string(),
            period_start_ms: start,
            // The limit is part of what fired: a limit raised in the period alerts again at
            // its own thresholds.
            alert: format!("{alert} of {limit}"),
            payload: doc.to_string(),
        }
    };
    let mut out = Vec::new();
    for &t in thresholds {
        if u128::from(spent) * 100 >= u128::from(limit) * u128::from(t) {
            out.push(mark(format!("{t}%"), json!({ "threshold_percent": t })));
        }
    }
    if let (true, Some(end)) = (projected && spent < limit, status.resets_at_ms) {
        let (elapsed, length) = (now - start, end - start);
        if spent > 0 && length > 0 && elapsed as f64 >= length as f64 * PROJECT_AFTER {
            // In floating point: a tiny spend against a large budget runs out in more
            // milliseconds than an i64 holds.
            let per_ms = spent as f64 / elapsed as f64;
            let exhausted_at = now as f64 + (limit - spent) as f64 / per_ms;
            if exhausted_at < end as f64 {
                let at = rfc3339(exhausted_at as i64);
                out.push(mark("projected".into(), json!({ "projected_exhaustion": at })));
            }
        }
    }
    out
}

/// Tries every delivery whose time has come; the ones done leave the list.
async fn deliver(
    runtime: &Runtime,
    http: &reqwest::Client,
    webhooks: &[crate::config::WebhookConfig],
    deliveries: &mut Vec<Delivery>,
) {
    let now = Instant::now();
    for d in deliveries.iter_mut().filter(|d| d.next <= now) {
        let mut still = Vec::new();
        for &i in &d.waiting {
            // The list changed under a reload: a webhook gone is not waited for.
            let Some(hook) = webhooks.get(i) else { continue };
            match send(http, hook, &d.mark).await {
                Ok(()) => runtime.metrics.alerts.with_label_values(&["sent"]).inc(),
                Err(why) => {
                    runtime.metrics.alerts.with_label_values(&["failed_attempt"]).inc();
                    tracing::warn!(alert = %d.mark.alert, scope = %d.mark.scope, id = %d.mark.id, retry_in = ?d.backoff, "webhook not delivered: {why}");
                    still.push(i);
                }
            }
        }
        d.waiting = still;
        if !d.waiting.is_empty() {
            // Still ours: no other gateway takes it over while this one keeps trying.
            if let Err(e) = runtime.store.renew_alert(&d.mark, now_ms()) {
                tracing::warn!(error = %e, "cannot renew the claim on a spend alert");
            }
        }
        if d.waiting.is_empty() {
            if let Err(e) = runtime.store.alert_delivered(&d.mark) {
                tracing::warn!(error = %e, "a delivered alert could not be marked so; a restart sends it again");
            }
        } else {
            d.next = Instant::now() + d.backoff;
            d.backoff = (d.backoff * 2).min(MAX_BACKOFF);
        }
    }
    deliveries.retain(|d| !d.waiting.is_empty());
}

async fn send(http: &reqwest::Client, hook: &crate::config::WebhookConfig, mark: &AlertMark) -> Result<(), String> {
    let url = hook.url.resolve()?;
    let body = match hook.format {
        WebhookFormat::Json => mark.payload.clone(),
        WebhookFormat::Slack => json!({ "text": slack_text(mark) }).to_string(),
    };
    let resp = http
        .post(url.expose())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        // reqwest's error names the URL, which is a secret here.
        .map_err(|e| if e.is_timeout() { "timed out".to_string() } else { "cannot reach the webhook".to_string() })?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the webhook answered {}", resp.status()))
    }
}

/// One line for people: who, how much of what, and when it resets.
fn slack_text(mark: &AlertMark) -> String {
    let doc: serde_json::Value = serde_json::from_str(&mark.payload).unwrap_or_default();
    let s = |k: &str| doc[k].as_str().unwrap_or_default().to_string();
    let who = format!("{} {}", s("scope"), s("id"));
    let period = doc["period"].as_str().map(|p| format!("{p} ")).unwrap_or_default();
    let resets = doc["resets_at"].as_str().map(|r| format!("; it resets {r}")).unwrap_or_default();
    match doc["projected_exhaustion"].as_str() {
        Some(when) => format!(
            "Tollgate: {who} has spent ${} of its ${} {period}budget and, at this rate, runs out {when}{resets}",
            s("spent_usd"),
            s("limit_usd")
        ),
        None => format!(
            "Tollgate: {who} has spent ${} of its ${} {period}budget ({}%, past the {} alert){resets}",
            s("spent_usd"),
            s("limit_usd"),
            doc["spent_percent"],
            s("alert")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Policy, ScopeKind};

    fn status(spent: u64, limit: u64, start: i64, end: i64) -> ScopeStatus {
        ScopeStatus {
            spent_nanos: spent,
            reserved_nanos: 0,
            limit_nanos: Some(limit),
            period: Some("monthly"),
            period_start_ms: Some(start),
            resets_at_ms: Some(end),
            in_flight: 0,
            requests_remaining: None,
            input_tokens_remaining: None,
            output_tokens_remaining: None,
        }
    }

    fn scope() -> Scope {
        Scope { kind: ScopeKind::Team, id: "platform".into(), policy: Policy::default() }
    }

    fn alerts(spent: u64, now: i64) -> Vec<String> {
        due(&scope(), &status(spent, 100, 0, 1000), &[50, 80, 100], true, now)
            .into_iter()
            .map(|m| m.alert.strip_suffix(" of 100").unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_tiny_spend_against_a_huge_budget_projects_nothing() {
        let huge = status(1, u64::MAX / 2, 0, 31_536_000_000);
        assert!(due(&scope(), &huge, &[], true, 31_536_000_000 / 2).is_empty());
    }

    #[test]
    fn thresholds_fire_at_their_share_exactly() {
        assert_eq!(alerts(49, 1000), Vec::<String>::new());
        assert_eq!(alerts(50, 1000), ["50%"]);
        assert_eq!(alerts(80, 1000), ["50%", "80%"]);
        assert_eq!(alerts(100, 1000), ["50%", "80%", "100%"]);
    }

    #[test]
    fn the_projection_needs_a_trend_and_a_shortfall() {
        // 10 % spent in 4 % of the period: too early to say.
        assert_eq!(alerts(10, 40), Vec::<String>::new());
        // 10 % spent in 5 % of the period: at this rate it runs out at half-way.
        assert_eq!(alerts(10, 50), ["projected"]);
        // 40 % in 50 %: on course to end at 80 %.
        assert_eq!(alerts(40, 500), Vec::<String>::new());
        let m = due(&scope(), &status(10, 100, 0, 1000), &[], true, 50).remove(0);
        let doc: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
        assert_eq!(doc["projected_exhaustion"], rfc3339(500));
        assert_eq!(doc["limit_usd"], "0.0000001");
    }

    #[test]
    fn slack_text_says_who_how_much_and_when() {
        let m = due(&scope(), &status(80_000_000_000, 100_000_000_000, 0, 1000), &[80], false, 10).remove(0);
        assert_eq!(
            slack_text(&m),
            "Tollgate: team platform has spent $80 of its $100 monthly budget (80.0%, past the 80% alert); it resets 1970-01-01T00:00:01Z"
        );
    }
}
