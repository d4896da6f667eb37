"""Runs the load benchmark: direct-to-mock, bare Pingora, Tollgate and LiteLLM, driven by the
same load generator with the same Claude Code-sized body. Called by run.sh, which builds and
installs everything first. Writes benches/results/load.md, load.json and load.png."""

import argparse
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from features import features  # noqa: E402  (the gateway's benchmarked features)

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benches" / "load"
WORK = HERE / "work"
RESULTS = ROOT / "benches" / "results"
REL = ROOT / "target" / "release"
LOADGEN = REL / "examples" / "loadgen"
VENV = HERE / ".venv"
MODEL = "claude-sonnet-4-5"
PORTS = {"mock": 19101, "slow_mock": 19102, "bare": 19103, "tollgate": 19104, "tollgate_admin": 19105, "litellm": 19106,
         "otlp": 19107}
PROVIDER_KEY = "sk-ant-bench-provider"
# Streams in the throughput matrix: 36 SSE events, this far apart. The memory test's streams are
# slow (250 ms apart, 15 s long) so that all 1,000 are open at once.
STREAM_DELAY_MS = 2
HOLD_DELAY_MS = 250
# `burst`: a stream of 50 text deltas the mock sends at once (about 7 KB): the gateway's own cost
# per streamed event, which paced streams hide behind the mock's delays.
MODES = {"json": [], "stream": [], "burst": ["x-mock-delay-ms: 0", "x-mock-deltas: 50"]}
THREADS = 1
# Helper processes started by a target (the OTLP sink), stopped at the end.
SINKS = []
LITELLM_KEY = "sk-bench-master-key"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---- CPU pinning -----------------------------------------------------------------------------

def cpus():
    return sorted(os.sched_getaffinity(0))


def pin_plan():
    c = cpus()
    if len(c) >= 2:
        return {"gateway": str(c[-1]), "other": ",".join(str(x) for x in c[:-1])}
    return {"gateway": None, "other": None}


def pinned(cmd, cpu):
    return (["taskset", "-c", cpu] if cpu and shutil.which("taskset") else []) + cmd


# ---- process accounting ----------------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def tree(pid):
    """pid and all its descendants."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    total = 0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / CLK


def rss_mb(pid, field="VmRSS:"):
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class PeakRss:
    """Samples the RSS of a process tree every 50 ms while active."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


# ---- targets ---------------------------------------------------------------------------------

