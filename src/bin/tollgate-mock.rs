//! The mock provider as a process, for the load benchmark and manual testing.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tollgate::mock::{Behavior, MockProvider};

#[derive(Parser)]
#[command(about = "A mock Anthropic Messages provider (JSON and SSE)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Text deltas per streamed answer.
    #[arg(long, default_value_t = 30)]
    deltas: usize,
    /// Pause between SSE events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()?;
    rt.block_on(async {
        let behavior = Behavior {
            deltas: args.deltas,
            delay: Duration::from_millis(args.delay_ms),
            record: false,
            ..Behavior::default()
        };
        let mock = MockProvider::start_on(args.listen, behavior).await?;
        eprintln!("mock provider listening on {}", mock.addr);
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
