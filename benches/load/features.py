"""The gateway's features as the benchmarks measure them, shared by the load benchmark
(bench.py) and the instruction count (../instructions.py): one provider and model, and a key
under a key budget, a team budget and rate limits on every scope, none of them reached, so
every request pays for admission and settlement as a production key does."""


def features(model, upstream_port, key_hash, probe=True):
    health = "" if probe else 'health = { probe = "none" }\n'
    return f"""
[[provider]]
name = "mock"
kind = "anthropic"
base_url = "http://127.0.0.1:{upstream_port}"
credential = "env:BENCH_PROVIDER_KEY"
{health}[[model]]
name = "{model}"
deployments = [{{ provider = "mock", model = "claude-sonnet-4-5-20250929" }}]
[[key]]
id = "bench"
hash = "sha256:{key_hash}"
team = "bench"
user = "bench-user"
budget = {{ usd = 1000000, period = "monthly" }}
limits = {{ rpm = 100000000, output_tpm = 1000000000000, concurrency = 100000 }}
[[team]]
id = "bench"
budget = {{ usd = 1000000, period = "daily" }}
[[user]]
id = "bench-user"
limits = {{ concurrency = 100000 }}
"""
