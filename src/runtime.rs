//! The live gateway state and how it changes while running: the config snapshot, the key
//! store, the limiter and the store, reloads (SIGHUP, the admin API) and key changes from the
//! admin API. Every change builds a new snapshot off the request path and swaps it in whole;
//! a request keeps the snapshot it started with.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::auth::{JwtVerifier, KeyStore, SharedKeys};
use crate::config::{ByReference, Config, Interrupted, Secret, Unpriced};
use crate::limits::Owners;
use crate::limits::{Limits, LocalLimiter, RedisLimiter, RedisSettings, Scope, ScopeKind};
use crate::metering::PriceTable;
use crate::metrics::Metrics;
use crate::providers::Provider;
use crate::routing::ModelTable;
use crate::store::Store;
use crate::tls::ReloadableCert;

/// Everything a request needs from the config (keys apart), swapped whole on reload.
pub struct State {
    pub models: ModelTable,
    pub providers: Vec<Arc<Provider>>,
    pub prices: PriceTable,
    pub owners: Owners,
    pub unpriced: Unpriced,
    pub interrupted: Interrupted,
    pub by_reference: ByReference,
    pub server_tool_uses: u64,
    pub max_body_bytes: usize,
    pub jwt: JwtVerifier,
    /// Sign-in with the identity provider, and its gateway tokens.
    pub sso: Option<crate::sso::Sso>,
}

impl State {
    /// Builds the snapshot. On a reload (`running` is the live one) providers are kept as they
    /// run, with their pools and health: their sections apply at the next restart.
    pub fn build(config: &Config, running: Option<&State>) -> Result<Self, String> {
        let prices = PriceTable::with_overrides(&config.prices)?;
        let mut providers = Vec::new();
        let mut by_name = HashMap::new();
        let live = running.map(crate::runtime::providers_by_name);
        for p in &config.providers {
            let name = p.name.get_ref();
            let provider = match &live {
                Some(live) => live
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("provider {name:?} is new: adding a provider needs a restart"))?,
                None => Arc::new(
                    Provider::from_config(p, &config.egress, config.server.upstream_pool_size)
                        .map_err(|e| format!("provider {name:?}: {e}"))?,
                ),
            };
            by_name.insert(provider.name.clone(), provider.clone());
            providers.push(provider);
        }
        Ok(State {
            models: ModelTable::build(&config.models, &by_name, &prices)?,
            providers,
            prices,
            owners: Owners::build(&config.users, &config.teams)?,
            unpriced: config.controls.unpriced,
            interrupted: config.controls.interrupted,
            by_reference: config.controls.by_reference,
            server_tool_uses: config.controls.server_tool_uses,
            max_body_bytes: config.server.max_body_bytes,
            jwt: JwtVerifier::build(&config.jwt_issuers, running.map(|r| &r.jwt))?,
            sso: config
                .sso
                .as_ref()
                .map(|c| crate::sso::Sso::build(c, running.and_then(|r| r.sso.as_ref())))
                .transpose()?,
        })
    }
}

/// The live configuration, shared with the admin listener and swapped whole on reload.
pub type SharedState = Arc<ArcSwap<State>>;

pub struct Runtime {
    pub state: SharedState,
    pub keys: SharedKeys,
    pub limiter: Limits,
    /// Runs the shared limiter's connection, settlements and lease renewals (fleet mode).
    _limits_rt: Option<tokio::runtime::Runtime>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// The admin API's bearer token; the API is closed without one.
    pub admin_token: ArcSwap<AdminToken>,
    config: ArcSwap<Config>,
    config_path: Option<PathBuf>,
    /// One change at a time: two admin calls must not each rebuild from a stale key list.
    changing: Mutex<()>,
    /// The listeners' TLS certificates, re-read on every reload.
    certs: Mutex<Vec<Arc<ReloadableCert>>>,
    /// The audit log, once started: sign-ins and revocations are written to it.
    pub audit: std::sync::OnceLock<crate::audit::AuditLog>,
}