def wait_http(url, timeout=120, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


def wait_port(port, timeout=60):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def start(cmd, cpu, env=None, logname="proc"):
    logf = open(WORK / f"{logname}.log", "w")
    return subprocess.Popen(pinned(cmd, cpu), stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)


def stop(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def tollgate_config(upstream_port, key_hash, fleet=False, otel=False):
    # Fleet mode counts the same budgets and limits in Redis (the machine's own, a prefix of
    # this run's: admission and settlement each cost one round trip) and writes the ledger to
    # PostgreSQL (a database of the benchmark's own).
    fleet_tables = (f'[limits]\nbackend = "redis"\nurl = "env:BENCH_REDIS_URL"\nprefix = "tollgate-bench-{os.getpid()}"\n'
                    f'[store]\nbackend = "postgres"\nurl = "env:BENCH_PG_URL"\nspool = "{WORK}/spool.jsonl"'
                    if fleet else f'[store]\npath = "{WORK}/tollgate.db"')
    # Every request traced (sampling 100 %) and exported to a sink that takes each batch.
    telemetry = (f'[telemetry]\notlp_endpoint = "http://127.0.0.1:{PORTS["otlp"]}/v1/traces"\nsample_ratio = 1.0'
                 if otel else "")
    # Every start gets an empty ledger and audit log: a SQLite file grown by earlier runs makes
    # each insert dearer (a later run's writer took half as much CPU again per request).
    for old in [*WORK.glob("tollgate.db*"), *WORK.glob("tollgate-audit.jsonl*")]:
        old.unlink()
    (WORK / "tollgate.toml").write_text(f"""
{fleet_tables}
[server]
threads = {THREADS}
grace_period = "1s"
upgrade_socket = "{WORK}/tollgate-upgrade.sock"
pid_file = "{WORK}/tollgate.pid"
[[listener]]
address = "127.0.0.1:{PORTS['tollgate']}"
[admin]
address = "127.0.0.1:{PORTS['tollgate_admin']}"
[audit]
path = "{WORK}/tollgate-audit.jsonl"
{telemetry}
{features(MODEL, upstream_port, key_hash)}""")
    return WORK / "tollgate.toml"


def litellm_config(upstream_port):
    # LiteLLM's production advice: one worker per core/pod, no verbose logging
    # (docs.litellm.ai/docs/proxy/prod and /proxy/server_tuning, read 2026-11-27).
    (WORK / "litellm.yaml").write_text(f"""
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: anthropic/claude-sonnet-4-5-20250929
      api_base: http://127.0.0.1:{upstream_port}
      api_key: {PROVIDER_KEY}
general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  set_verbose: false
  request_timeout: 600
""")
    return WORK / "litellm.yaml"


class Target:
    def __init__(self, name, port, headers, launch):
        self.name, self.port, self.headers, self.launch = name, port, headers, launch


def targets(key):
    def bare(up):
        return start([str(REL / "examples" / "bare_pingora"), f"127.0.0.1:{PORTS['bare']}", f"127.0.0.1:{up}", str(THREADS)],
                     PIN["gateway"], logname="bare"), lambda: wait_port(PORTS["bare"])

    def tollgate(up):
        cfg = tollgate_config(up, hashlib.sha256(key.encode()).hexdigest())
        p = start([str(REL / "tollgate"), "run", "--config", str(cfg)], PIN["gateway"],
                  env={"BENCH_PROVIDER_KEY": PROVIDER_KEY, "TOLLGATE_LOG": "warn"}, logname="tollgate")
        return p, lambda: wait_http(f"http://127.0.0.1:{PORTS['tollgate_admin']}/readyz")

    def tollgate_fleet(up):
        cfg = tollgate_config(up, hashlib.sha256(key.encode()).hexdigest(), fleet=True)
        pg = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/tollgate_bench")
        if "BENCH_PG_URL" not in os.environ and shutil.which("psql"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                            "CREATE DATABASE tollgate_bench"], capture_output=True)
        p = start([str(REL / "tollgate"), "run", "--config", str(cfg)], PIN["gateway"],
                  env={"BENCH_PROVIDER_KEY": PROVIDER_KEY, "TOLLGATE_LOG": "warn", "BENCH_PG_URL": pg,
                       "BENCH_REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/")},
                  logname="tollgate-fleet")
        return p, lambda: wait_http(f"http://127.0.0.1:{PORTS['tollgate_admin']}/readyz")

    def tollgate_otel(up):
        cfg = tollgate_config(up, hashlib.sha256(key.encode()).hexdigest(), otel=True)
        sink = start([sys.executable, str(HERE / "otlp_sink.py"), str(PORTS["otlp"])], PIN["other"], logname="otlp-sink")
        wait_port(PORTS["otlp"])
        p = start([str(REL / "tollgate"), "run", "--config", str(cfg)], PIN["gateway"],
                  env={"BENCH_PROVIDER_KEY": PROVIDER_KEY, "TOLLGATE_LOG": "warn"}, logname="tollgate-otel")
        SINKS.append(sink)
        return p, lambda: wait_http(f"http://127.0.0.1:{PORTS['tollgate_admin']}/readyz")

    def litellm(up):
        cfg = litellm_config(up)
        p = start([str(VENV / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(PORTS["litellm"]),
                   "--num_workers", "1"], PIN["gateway"], env={"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"},
                  logname="litellm")
        return p, lambda: wait_http(f"http://127.0.0.1:{PORTS['litellm']}/health/liveliness", timeout=180)

    return [
        Target("direct", None, [], None),
        Target("bare-pingora", PORTS["bare"], [], bare),
        Target("tollgate", PORTS["tollgate"], [f"x-api-key: {key}"], tollgate),
        Target("tollgate-fleet", PORTS["tollgate"], [f"x-api-key: {key}"], tollgate_fleet),
        Target("tollgate-otel", PORTS["tollgate"], [f"x-api-key: {key}"], tollgate_otel),
        Target("litellm", PORTS["litellm"], [f"Authorization: Bearer {LITELLM_KEY}"], litellm),
    ]


# ---- load ------------------------------------------------------------------------------------

def claude_code_body(stream):
    """A Claude Code-sized request: three system blocks, 24 tools, metadata, about 53 KB."""
    tools = [{"name": f"Tool{i}", "description": f"Tool number {i}. " * 40,
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
                               "required": ["path"]}} for i in range(24)]
    body = {"model": MODEL, "max_tokens": 64000, "stream": stream,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0"},
                       {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                       {"type": "text", "text": "Follow the user's instructions carefully. " * 600,
                        "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "tools": tools,
            "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Explain src/main.rs. " * 400}]}]}
    return json.dumps(body).encode()


