//! Microbenchmarks of everything the gateway does per request or per chunk.
//! `cargo bench --bench hot_path`; each line reports time per operation or bytes per second.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate::auth::{generate_key, presented_key, KeyStore};
use tollgate::config::load_str;
use tollgate::metering::PriceTable;
use tollgate::mock::{claude_code_body, sse_events, MockUsage};
use tollgate::protocol::json_peek::{peek_request, replace_string_value};
use tollgate::protocol::sse::SseUsageScanner;
use tollgate::protocol::usage::{usage_from_json, Usage};
use tollgate::providers::Provider;
use tollgate::routing::ModelTable;

/// A streamed answer like a real one: 400 text deltas, usage at both ends.
fn realistic_stream() -> Vec<u8> {
    let usage = MockUsage {
        input_tokens: 3,
        output_tokens: 812,
        cache_read_input_tokens: 61_000,
        cache_creation_5m_input_tokens: 0,
        cache_creation_1h_input_tokens: 2_400,
        ..Default::default()
    };
    sse_events("claude-sonnet-5", &usage, 400).concat()
}

fn sse_scan(c: &mut Criterion) {
    let stream = realistic_stream();
    let mut g = c.benchmark_group("sse_usage_scan");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    for chunk in [64usize, 512, 4096, 16384] {
        g.bench_with_input(BenchmarkId::new("chunk_bytes", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut s = SseUsageScanner::new();
                for part in stream.chunks(chunk) {
                    s.feed(black_box(part));
                }
                black_box(s.usage())
            })
        });
    }
    g.finish();
}

fn json_usage(c: &mut Criterion) {
    let text = "word ".repeat(800);
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 4000,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "output_tokens": 812, "service_tier": "standard"}
    }))
    .unwrap();
    let mut g = c.benchmark_group("non_stream_usage");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("4KB_answer", |b| b.iter(|| black_box(usage_from_json(black_box(&body)))));
    g.finish();
}

fn request_body(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_body");
    for (name, size) in [("80KB", 80 << 10), ("2MB", 2 << 20)] {
        let body = claude_code_body("sonnet", true, size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("peek", name), |b| {
            b.iter(|| black_box(peek_request(black_box(&body)).unwrap()))
        });
        // What a budgeted request pays: the peek and the reference scan in one walk.
        g.bench_function(BenchmarkId::new("peek_and_scan", name), |b| {
            b.iter(|| black_box(tollgate::protocol::references::peek_and_scan(black_box(&body), 20).unwrap()))
        });
        g.bench_function(BenchmarkId::new("utf8_check", name), |b| {
            b.iter(|| black_box(simdutf8::basic::from_utf8(black_box(&body)).is_ok()))
        });
        let span = peek_request(&body).unwrap().model.unwrap().1;
        g.bench_function(BenchmarkId::new("model_rewrite", name), |b| {
            b.iter(|| black_box(replace_string_value(black_box(&body), span.clone(), "claude-sonnet-4-5-20250929")))
        });
    }
    g.finish();
}

const CONFIG: &str = r#"
[[listener]]
address = "127.0.0.1:8080"
[[provider]]
name = "anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:9999"
credential = "env:HOME"
[[model]]
name = "claude-opus-4-8"
deployments = [{ provider = "anthropic" }]
[[model]]
name = "claude-sonnet-5"
aliases = ["sonnet"]
deployments = [{ provider = "anthropic", model = "claude-sonnet-5" }]
[[model]]
name = "claude-haiku-4-5"
patterns = ["claude-haiku-4-5-*"]
deployments = [{ provider = "anthropic", model = "claude-haiku-4-5-20251001" }]
[[model]]
name = "claude"
patterns = ["claude-*"]
deployments = [{ provider = "anthropic" }]
"#;

