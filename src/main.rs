//! The `tollgate` command: CLI wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc returns freed memory to the system and fragments less than glibc's allocator under
/// many threads and connections: the RSS of a gateway holding 1,000 streams depends on it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "An LLM gateway for Anthropic-format traffic")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (for the default `run` command).
    #[arg(long, short, global = true, default_value = "conf/tollgate.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run {
        /// Take the listening sockets over from a running instance (send it SIGQUIT).
        #[arg(long, short)]
        upgrade: bool,
    },
    /// Validate the config and print the resolved model routes.
    Check {
        /// The config file (same as --config).
        file: Option<PathBuf>,
    },
    /// Bring the ledger database (`[store] backend = "postgres"`) to this build's schema.
    /// Gateways do it themselves at start; this does it ahead of a rollout.
    Migrate {
        /// The config file (same as --config).
        file: Option<PathBuf>,
        /// Also copy an embedded node's store (its SQLite file: keys and ledger) into the
        /// database. Safe to run again; stop the node first, or run it once more after.
        #[arg(long, value_name = "SQLITE_FILE")]
        from_sqlite: Option<PathBuf>,
    },
    /// Sign in to a gateway with the company's identity provider (device sign-in).
    Login {
        /// The gateway's base URL, as clients use it.
        #[arg(long, env = "TOLLGATE_GATEWAY")]
        gateway: String,
    },
    /// Print a gateway token for the signed-in person (Claude Code's `apiKeyHelper`).
    Token {
        /// Get a new one even if the held token is still fresh.
        #[arg(long)]
        refresh: bool,
    },
    /// Print Claude Code's managed settings for the signed-in person's groups.
    Settings,
    /// Forget the sign-in on this machine.
    Logout,
    /// People signed in through the identity provider (admin API).
    People {
        #[command(subcommand)]
        command: PeopleCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Usage and spend from the ledger.
    Usage {
        /// Comma-separated: key, user, team, model, day.
        #[arg(long, default_value = "team")]
        group_by: String,
        /// A date (2026-11-01) or RFC 3339 time.
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every budget in force, with spend and reservations now.
    Budgets {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make the running gateway read its config again (same as SIGHUP).
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum PeopleCommand {
    /// Everyone with a live sign-in: groups, team, sign-ins, last activity.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End a person's sign-ins now (they may sign in again).
    Revoke {
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End a person's sign-ins and refuse new ones until `enable`.
    Disable {
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    Enable {
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh key and the hash to paste into the config (works offline).
    New,
    /// List every key (config file and admin API) with its budget state.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Create a key through the admin API; its secret is printed once.
    Create {
        /// The key's id (generated when absent).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        fields: KeyFields,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show one key.
    Show {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a key's fields; the ones not given stay.
    Update {
        id: String,
        #[command(flatten)]
        fields: KeyFields,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Refuse the key from now on (reversible with `enable`).
    Disable {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    Enable {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Give the key a new secret; the old one stops working at once.
    Rotate {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    Delete {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where the admin API is and how to print its answers.
#[derive(clap::Args)]
struct AdminArgs {
    /// The admin API's base URL; by default the config's admin.address.
    #[arg(long, env = "TOLLGATE_ADMIN_URL")]
    admin_url: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct KeyFields {
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    team: Option<String>,
    /// Model names or globs the key may use, comma-separated ("" for all).
    #[arg(long)]
    models: Option<String>,
    /// Budget in USD ("none" removes it).
    #[arg(long)]
    budget: Option<String>,
    /// Budget period: daily, weekly, monthly or none (a new budget is monthly unless given).
    #[arg(long)]
    period: Option<String>,
    #[arg(long)]
    rpm: Option<u32>,
    #[arg(long)]
    input_tpm: Option<u64>,
    #[arg(long)]
    output_tpm: Option<u64>,
    #[arg(long)]
    concurrency: Option<u32>,
    /// RFC 3339 expiry ("never" removes it).
    #[arg(long)]
    expires: Option<String>,
    /// Metadata entries, `name=value`, repeatable.
    #[arg(long = "meta")]
    meta: Vec<String>,
}

impl KeyFields {
    fn into_input(self) -> tollgate::cli::KeyFields {
        tollgate::cli::KeyFields {
            user: self.user,
            team: self.team,
            models: self.models,
            budget: self.budget,
            period: self.period,
            rpm: self.rpm,
            input_tpm: self.input_tpm,
            output_tpm: self.output_tpm,
            concurrency: self.concurrency,
            expires: self.expires,
            meta: self.meta,
        }
    }
}

fn main() -> ExitCode {
    // One TLS crypto library for every client the commands make (rustls on ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { upgrade: false }) {
        Command::Run { upgrade } => {
            init_logging();
            let config = match tollgate::config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match tollgate::server::run(config, Some(cli.config.clone()), upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { file } => check(file.as_deref().unwrap_or(&cli.config)),
        Command::Migrate { file, from_sqlite } => {
            migrate(file.as_deref().unwrap_or(&cli.config), from_sqlite.as_deref())
        }
        Command::Login { gateway } => print(tollgate::login::login(&gateway)),
        Command::Token { refresh } => print(tollgate::login::token(refresh)),
        Command::Settings => print(tollgate::login::settings()),
        Command::Logout => print(tollgate::login::logout()),
        Command::People { command } => {
            use tollgate::cli::Call;
            let (call, admin) = match command {
                PeopleCommand::List { admin } => (Call::People, admin),
                PeopleCommand::Revoke { user, admin } => (Call::PersonAction(user, "revoke"), admin),
                PeopleCommand::Disable { user, admin } => (Call::PersonAction(user, "disable"), admin),
                PeopleCommand::Enable { user, admin } => (Call::PersonAction(user, "enable"), admin),
            };
            admin_call(&cli.config, admin, call)
        }
        Command::Keys { command: KeysCommand::New } => new_key(),
        Command::Keys { command } => {
            use tollgate::cli::Call;
            let (call, admin) = match command {
                KeysCommand::New => unreachable!("handled above"),
                KeysCommand::List { admin } => (Call::ListKeys, admin),
                KeysCommand::Create { id, fields, admin } => {
                    (Call::CreateKey { id, fields: fields.into_input() }, admin)
                }
                KeysCommand::Show { id, admin } => (Call::ShowKey(id), admin),
                KeysCommand::Update { id, fields, admin } => {
                    (Call::UpdateKey { id, fields: fields.into_input() }, admin)
                }
                KeysCommand::Disable { id, admin } => (Call::KeyAction(id, "disable"), admin),
                KeysCommand::Enable { id, admin } => (Call::KeyAction(id, "enable"), admin),
                KeysCommand::Rotate { id, admin } => (Call::KeyAction(id, "rotate"), admin),
                KeysCommand::Delete { id, admin } => (Call::DeleteKey(id), admin),
            };
            admin_call(&cli.config, admin, call)
        }
        Command::Usage { group_by, from, to, key, user, team, model, admin } => {
            let filters = [("key", key), ("user", user), ("team", team), ("model", model)];
            let mut query = vec![("group_by".to_string(), group_by)];
            query.extend(from.map(|f| ("from".to_string(), f)));
            query.extend(to.map(|t| ("to".to_string(), t)));
            query.extend(filters.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))));
            admin_call(&cli.config, admin, tollgate::cli::Call::Usage(query))
        }
        Command::Budgets { admin } => admin_call(&cli.config, admin, tollgate::cli::Call::Budgets),
        Command::Reload { admin } => admin_call(&cli.config, admin, tollgate::cli::Call::Reload),
    }
}

/// Prints a command's output, or its error to stderr with a failing exit code.
fn print(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(out) => {
            let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn admin_call(config: &std::path::Path, admin: AdminArgs, call: tollgate::cli::Call) -> ExitCode {
    print(tollgate::cli::run(config, admin.admin_url.as_deref(), admin.json, call))
}

fn new_key() -> ExitCode {
    let (key, hash) = tollgate::auth::generate_key();
    println!("key:  {key}");
    println!("hash: {hash}");
    println!();
    println!("Give the key to its owner (it is not stored anywhere); put the hash in the config:");
    println!();
    println!("[[key]]\nid = \"CHANGE-ME\"\nhash = \"{hash}\"");
    ExitCode::SUCCESS
}

fn check(path: &std::path::Path) -> ExitCode {
    use std::fmt::Write as _;
    // Printed in one write at the end: `tollgate check | head` must not panic on a closed pipe.
    let mut out = String::new();
    let config = match tollgate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state = match tollgate::runtime::State::build(&config, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let _ = writeln!(out, "{}: ok", path.display());
    let _ = writeln!(
        out,
        "{} listener(s), {} provider(s), {} key(s)",
        config.listeners.len(),
        state.providers.len(),
        config.keys.len()
    );
    let _ = writeln!(out, "routes:");
    for m in &config.models {
        let route = state.models.resolve(m.name.get_ref()).expect("every configured name resolves");
        let names: Vec<&str> = m.aliases.iter().map(|a| a.get_ref().as_str()).collect();
        let patterns: Vec<&str> = m.patterns.iter().map(|p| p.get_ref().as_str()).collect();
        let mut line = format!("  {}", route.name);
        if !names.is_empty() {
            line += &format!(" (aliases: {})", names.join(", "));
        }
        if !patterns.is_empty() {
            line += &format!(" (patterns: {})", patterns.join(", "));
        }
        let _ = writeln!(out, "{line}");
        for (i, d) in route.deployments.iter().enumerate() {
            match &d.model_id {
                Some(id) => {
                    let price = if d.price.is_some() { "priced" } else { "NO PRICE" };
                    let _ = writeln!(out, "    {}. {} -> {id} [{price}]", i + 1, d.provider.name);
                }
                None => {
                    let _ =
                        writeln!(out, "    {}. {} -> the requested name, priced per request", i + 1, d.provider.name);
                }
            }
        }
    }
    for p in &state.providers {
        if !p.betas.is_empty() {
            let renamed: Vec<String> = p.betas.rename.iter().map(|(a, b)| format!("{a} -> {b}")).collect();
            let _ = writeln!(
                out,
                "provider {}: betas dropped: {}; renamed: {}",
                p.name,
                if p.betas.drop.is_empty() { "none".into() } else { p.betas.drop.join(", ") },
                if renamed.is_empty() { "none".into() } else { renamed.join(", ") }
            );
        }
        if let Err(e) = p.credential(true) {
            let _ = writeln!(out, "warning: provider {}: {e}", p.name);
        }
    }
    // The fleet's backends must answer (the database's schema is left as it is: `tollgate
    // migrate`); a gateway that cannot reach its shared limiter refuses budgeted requests.
    let mut backends = Vec::new();
    if config.store.backend == tollgate::config::StoreBackend::Postgres {
        backends.push(tollgate::server::pg_target(&config.store).and_then(|target| {
            tollgate::store::PostgresStore::ping(&target)
                .map(|(rtt, version)| {
                    let schema = version.map_or_else(|| "no schema yet".to_string(), |v| format!("schema version {v}"));
                    format!("store: PostgreSQL answered in {:.1} ms ({schema})", rtt.as_secs_f64() * 1000.0)
                })
                .map_err(|e| e.to_string())
        }));
    }
    if config.limits.backend == tollgate::config::LimitsBackend::Redis {
        backends.push(match config.limits.url.as_ref().map(|u| u.resolve()) {
            Some(Ok(url)) => {
                let shown = tollgate::limits::redact_url(url.expose());
                let ca = config
                    .limits
                    .ca_file
                    .as_ref()
                    .map(|p| std::fs::read(p).map_err(|e| format!("limits.ca_file {}: {e}", p.display())));
                match ca.transpose() {
                    Err(e) => Err(e),
                    Ok(ca) => tollgate::limits::ping_redis(
                        url.expose(),
                        config.limits.cluster,
                        config.limits.timeout.max(std::time::Duration::from_secs(1)),
                        ca.as_deref(),
                    ),
                }
                .map(|rtt| format!("limits: Redis at {shown} answered in {:.1} ms", rtt.as_secs_f64() * 1000.0))
                .map_err(|e| format!("limits: Redis at {shown}: {e}"))
            }
            Some(Err(e)) => Err(format!("limits.url: {e}")),
            None => Err("limits.url is not set".into()),
        });
    }
    for checked in backends {
        match checked {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
            }
            Err(e) => {
                let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    ExitCode::SUCCESS
}

fn migrate(path: &std::path::Path, from_sqlite: Option<&std::path::Path>) -> ExitCode {
    let config = match tollgate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if config.store.backend != tollgate::config::StoreBackend::Postgres {
        if from_sqlite.is_some() {
            eprintln!("error: --from-sqlite copies into the PostgreSQL store: this config's [store] is SQLite");
            return ExitCode::FAILURE;
        }
        println!("the store is SQLite: it migrates itself when the gateway opens it");
        return ExitCode::SUCCESS;
    }
    let target = match tollgate::server::pg_target(&config.store) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(sqlite) = from_sqlite {
        let progress = |n: u64| {
            if n.is_multiple_of(100_000) {
                eprintln!("{n} ledger rows copied");
            }
        };
        match tollgate::store::import_sqlite(sqlite, &target, progress) {
            Ok(r) => {
                println!(
                    "copied {}: keys {} added, {} already present, {} differing; ledger {} rows (${:.9}), {} added, {} already present",
                    sqlite.display(),
                    r.keys_added,
                    r.keys_present.len(),
                    r.keys_differing.len(),
                    r.rows,
                    r.cost_nanos as f64 / 1e9,
                    r.rows_added,
                    r.rows - r.rows_added
                );
                for id in &r.keys_differing {
                    println!(
                        "key {id:?} differs in the database (changed on one side since): the database's is kept; \
                         check it there (a key disabled here is still enabled there)"
                    );
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match tollgate::store::PostgresStore::migrate_only(&target) {
        Ok(version) => {
            println!("the ledger database is at schema version {version}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}