# --small-body: one short user message (about 0.9 KB), the request the instruction count uses.
SMALL_BODY = False


def small_body(stream):
    text = "Explain what this function does and suggest a better name for it. " * 12
    return json.dumps({"model": MODEL, "max_tokens": 1024, "stream": stream,
                       "messages": [{"role": "user", "content": text}]}).encode()


def body_file(stream):
    path = WORK / f"body-{'stream' if stream else 'json'}.json"
    path.write_bytes(small_body(stream) if SMALL_BODY else claude_code_body(stream))
    return path


def loadgen(port, headers, body, concurrency, duration, extra=()):
    cmd = [str(LOADGEN), "--target", f"127.0.0.1:{port}", "--body", str(body), "--concurrency", str(concurrency),
           "--duration", f"{duration}s", "--header", "anthropic-version: 2023-06-01"]
    for h in headers:
        cmd += ["--header", h]
    out = subprocess.run(pinned(cmd + list(extra), PIN["other"]), capture_output=True, text=True, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr}")
    return json.loads(out.stdout)


def run_target(t, args, bodies, results):
    proc = None
    if t.launch:
        proc, ready = t.launch(PORTS["mock"])
        ready()
        time.sleep(1)
        results["idle_rss_mb"][t.name] = round(rss_mb(proc.pid), 1)
    port = t.port or PORTS["mock"]
    try:
        loadgen(port, t.headers, bodies[False], 4, 2)  # warm-up
        for mode, extra in MODES.items():
            headers = t.headers + extra
            for c in args.concurrency:
                cpu0 = cpu_seconds(proc.pid) if proc else 0
                if proc:
                    with PeakRss(proc.pid) as peak:
                        r = loadgen(port, headers, bodies[mode != "json"], c, args.duration)
                    r["peak_rss_mb"] = round(peak.peak, 1)
                    r["cpu_s_per_1k"] = round((cpu_seconds(proc.pid) - cpu0) / max(r["requests"], 1) * 1000, 3)
                else:
                    r = loadgen(port, headers, bodies[mode != "json"], c, args.duration)
                r.update(target=t.name, mode=mode, concurrency=c)
                results["runs"].append(r)
                log(f"{t.name:13} {mode:6} c={c:<4} {r['rps']:9.1f} rps  p50 {r['latency_ms']['p50']:8.2f} ms  "
                    f"p99 {r['latency_ms']['p99']:8.2f} ms  errors {r['errors']}")
    finally:
        if proc:
            stop(proc)
    if args.hold:
        proc, ready = t.launch(PORTS["slow_mock"]) if t.launch else (None, lambda: None)
        hold_port = t.port or PORTS["slow_mock"]
        try:
            ready()
            signal_file = WORK / "held"
            signal_file.unlink(missing_ok=True)
            holder = subprocess.Popen(pinned([str(LOADGEN), "--target", f"127.0.0.1:{hold_port}", "--body", str(bodies[True]),
                                              "--hold", str(args.hold), "--hold-signal", str(signal_file),
                                              "--header", "anthropic-version: 2023-06-01"] +
                                             [x for h in t.headers for x in ("--header", h)], PIN["other"]),
                                      stdout=subprocess.PIPE, text=True)
            deadline = time.time() + 90
            while not signal_file.exists() and time.time() < deadline:
                time.sleep(0.1)
            rss = rss_mb(proc.pid) if proc else None
            out = json.loads(holder.communicate(timeout=180)[0])
            # The process was started for this test: its high-water mark is the test's peak.
            peak = rss_mb(proc.pid, "VmHWM:") if proc else None
            results["hold"][t.name] = {"rss_mb": rss and round(rss, 1), "peak_rss_mb": peak and round(peak, 1), **out}
            log(f"{t.name:13} {args.hold} streams open: RSS {rss} MB ({out})")
        finally:
            if proc:
                stop(proc)


# ---- report ----------------------------------------------------------------------------------