impl Runtime {
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let state = State::build(&config, None)?;
        // Revocations and disabled people recorded before this start apply from the first request.
        if let Some(sso) = &state.sso {
            sso.sync(&*store).map_err(|e| format!("sso: reading revoked sign-ins: {e}"))?;
        }
        let stored = store.keys().map_err(|e| e.to_string())?;
        let keys = KeyStore::build(&config.keys, &stored)?;
        let (limiter, limits_rt) = build_limits(&config, &metrics)?;
        limiter.set_max_keys(config.controls.max_principals);
        let rt = Runtime {
            state: Arc::new(ArcSwap::from_pointee(state)),
            keys: Arc::new(ArcSwap::from_pointee(keys)),
            limiter,
            _limits_rt: limits_rt,
            store,
            metrics,
            admin_token: ArcSwap::from_pointee(admin_token(&config)),
            config: ArcSwap::from_pointee(config),
            config_path,
            changing: Mutex::new(()),
            certs: Mutex::new(Vec::new()),
            audit: std::sync::OnceLock::new(),
        };
        rt.seed_budgets(&[], &rt.state.load(), &rt.keys.load())?;
        rt.mark_seeded()?;
        Ok(rt)
    }

    /// A shared limiter that lost its counters (Redis restarted empty) refuses admissions until
    /// every budget is seeded again from the ledger: this does it, once at a time.
    pub fn reseed_limits(&self) -> Result<(), String> {
        let Limits::Redis { limiter, .. } = &self.limiter else { return Ok(()) };
        if limiter.reseeding.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(());
        }
        let _guard = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        limiter.forget_seeds();
        let result = self.seed_budgets(&[], &self.state.load(), &self.keys.load()).and_then(|()| self.mark_seeded());
        limiter.reseeding.store(false, std::sync::atomic::Ordering::Release);
        tracing::warn!(ok = result.is_ok(), "the shared limiter's budgets were seeded again from the ledger");
        result
    }

    fn mark_seeded(&self) -> Result<(), String> {
        match &self.limiter {
            Limits::Redis { limiter, rt } => limiter.mark_seeded(rt),
            Limits::Local(_) => Ok(()),
        }
    }

    /// Reads the config file again and applies it. On any error the running config stays.
    pub fn reload(&self) -> Result<(), String> {
        let path = self.config_path.as_ref().ok_or("this gateway was not started from a config file")?;
        let config = crate::config::load(path).map_err(|e| e.to_string())?;
        let _guard = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let state = State::build(&config, Some(&self.state.load()))?;
        let stored = self.store.keys().map_err(|e| e.to_string())?;
        let keys = KeyStore::build(&config.keys, &stored)?;
        let token = admin_token(&config);
        // Certificates are read before anything changes: an unreadable one refuses the reload.
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let renewed = certs.iter().map(|c| c.prepare()).collect::<Result<Vec<_>, _>>()?;
        self.limiter.set_time_zone(config.controls.tz());
        self.limiter.set_max_keys(config.controls.max_principals);
        self.seed_budgets(&self.scopes(), &state, &keys)?;
        let egress_changed = format!("{:?}", config.egress) != format!("{:?}", self.config.load().egress);
        if egress_changed {
            tracing::warn!(
                "[egress] changed: it applies at the next restart; until then the running proxy keeps the credentials it has"
            );
        }
        // Credentials are read again (a rotated `file:` secret, new AWS keys), each provider's
        // own set swapped in whole; one that cannot be read keeps the running set.
        let live = providers_by_name(&state);
        for p in &config.providers {
            if let Some(provider) = live.get(p.name.get_ref()) {
                if !provider.runs_as(p) {
                    tracing::warn!(
                        provider = %provider.name,
                        "its kind, endpoints, region, project, proxy or ca_file changed: they and its credentials apply at the next restart"
                    );
                    continue;
                }
                if let Err(e) = provider.replace_credentials(crate::providers::read_credentials(p), egress_changed) {
                    tracing::warn!(provider = %provider.name, "credentials not re-read, the running ones stay: {e}");
                }
            }
        }
        self.state.store(Arc::new(state));
        self.keys.store(Arc::new(keys));
        self.admin_token.store(Arc::new(token));
        self.config.store(Arc::new(config));
        renewed.into_iter().for_each(|c| c.install());
        tracing::info!(path = %path.display(), certificates = certs.len(), "config reloaded");
        Ok(())
    }

    /// Rebuilds the key store after the admin API changed the stored keys.
    pub fn refresh_keys(&self) -> Result<(), String> {
        let _guard = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let stored = self.store.keys().map_err(|e| e.to_string())?;
        let keys = KeyStore::build(&self.config.load().keys, &stored)?;
        self.seed_budgets(&self.scopes(), &self.state.load(), &keys)?;
        self.keys.store(Arc::new(keys));
        Ok(())
    }

    /// Adds a listener's certificate to those a reload re-reads.
    pub fn add_certificate(&self, cert: Arc<ReloadableCert>) {
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).push(cert);
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// A scope's spend and headroom, for the admin listener (see [`Limits::status_blocking`]).
    pub fn limiter_status(&self, scope: &Scope) -> crate::limits::ScopeStatus {
        self.limiter.status_blocking(scope)
    }

    /// Every scope with a budget or limits: keys, users and teams.
    pub fn scopes(&self) -> Vec<Scope> {
        scopes(&self.state.load(), &self.keys.load())
    }

    /// Gives every budget that is new, or was not counting, the spend the ledger holds for its
    /// current period, so a restart or a new budget starts from what was really spent. A budget
    /// that was removed and comes back is new: requests in between were not counted against it.
    fn seed_budgets(&self, running: &[Scope], state: &State, keys: &KeyStore) -> Result<(), String> {
        let before: HashMap<(ScopeKind, &str), _> =
            running.iter().map(|s| ((s.kind, &*s.id), s.policy.budget.map(|b| b.period))).collect();
        let mut flushed = false;
        for scope in scopes(state, keys) {
            let Some(budget) = scope.policy.budget else { continue };
            let same_period = before.get(&(scope.kind, &*scope.id)) == Some(&Some(budget.period));
            if same_period && self.limiter.tracks(&scope) {
                continue;
            }
            self.seed_scope(&scope, &mut flushed)?;
        }
        // JWT principals are known only once they call: seed everyone the ledger has seen.
        for issuer in &state.jwt.issuers {
            let policy = issuer.principal_policy();
            let Some(budget) = policy.budget else { continue };
            let (start, _) = budget.period.bounds(self.limiter.time_zone(), crate::limits::now_ms());
            if !flushed {
                self.store.flush().map_err(|e| e.to_string())?;
                flushed = true;
            }
            let prefix = format!("{}:", issuer.name);
            // Principals with spend this period must be counted (their budget holds); those with
            // none need no entry until they call again (so a reload cannot fill the limiter
            // past controls.max_principals with refused callers).
            let mut spent: HashMap<String, u64> = self
                .store
                .spend_by_key_prefix(&prefix, start)
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|(_, nanos)| *nanos > 0)
                .collect();
            // Principals counted in memory with no row this period are seeded too (at zero):
            // otherwise one would keep a period the issuer no longer has.
            for id in self.limiter.ids_with_prefix(ScopeKind::Key, &prefix) {
                spent.entry(id).or_insert(0);
            }
            for (id, nanos) in spent {
                let scope = Scope { kind: ScopeKind::Key, id: id.as_str().into(), policy };
                let same = before.get(&(scope.kind, &*scope.id)) == Some(&Some(budget.period));
                if !(same && self.limiter.tracks(&scope)) {
                    self.limiter.seed(&scope, start, nanos)?;
                }
            }
        }
        // People signed in through the identity provider: each live sign-in's person, with the
        // policy of the groups their tokens carry (a token issued before a restart still spends).
        if let Some(sso) = &state.sso {
            let sessions = self.store.sessions(crate::limits::now_ms()).map_err(|e| e.to_string())?;
            let mut seen = std::collections::HashSet::new();
            // Newest first: a person's latest groups decide.
            for s in sessions.iter().filter(|s| s.revoked_ms.is_none()) {
                if !seen.insert(s.user.as_str()) {
                    continue;
                }
                let Some(person) = sso.groups.principal(&s.user, &s.groups, 0) else { continue };
                let scope = Scope { kind: ScopeKind::Key, id: person.scope_id.clone(), policy: person.policy };
                let Some(budget) = person.policy.budget else { continue };
                let same = before.get(&(scope.kind, &*scope.id)) == Some(&Some(budget.period));
                if !(same && self.limiter.tracks(&scope)) {
                    self.seed_scope(&scope, &mut flushed)?;
                }
            }
        }
        Ok(())
    }

    /// Writes a sign-in event to the audit log (nowhere before the log is started).
    pub fn audit_event(&self, event: crate::audit::AuditEvent) {
        if let Some(log) = self.audit.get() {
            log.event(event);
        }
    }

    /// Seeds one budget from the ledger's spend in its current period.
    fn seed_scope(&self, scope: &Scope, flushed: &mut bool) -> Result<(), String> {
        let Some(budget) = scope.policy.budget else { return Ok(()) };
        if !*flushed {
            // Rows still queued belong in the sum.
            self.store.flush().map_err(|e| e.to_string())?;
            *flushed = true;
        }
        let (start, _) = budget.period.bounds(self.limiter.time_zone(), crate::limits::now_ms());
        let spent = self.store.spend_since(scope.kind, &scope.id, start).map_err(|e| e.to_string())?;
        self.limiter.seed(scope, start, spent)
    }

    /// A person who just signed in or took a new token: their budget counts what the ledger
    /// holds for them this period, unless it already counts (sign-in is off the request path).
    pub fn seed_person(&self, person: &crate::auth::ApiKey) -> Result<(), String> {
        let scope = Scope { kind: ScopeKind::Key, id: person.scope_id.clone(), policy: person.policy };
        if person.policy.budget.is_none() || self.limiter.tracks(&scope) {
            return Ok(());
        }
        self.seed_scope(&scope, &mut false)
    }
}

