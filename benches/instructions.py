#!/usr/bin/env python3
"""Instructions per request through the real gateway, counted by callgrind: repeatable where
wall-clock timings are not, so CI can hold the line on the gateway's per-request cost.

The release gateway runs under `valgrind --tool=callgrind` (one worker thread, the benchmark's
features on: key auth, a team and key budget, rate limits, metering, the audit log and the
SQLite ledger) in front of the release mock provider, which runs natively. After a warm-up,
counting is switched on around N requests of one kind on one keep-alive connection, and the
instructions of every gateway thread (the ledger and audit writers included) are divided by N.

  python3 benches/instructions.py                 # measure, print
  python3 benches/instructions.py --check         # fail if a kind grew past the baseline's margin
  python3 benches/instructions.py --update        # write the baseline (benches/results/instructions.json)
  python3 benches/instructions.py --profile DIR   # also keep the callgrind files, for callgrind_annotate
  python3 benches/instructions.py --otel          # with every request traced to a local OTLP sink
  python3 benches/instructions.py --large         # the load benchmark's 53 KB request instead of 1 KB

Needs release builds of `tollgate` and `tollgate-mock` (CARGO_TARGET_DIR honoured) and valgrind.
"""

import argparse
import hashlib
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches" / "load"))
from features import features  # noqa: E402  (the same features as the load benchmark)

TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
REL = TARGET / "release"
BASELINE = ROOT / "benches" / "results" / "instructions.json"
KEY = "tg-instructions-bench-key-0123456789"
MODEL = "claude-sonnet-4-5"
# A fixed ~1 KB Anthropic request, as the performance issue measures.
PROMPT = "Explain what this function does and suggest a better name for it. " * 12
KINDS = {
    # 600-byte JSON answer.
    "json": {"stream": False, "headers": {}},
    # 50 text deltas sent at once (about 7 KB of SSE).
    "stream": {"stream": True, "headers": {"x-mock-deltas": "50", "x-mock-delay-ms": "0"}},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, path, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"127.0.0.1:{port}{path} did not answer 200 within {timeout}s")


def config(work, port, admin, upstream, otlp_port=None):
    key_hash = hashlib.sha256(KEY.encode()).hexdigest()
    # Traced: every request, exported every 200 ms so each kind's spans leave within its window.
    telemetry = (f'[telemetry]\notlp_endpoint = "http://127.0.0.1:{otlp_port}/v1/traces"\n'
                 'sample_ratio = 1.0\nexport_interval = "200ms"\n') if otlp_port else ""
    text = f"""
[server]
threads = 1
grace_period = "1s"
upgrade_socket = "{work}/upgrade.sock"
pid_file = "{work}/tollgate.pid"
[[listener]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[audit]
path = "{work}/audit.jsonl"
[store]
path = "{work}/tollgate.db"
{features(MODEL, upstream, key_hash, probe=False)}
{telemetry}"""
    path = work / "tollgate.toml"
    path.write_text(text)
    return path


# --large: the load benchmark's Claude Code-sized request (about 53 KB) instead.
LARGE = False


def body(stream):
    if LARGE:
        from bench import claude_code_body
        return claude_code_body(stream)
    return json.dumps({
        "model": MODEL, "max_tokens": 1024, "stream": stream,
        "messages": [{"role": "user", "content": PROMPT}],
    }).encode()


def wait_port(port, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def send(conn, kind, n):
    spec = KINDS[kind]
    payload = body(spec["stream"])
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    headers.update(spec["headers"])
    for _ in range(n):
        conn.request("POST", "/v1/messages", body=payload, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{kind}: {r.status} {data[:300]!r}")


def control(pid, *args):
    out = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)}: {out.stderr or out.stdout}")