def versions():
    def cmd(c):
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return "?"
    lit = cmd([str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return {"tollgate": cmd(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]), "pingora": "0.9.1",
            "litellm": lit, "rustc": cmd(["rustc", "--version"]), "python": platform.python_version(),
            "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(int(mem) / 1024 / 1024, 1),
            "kernel": platform.release(), "pinning": PIN}


def report(results, args):
    runs = results["runs"]
    direct = {(r["mode"], r["concurrency"]): r for r in runs if r["target"] == "direct"}
    lines = [f"# Load benchmark: Tollgate vs LiteLLM", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `benches/load/run.sh {' '.join(sys.argv[1:])}`.", ""]
    v = results["versions"]
    lines += [f"- Machine: {v['cpu']}, {v['cores']} cores, {v['memory_gib']} GiB, Linux {v['kernel']}",
              f"- Versions: Tollgate {v['tollgate']} (Pingora {v['pingora']}, {v['rustc']}), LiteLLM {v['litellm']} "
              f"(Python {v['python']}, 1 worker)",
              f"- Pinning: gateway on CPU {v['pinning']['gateway']}; load generator and mock on CPU {v['pinning']['other']}",
              f"- Body: {results['body_bytes']} bytes "
              f"({'one user message' if SMALL_BODY else '3 system blocks, 24 tools'}); streams: 36 SSE events, "
              f"{STREAM_DELAY_MS} ms apart; burst: 50 text deltas sent at once; held streams: 66 events, "
              f"{HOLD_DELAY_MS} ms apart",
              f"- Gateway worker threads: {THREADS}" + ("" if THREADS == 1 else " (gateway not pinned: both cores)"),
              f"- Each cell: {args.duration} s at a fixed concurrency over keep-alive connections", ""]
    head = "| target | mode | conc | req/s | p50 ms | p90 ms | p99 ms | max ms | +p50 ms | +p99 ms | TTFB p50 | TTFB p99 | max gap p99 | errors | CPU s/1k req | peak RSS MB |"
    lines += [head, "|" + "---|" * head.count("|")[:-1] if False else "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        d = direct.get((r["mode"], r["concurrency"]))
        add50 = r["latency_ms"]["p50"] - d["latency_ms"]["p50"] if d and r["target"] != "direct" else None
        add99 = r["latency_ms"]["p99"] - d["latency_ms"]["p99"] if d and r["target"] != "direct" else None
        s = r["mode"] != "json"
        f = lambda x: "" if x is None else f"{x:.2f}"
        lines.append(f"| {r['target']} | {r['mode']} | {r['concurrency']} | {r['rps']:.0f} | {f(r['latency_ms']['p50'])} | "
                     f"{f(r['latency_ms']['p90'])} | {f(r['latency_ms']['p99'])} | {f(r['latency_ms']['max'])} | {f(add50)} | "
                     f"{f(add99)} | {f(r['ttfb_ms']['p50']) if s else ''} | {f(r['ttfb_ms']['p99']) if s else ''} | "
                     f"{f(r['max_gap_ms']['p99']) if s else ''} | {r['errors']} | {r.get('cpu_s_per_1k', '')} | "
                     f"{r.get('peak_rss_mb', '')} |")
    lines += ["", f"{args.hold} streams open at once:", "",
              "| target | idle RSS MB | RSS with all open, MB | peak RSS MB | completed | errors | largest gap ms |",
              "|---|---|---|---|---|---|---|"]
    for name, h in results["hold"].items():
        lines.append(f"| {name} | {results['idle_rss_mb'].get(name, '')} | {h.get('rss_mb') or ''} | "
                     f"{h.get('peak_rss_mb') or ''} | {h.get('completed')} of {h.get('held')} | {h.get('errors')} | "
                     f"{h.get('max_gap_ms', 0):.1f} |")
    lines += ["", "Targets (ratios from this run):", ""] + targets_met(results)
    lines += ["", "![load chart](load.png)", ""]
    md = "\n".join(lines)
    (RESULTS / "load.md").write_text(md)
    (RESULTS / "load.json").write_text(json.dumps(results, indent=1))
    chart(runs, args)
    print(md)


def targets_met(results):
    runs = results["runs"]
    cell = {(r["target"], r["mode"], r["concurrency"]): r for r in runs}
    out = []
    for mode in MODES:
        for c in sorted({r["concurrency"] for r in runs}):
            t, b, d, l = (cell.get((n, mode, c)) for n in ["tollgate", "bare-pingora", "direct", "litellm"])
            if not (t and b):
                continue
            parts = [f"- {mode} c={c}: throughput {t['rps'] / b['rps']:.0%} of bare Pingora (target >= 95%)"]
            if d:
                for q in ["p50", "p99"]:
                    ta, ba = t["latency_ms"][q] - d["latency_ms"][q], b["latency_ms"][q] - d["latency_ms"][q]
                    parts.append(f"added {q} {ta:.2f} ms vs {ba:.2f} ms" + (f" ({ta / ba:.1f}x, target <= 1.2x)" if ba > 0 else ""))
            if l and l["rps"] > 0:
                parts.append(f"{t['rps'] / l['rps']:.0f}x LiteLLM (target >= 300x)")
            out.append("; ".join(parts))
    h = results["hold"].get("tollgate")
    if h:
        base = results["hold"].get("direct", {}).get("max_gap_ms")
        out.append(f"- {h['held']} streams: {h['errors']} errors (target 0); largest gap {h['max_gap_ms']:.1f} ms "
                   f"(mock delay {HOLD_DELAY_MS} ms; direct-to-mock largest gap {base and round(base, 1)} ms; target: delay + 1 ms); "
                   f"peak RSS {h.get('peak_rss_mb')} MB (target < 64 MB)")
    return out


def chart(runs, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart")
        return
    fig, axes = plt.subplots(2, len(MODES), figsize=(18, 8))
    titles = {"json": "non-streaming", "stream": "streaming (paced)", "burst": "streaming (sent at once)"}
    for col, mode in enumerate(MODES):
        for name in ["direct", "bare-pingora", "tollgate", "litellm"]:
            rs = [r for r in runs if r["target"] == name and r["mode"] == mode]
            if not rs:
                continue
            xs = [r["concurrency"] for r in rs]
            axes[0][col].plot(xs, [r["rps"] for r in rs], marker="o", label=name)
            axes[1][col].plot(xs, [r["latency_ms"]["p99"] for r in rs], marker="o", label=name)
        axes[0][col].set_title(f"{titles[mode]}: requests/s")
        axes[1][col].set_title(f"{titles[mode]}: p99 latency (ms)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.grid(True, alpha=0.3)
            ax.legend()
        axes[1][col].set_yscale("log")
    fig.tight_layout()
    fig.savefig(RESULTS / "load.png", dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8, help="seconds per cell")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    ap.add_argument("--hold", type=int, default=1000, help="streams held open for the memory test (0: skip)")
    ap.add_argument("--targets", default="direct,bare-pingora,tollgate,litellm")
    ap.add_argument("--threads", type=int, default=1,
                    help="gateway worker threads (Tollgate and bare Pingora); above 1 the gateway is not pinned")
    ap.add_argument("--small-body", action="store_true",
                    help="a 0.9 KB request (one user message) instead of the 53 KB Claude Code-sized one")
    args = ap.parse_args()
    global SMALL_BODY
    SMALL_BODY = args.small_body
    global THREADS
    THREADS = args.threads
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    global PIN
    PIN = pin_plan()
    if THREADS > 1:
        PIN["gateway"] = None
    mocks = [start([str(REL / "tollgate-mock"), "--listen", f"127.0.0.1:{PORTS['mock']}", "--threads", "1",
                    "--deltas", "30", "--delay-ms", str(STREAM_DELAY_MS)], PIN["other"], logname="mock"),
             start([str(REL / "tollgate-mock"), "--listen", f"127.0.0.1:{PORTS['slow_mock']}", "--threads", "1",
                    "--deltas", "60", "--delay-ms", str(HOLD_DELAY_MS)], PIN["other"], logname="slow_mock")]
    try:
        wait_port(PORTS["mock"])
        wait_port(PORTS["slow_mock"])
        key = "tg-" + secrets.token_hex(24)
        bodies = {False: body_file(False), True: body_file(True)}
        results = {"versions": versions(), "runs": [], "idle_rss_mb": {}, "hold": {},
                   "body_bytes": bodies[False].stat().st_size}
        wanted = args.targets.split(",")
        for t in targets(key):
            if t.name in wanted:
                run_target(t, args, bodies, results)
        report(results, args)
    finally:
        for m in mocks + SINKS:
            stop(m)


if __name__ == "__main__":
    main()