fn scopes(state: &State, keys: &KeyStore) -> Vec<Scope> {
    let mut out = Vec::new();
    for k in keys.all() {
        if !k.policy.is_empty() {
            out.push(Scope { kind: ScopeKind::Key, id: k.scope_id.clone(), policy: k.policy });
        }
    }
    for (kind, table) in [(ScopeKind::User, &state.owners.users), (ScopeKind::Team, &state.owners.teams)] {
        let mut sorted: Vec<_> = table.values().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, policy) in sorted {
            if !policy.is_empty() {
                out.push(Scope { kind, id: id.clone(), policy: *policy });
            }
        }
    }
    out
}

/// The admin API's token, as far as it could be read.
pub enum AdminToken {
    /// No `admin.token` in the config: the API is closed.
    Unset,
    Set(Secret),
    /// The reference could not be read (unset variable, missing file): the API is closed, and
    /// says why. The gateway itself runs on: the proxy does not need the admin API.
    Unreadable(String),
}

fn admin_token(config: &Config) -> AdminToken {
    match config.admin.as_ref().and_then(|a| a.token.as_ref()) {
        Some(r) => match r.get_ref().resolve() {
            Ok(secret) => AdminToken::Set(secret),
            Err(e) => {
                tracing::warn!("admin.token: {e}; the admin API stays closed");
                AdminToken::Unreadable(format!("admin.token: {e}"))
            }
        },
        None => AdminToken::Unset,
    }
}

