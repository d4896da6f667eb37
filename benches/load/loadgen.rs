//! The load generator of the load benchmark: keeps `--concurrency` keep-alive connections busy
//! for `--duration`, and measures latency, time to first byte and the largest gap between two
//! chunks of each answer. With `--hold N` it instead opens N streams at once, reports when all
//! have started, and waits for them to end. Prints one JSON object.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    /// host:port of the target.
    #[arg(long)]
    target: String,
    #[arg(long, default_value = "/v1/messages")]
    path: String,
    /// File holding the request body.
    #[arg(long)]
    body: std::path::PathBuf,
    /// Extra request headers, `name: value`.
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Open this many streams at once instead, and report when all are open.
    #[arg(long)]
    hold: Option<usize>,
    /// With --hold: a file to create once all streams have started.
    #[arg(long)]
    hold_signal: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Stats {
    ok: u64,
    errors: u64,
    latency: Option<Histogram<u64>>,
    ttfb: Option<Histogram<u64>>,
    gap: Option<Histogram<u64>>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

impl Stats {
    fn new() -> Self {
        Stats { latency: Some(hist()), ttfb: Some(hist()), gap: Some(hist()), ..Default::default() }
    }
    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.errors += o.errors;
        for (a, b) in [(&mut self.latency, o.latency), (&mut self.ttfb, o.ttfb), (&mut self.gap, o.gap)] {
            a.as_mut().unwrap().add(b.unwrap()).unwrap();
        }
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(target: &str) -> std::io::Result<Sender> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One request; returns (latency, ttfb, largest gap) in microseconds, or None on an error.
async fn one(sender: &mut Sender, args: &Args, body: &Bytes) -> Option<(u64, u64, u64)> {
    let mut req =
        http::Request::post(&args.path).header("host", &args.target).header("content-type", "application/json");
    for h in &args.headers {
        let (n, v) = h.split_once(':').expect("headers look like `name: value`");
        req = req.header(n.trim(), v.trim());
    }
    let req = req.body(Full::new(body.clone())).ok()?;
    let start = Instant::now();
    let resp = sender.send_request(req).await.ok()?;
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    let mut first = None;
    let mut last = Instant::now();
    let mut gap = Duration::ZERO;
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if frame.is_data() {
            let now = Instant::now();
            if first.is_none() {
                first = Some(now - start);
            } else {
                gap = gap.max(now - last);
            }
            last = now;
        }
    }
    let total = start.elapsed();
    ok.then(|| (total.as_micros() as u64, first.unwrap_or(total).as_micros() as u64, gap.as_micros() as u64))
}

async fn worker(args: Args, body: Bytes, deadline: Instant) -> Stats {
    let mut stats = Stats::new();
    let mut sender = None;
    while Instant::now() < deadline {
        if sender.is_none() {
            match connect(&args.target).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    stats.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().unwrap();
        if s.ready().await.is_err() {
            sender = None;
            continue;
        }
        // A request that takes longer than this counts as an error (the target is stuck).
        match tokio::time::timeout(Duration::from_secs(30), one(s, &args, &body)).await.ok().flatten() {
            Some((lat, ttfb, gap)) => {
                stats.ok += 1;
                stats.latency.as_mut().unwrap().saturating_record(lat);
                stats.ttfb.as_mut().unwrap().saturating_record(ttfb);
                stats.gap.as_mut().unwrap().saturating_record(gap);
            }
            None => {
                stats.errors += 1;
                sender = None;
            }
        }
    }
    stats
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn main() {
    let args = Args::parse();
    let body = Bytes::from(std::fs::read(&args.body).expect("the body file is readable"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        if let Some(n) = args.hold {
            return hold(args, body, n).await;
        }
        let start = Instant::now();
        let deadline = start + args.duration;
        let tasks: Vec<_> =
            (0..args.concurrency).map(|_| tokio::spawn(worker(args.clone(), body.clone(), deadline))).collect();
        let mut stats = Stats::new();
        for t in tasks {
            stats.merge(t.await.unwrap());
        }
        let elapsed = start.elapsed().as_secs_f64();
        let (l, t, g) = (stats.latency.unwrap(), stats.ttfb.unwrap(), stats.gap.unwrap());
        let out = serde_json::json!({
            "requests": stats.ok, "errors": stats.errors, "seconds": elapsed,
            "rps": stats.ok as f64 / elapsed,
            "latency_ms": {"p50": ms(&l, 0.5), "p90": ms(&l, 0.9), "p99": ms(&l, 0.99), "max": l.max() as f64 / 1000.0},
            "ttfb_ms": {"p50": ms(&t, 0.5), "p99": ms(&t, 0.99)},
            "max_gap_ms": {"p50": ms(&g, 0.5), "p99": ms(&g, 0.99), "max": g.max() as f64 / 1000.0},
        });
        println!("{out}");
    });
}

/// Opens `n` streams at once and keeps them open until they end on their own. Reports how many
/// started and completed, and the largest gap between two chunks of any stream.
async fn hold(args: Args, body: Bytes, n: usize) {
    let started = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (args, body, started) = (args.clone(), body.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = connect(&args.target).await.ok()?;
            let mut req =
                http::Request::post(&args.path).header("host", &args.target).header("content-type", "application/json");
            for h in &args.headers {
                let (k, v) = h.split_once(':').unwrap();
                req = req.header(k.trim(), v.trim());
            }
            let resp = s.send_request(req.body(Full::new(body)).ok()?).await.ok()?;
            if !resp.status().is_success() {
                started.add_permits(1);
                return None;
            }
            let mut b = resp.into_body();
            let first = b.frame().await;
            started.add_permits(1);
            first?.ok()?;
            let mut last = Instant::now();
            let mut gap = Duration::ZERO;
            while let Some(f) = b.frame().await {
                f.ok()?;
                gap = gap.max(last.elapsed());
                last = Instant::now();
            }
            Some(gap)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(60), started.acquire_many(n as u32)).await.is_ok();
    if let Some(p) = &args.hold_signal {
        std::fs::write(p, if all { "open" } else { "timeout" }).unwrap();
    }
    let (mut ok, mut max_gap) = (0, Duration::ZERO);
    for t in tasks {
        if let Ok(Some(gap)) = t.await {
            ok += 1;
            max_gap = max_gap.max(gap);
        }
    }
    let out = serde_json::json!({"held": n, "all_started": all, "completed": ok, "errors": n - ok,
        "max_gap_ms": max_gap.as_secs_f64() * 1000.0});
    println!("{out}");
}