fn routing_and_keys(c: &mut Criterion) {
    let config = load_str(CONFIG, "bench.toml").unwrap();
    let prices = PriceTable::with_overrides(&[]).unwrap();
    let providers: HashMap<_, _> = config
        .providers
        .iter()
        .map(|p| (p.name.get_ref().clone(), Arc::new(Provider::from_config(p, &config.egress, 256).unwrap())))
        .collect();
    let table = ModelTable::build(&config.models, &providers, &prices).unwrap();
    let mut g = c.benchmark_group("route_selection");
    for name in ["sonnet", "claude-haiku-4-5-20251001", "claude-opus-4-1-20250805"] {
        g.bench_function(name, |b| b.iter(|| black_box(table.resolve(black_box(name)).unwrap())));
    }
    g.finish();

    // 10,000 keys in the store; look one up from its header, as a request does.
    let mut text = String::from(CONFIG);
    let mut presented = String::new();
    for i in 0..10_000 {
        let (key, hash) = generate_key();
        text += &format!("[[key]]\nid = \"k{i}\"\nhash = \"{hash}\"\nteam = \"t{}\"\n", i % 20);
        presented = key;
    }
    let keys = KeyStore::build(&load_str(&text, "keys.toml").unwrap().keys, &[]).unwrap();
    let header = presented.as_bytes().to_vec();
    c.bench_function("key_lookup_10k_keys", |b| {
        b.iter(|| {
            black_box(keys.authenticate(presented_key(Some(black_box(&header)), None), SystemTime::now()).unwrap())
        })
    });
}

fn cost(c: &mut Criterion) {
    let prices = PriceTable::with_overrides(&[]).unwrap();
    let usage = Usage {
        input_tokens: 3,
        output_tokens: 812,
        cache_read_input_tokens: 61_000,
        cache_creation_input_tokens: 2_400,
        cache_creation_5m_input_tokens: 0,
        cache_creation_1h_input_tokens: 2_400,
        ..Default::default()
    };
    let price = prices.lookup(None, "claude-sonnet-5").unwrap();
    c.bench_function("cost_computation", |b| b.iter(|| black_box(price.cost_nanos(black_box(&usage), false))));
    c.bench_function("price_lookup_by_pattern", |b| {
        b.iter(|| black_box(prices.lookup(None, black_box("us.anthropic.claude-sonnet-4-5-20250929-v1:0"))))
    });
}

/// Picking an endpoint from a provider's pool of three, per selection strategy.
fn endpoint_selection(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut g = c.benchmark_group("endpoint_selection");
    for selection in ["round_robin", "weighted", "least_in_flight", "session_affinity"] {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:8080\"\n[[provider]]\nname = \"p\"\nkind = \"anthropic\"\n\
             endpoints = [{{ url = \"http://127.0.0.1:9001\" }}, {{ url = \"http://127.0.0.2:9001\", weight = 2 }}, {{ url = \"http://127.0.0.3:9001\" }}]\n\
             credential = \"env:HOME\"\nselection = \"{selection}\"\nhealth = {{ probe = \"none\" }}\n"
        );
        let config = load_str(&text, "bench.toml").unwrap();
        let provider = Provider::from_config(&config.providers[0], &config.egress, 256).unwrap();
        rt.block_on(provider.pool.update());
        let key = b"3f1c2a9e-session-id".to_vec();
        g.bench_function(selection, |b| {
            b.iter(|| {
                black_box(provider.pool.select(black_box(&key), &[], tollgate::providers::now_ms(), false).unwrap())
            })
        });
    }
    g.finish();
}

/// Admission and settlement of one request against the four scopes a request can meet (key
/// with a budget and limits, user limits, team budget, model limits), among 10,000 keys'
/// counters: what budgets and rate limits add to a request.
fn admission(c: &mut Criterion) {
    use std::sync::Arc;
    use tollgate::limits::{
        Actual, Budget, Demand, Limiter, LocalLimiter, Period, Policy, RateLimits, Scope, ScopeKind,
    };
    let limiter = Arc::new(LocalLimiter::new(chrono_tz::Tz::UTC));
    let budget = |usd: u64| Some(Budget { limit_nanos: usd * 1_000_000_000_000, period: Period::Monthly });
    let limits = RateLimits {
        rpm: Some(u32::MAX),
        input_tpm: Some(u64::MAX / 4),
        output_tpm: Some(u64::MAX / 4),
        concurrency: Some(u32::MAX),
    };
    let scope = |kind, id: &str, policy| Scope { kind, id: id.into(), policy };
    let dyn_limiter: Arc<dyn Limiter> = limiter.clone();
    for i in 0..10_000 {
        let s = scope(ScopeKind::Key, &format!("key-{i}"), Policy { budget: budget(1), limits });
        dyn_limiter.clone().admit(vec![s], Demand::default()).ok().unwrap().settle(Actual::default());
    }
    let scopes = vec![
        scope(ScopeKind::Key, "key-4242", Policy { budget: budget(1_000), limits }),
        scope(ScopeKind::User, "alice@example.com", Policy { budget: None, limits }),
        scope(ScopeKind::Team, "platform", Policy { budget: budget(100_000), limits: RateLimits::default() }),
        scope(ScopeKind::Model, "claude-sonnet-4-5", Policy { budget: None, limits }),
    ];
    let demand = Demand { worst_nanos: 960_000_000, input_tokens: 20_000, output_tokens: 32_000 };
    let actual = Actual { cost_nanos: 61_000_000, input_tokens: 18_000, output_tokens: 900, at_ms: 0 };
    c.bench_function("admit_and_settle_4_scopes", |b| {
        b.iter(|| {
            let r = dyn_limiter.clone().admit(black_box(scopes.clone()), black_box(demand)).ok().unwrap();
            r.settle(black_box(actual));
        })
    });
}