/// Providers of the running snapshot by name, for a reload to keep.
pub fn providers_by_name(state: &State) -> HashMap<String, Arc<crate::providers::Provider>> {
    state.providers.iter().map(|p| (p.name.clone(), p.clone())).collect()
}

/// The limiter `[limits]` asks for: this process's, or the fleet's in Redis (with the runtime
/// that drives its connection).
fn build_limits(config: &Config, metrics: &Metrics) -> Result<(Limits, Option<tokio::runtime::Runtime>), String> {
    let tz = config.controls.tz();
    let l = &config.limits;
    match l.backend {
        crate::config::LimitsBackend::Local => Ok((Limits::Local(Arc::new(LocalLimiter::new(tz))), None)),
        crate::config::LimitsBackend::Redis => {
            let url = l.url.as_ref().ok_or("limits.url is required for redis")?.resolve()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("tollgate-limits")
                .enable_all()
                .build()
                .map_err(|e| format!("the shared limiter's runtime: {e}"))?;
            let settings = RedisSettings {
                url: url.expose().to_string(),
                prefix: l.prefix.clone(),
                timeout: l.timeout,
                lease: l.lease,
                local_fallback: l.on_unavailable == crate::config::OnUnavailable::Local,
                cluster: l.cluster,
                ca: l
                    .ca_file
                    .as_ref()
                    .map(|p| std::fs::read(p).map_err(|e| format!("limits.ca_file {}: {e}", p.display())))
                    .transpose()?,
            };
            let limiter = RedisLimiter::connect(settings, tz, rt.handle(), metrics.backend.clone())?;
            Ok((Limits::Redis { limiter, rt: rt.handle().clone() }, Some(rt)))
        }
    }
}