def dumped_total(files_before, out_dir):
    """The instruction total of the newest dump in out_dir not in files_before."""
    deadline = time.time() + 60
    while time.time() < deadline:
        new = sorted(set(out_dir.glob("callgrind.out*")) - files_before, key=lambda p: p.stat().st_mtime)
        for f in new:
            text = f.read_text(errors="replace")
            m = re.search(r"^totals:\s*(\d+)", text, re.M) or re.search(r"^summary:\s*(\d+)", text, re.M)
            if m:
                return int(m.group(1)), f
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def measure(n, profile_dir=None, bare=False, otel=False):
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            raise SystemExit(f"error: {tool} is needed (Debian: apt-get install valgrind)")
    for binary in ("tollgate", "tollgate-mock") + (("examples/bare_pingora",) if bare else ()):
        if not (REL / binary).exists():
            raise SystemExit(f"error: {REL / binary} is missing: cargo build --release --bin tollgate --bin tollgate-mock "
                             "(and --example bare_pingora for --bare)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="tollgate-instr-"))
    out_dir = pathlib.Path(profile_dir) if profile_dir else work
    out_dir.mkdir(parents=True, exist_ok=True)
    upstream, port, admin = free_port(), free_port(), free_port()
    procs = []
    try:
        mock = subprocess.Popen([str(REL / "tollgate-mock"), "--listen", f"127.0.0.1:{upstream}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(mock)
        otlp_port = None
        if otel:
            otlp_port = free_port()
            sink = subprocess.Popen([sys.executable, str(ROOT / "benches" / "load" / "otlp_sink.py"), str(otlp_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(sink)
            wait_port(otlp_port, 30)
        env = dict(os.environ, BENCH_PROVIDER_KEY="bench-provider-key", TOLLGATE_LOG="warn")
        if bare:
            # Pingora's own proxy with nothing added: what any Pingora gateway pays.
            command = [str(REL / "examples" / "bare_pingora"), f"127.0.0.1:{port}", f"127.0.0.1:{upstream}", "1"]
        else:
            command = [str(REL / "tollgate"), "run", "--config", str(config(work, port, admin, upstream, otlp_port))]
        gw = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
             *command],
            cwd=work, env=env, stdout=open(work / "gateway.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(gw)
        if bare:
            wait_port(port, 180)
        else:
            wait_http(admin, "/readyz", 180)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        results = {}
        for kind in KINDS:
            # Warm-up: connections to the mock opened, allocator and caches settled.
            send(conn, kind, 30)
            time.sleep(0.5)
            before = set(out_dir.glob("callgrind.out*"))
            control(gw.pid, "--zero")
            control(gw.pid, "--instr=on")
            send(conn, kind, n)
            # The writers flush what these requests queued (every 200 ms).
            time.sleep(0.6)
            control(gw.pid, "--instr=off")
            control(gw.pid, "--dump=" + kind)
            total, f = dumped_total(before, out_dir)
            results[kind] = round(total / n)
            if profile_dir:
                f.rename(out_dir / f"callgrind.{'bare-' if bare else ''}{kind}.out")
        return results
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not profile_dir:
            shutil.rmtree(work, ignore_errors=True)


# Where a request's instructions go: inclusive costs of the functions that stand for each part
# (they overlap where one part calls another; memcpy is counted inside its callers too).
COMPONENTS = [
    ("request head guard (deadline, size and syntax checks)", "<tollgate::connections::head::HeadGuard as tokio::io::async_read::AsyncRead>::poll_read"),
    ("everything in request_filter (the rows below, and Pingora's I/O they call)", "<tollgate::proxy::Gateway as pingora_proxy::proxy_trait::ProxyHttp>::request_filter::{{closure}}"),
    ("  caller: key lookup", "tollgate::proxy::identity::<impl tollgate::proxy::Gateway>::authenticate"),
    ("  body: peek and reference scan (model, stream, max_tokens; content fetched by URL, tools)", "tollgate::protocol::references::peek_and_scan"),
    ("  admission (budgets, limits)", "tollgate::limits::local::LocalLimiter as tollgate::limits::Limiter>::admit_held"),
    ("  upstream request (headers, credentials)", "tollgate::proxy::fallback::<impl tollgate::proxy::Gateway>::upstream_request"),
    ("  answer: forward and meter (SSE scan)", "tollgate::proxy::exchange::<impl tollgate::proxy::Gateway>::stream_answer::{{closure}}"),
    ("  answer: usage read at the end", "tollgate::proxy::meter::ResponseMeter::finish"),
    ("  response headers for the client", "tollgate::proxy::headers::response_for_client"),
    ("logging phase (usage record, settlement, metrics)", "<tollgate::proxy::Gateway as pingora_proxy::proxy_trait::ProxyHttp>::logging::{{closure}}"),
    ("audit writer thread (JSON line)", "tollgate::audit::write_batch"),
    ("ledger writer thread (SQLite insert)", "tollgate::store::sqlite::commit_queue"),
    ("memcpy (moves of large futures, mostly)", "__memcpy_avx_unaligned_erms"),
    ("allocation and free", "_rjem_malloc"),
]


def breakdown(profile, n):
    """Rows of (component, instructions per request) from a callgrind file."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(profile)], capture_output=True, text=True).stdout
    costs = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)$", line)
        if m and "=>" not in line:
            name = m.group(2).rsplit(" [", 1)[0]
            fn = name.split(":", 1)[1] if ":" in name else name
            for k in {fn, name}:
                costs[k] = max(costs.get(k, 0), int(m.group(1).replace(",", "")))
    rows = [("total", costs.get("PROGRAM TOTALS", max(costs.values(), default=0)))]
    # A function the optimizer inlined everywhere (fat LTO does this to small ones) has no
    # entry of its own: None, and its cost is in its callers' rows.
    for label, fn in COMPONENTS:
        rows.append((label, max((v for k, v in costs.items() if fn in k), default=None)))
    if any(fn == "_rjem_malloc" for _, fn in COMPONENTS):
        rows[-1] = (rows[-1][0], (rows[-1][1] or 0) + max((v for k, v in costs.items() if "_rjem_sdallocx" in k), default=0))
    return [(label, None if v is None else round(v / n)) for label, v in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="requests counted per kind")
    ap.add_argument("--check", action="store_true", help="fail if a kind grew past the baseline's margin")
    ap.add_argument("--update", action="store_true", help="write the measurement as the new baseline")
    ap.add_argument("--profile", metavar="DIR", help="keep the callgrind files in DIR")
    ap.add_argument("--bare", action="store_true", help="also measure the bare Pingora proxy (benches/load/bare_pingora.rs)")
    ap.add_argument("--otel", action="store_true", help="also measure with every request traced (OTLP to a local sink)")
    ap.add_argument("--large", action="store_true",
                    help="send the load benchmark's 53 KB Claude Code-sized request instead of the 1 KB one")
    args = ap.parse_args()
    if args.large and (args.check or args.update):
        raise SystemExit("error: the baseline is for the 1 KB request; --large measures, it does not check")
    global LARGE
    LARGE = args.large
    got = measure(args.requests, args.profile)
    print(json.dumps({"instructions_per_request": got}))
    if args.otel:
        traced = measure(args.requests, otel=True)
        print(json.dumps({"traced_instructions_per_request": traced}))
    if args.bare:
        bare = measure(args.requests, args.profile, bare=True)
        print(json.dumps({"bare_pingora_instructions_per_request": bare}))
    if args.profile:
        for kind in KINDS:
            print(f"\n{kind}: instructions per request, by part (inclusive)\n")
            print("| part | instructions |\n|---|---|")
            for label, v in breakdown(pathlib.Path(args.profile) / f"callgrind.{kind}.out", args.requests):
                print(f"| {label} | {'inlined: in its caller' if v is None else f'{v:,}'} |")
    if args.update:
        base = json.loads(BASELINE.read_text()) if BASELINE.exists() else {"margin": 0.05}
        base["instructions_per_request"] = got
        base["measured"] = time.strftime("%Y-%m-%d")
        BASELINE.write_text(json.dumps(base, indent=2) + "\n")
        print(f"baseline written: {BASELINE}")
    if args.check:
        base = json.loads(BASELINE.read_text())
        margin = base["margin"]
        failed = []
        for kind, value in got.items():
            allowed = base["instructions_per_request"][kind] * (1 + margin)
            verdict = "ok" if value <= allowed else "TOO MANY"
            print(f"{kind}: {value} instructions per request; baseline {base['instructions_per_request'][kind]}, "
                  f"allowed {allowed:.0f} (+{margin:.0%}): {verdict}")
            if value > allowed:
                failed.append(kind)
        if failed:
            print(f"error: the per-request cost grew past the baseline for {', '.join(failed)}: find what costs "
                  "(--profile DIR, then callgrind_annotate) or, if the cost is wanted, --update the baseline and say "
                  "why in the commit", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