/// A JWT credential: the first sight of a token (signature check and claims) and every later
/// request with the same token (cache hit by hash).
fn jwt(c: &mut Criterion) {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let secret = "bench-secret-of-at-least-thirty-two-bytes";
    let dir = std::env::temp_dir().join(format!("tollgate-bench-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:1\"\n[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\n\
         audience = [\"tollgate\"]\nsecrets = [{{ kid = \"k1\", secret = \"file:{}\" }}]\n",
        secret_file.display()
    );
    let config = load_str(&text, "jwt.toml").unwrap();
    let verifier = tollgate::auth::JwtVerifier::build(&config.jwt_issuers, None).unwrap();
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let mint = |i: u64| {
        let mut h = Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("k1".into());
        let claims =
            serde_json::json!({"user": format!("user-{i}"), "team": "platform", "aud": "tollgate", "exp": exp});
        encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    let warm = mint(0);
    verifier.verify(warm.as_bytes()).unwrap();
    let mut g = c.benchmark_group("jwt_verify");
    g.bench_function("cached", |b| b.iter(|| black_box(verifier.verify(black_box(warm.as_bytes())).unwrap())));
    // What a token costs the first time it is seen: signature and claims, no cache.
    let now = exp - 1800;
    g.bench_function("first_sight_hs256", |b| {
        b.iter(|| black_box(verifier.check(black_box(warm.as_bytes()), now).unwrap()))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The request-head check every request passes before Pingora parses it: a Claude Code head.
fn head_scan(c: &mut Criterion) {
    let head = "POST /v1/messages?beta=true HTTP/1.1\r\nhost: gateway.internal:8080\r\n\
        accept: application/json\r\nanthropic-beta: claude-code-20250219,oauth-2025-04-20,\
        interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14\r\n\
        anthropic-dangerous-direct-browser-access: true\r\nanthropic-version: 2023-06-01\r\n\
        content-type: application/json\r\nuser-agent: claude-cli/2.1.0 (external, cli)\r\n\
        x-api-key: tg-0123456789abcdef0123456789abcdef0123456789abcdef\r\nx-app: cli\r\n\
        x-claude-code-session-id: 6f1c2a9e-8d4b-4c3a-9f2e-1b7d5e3c4a21\r\n\
        x-stainless-arch: x64\r\nx-stainless-lang: js\r\nx-stainless-os: Linux\r\n\
        x-stainless-package-version: 0.60.0\r\nx-stainless-retry-count: 0\r\n\
        x-stainless-runtime: node\r\nx-stainless-runtime-version: v22.11.0\r\n\
        x-stainless-timeout: 600\r\ncontent-length: 81234\r\nconnection: keep-alive\r\n\r\n";
    let mut g = c.benchmark_group("head_scan");
    g.throughput(Throughput::Bytes(head.len() as u64));
    g.bench_function("claude_code_head", |b| {
        b.iter(|| {
            let mut s = tollgate::connections::scanner::HeadScanner::new(32 << 10, 100);
            black_box(s.feed(black_box(head.as_bytes())))
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    head_scan,
    sse_scan,
    json_usage,
    request_body,
    routing_and_keys,
    endpoint_selection,
    cost,
    admission,
    jwt
);
criterion_main!(benches);
