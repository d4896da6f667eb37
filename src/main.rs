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
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh key and the hash to paste into the config.
    New,
}

fn main() -> ExitCode {
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
            match tollgate::server::run(config, upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { file } => check(file.as_deref().unwrap_or(&cli.config)),
        Command::Keys { command: KeysCommand::New } => {
            let (key, hash) = tollgate::auth::generate_key();
            println!("key:  {key}");
            println!("hash: {hash}");
            println!();
            println!("Give the key to its owner (it is not stored anywhere); put the hash in the config:");
            println!();
            println!("[[key]]\nid = \"CHANGE-ME\"\nhash = \"{hash}\"");
            ExitCode::SUCCESS
        }
    }
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
    let state = match tollgate::proxy::State::build(&config) {
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
        state.keys.len()
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
        if let Err(e) = p.credential(true) {
            let _ = writeln!(out, "warning: provider {}: {e}", p.name);
        }
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    ExitCode::SUCCESS
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}
