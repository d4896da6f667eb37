"""The soak test: Tollgate under steady mixed load for a few minutes, sampling its resident memory
and open file descriptors, to show both flat. Called by soak.sh, which builds everything first.

Each round runs, at once: streamed and non-streamed Claude Code-sized requests on keep-alive
connections, and requests refused before they reach the provider (an unknown key). Rounds start
new load generator processes, so connections churn as they do in production. Writes
benches/results/soak.md and soak.csv."""

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the load benchmark's helpers: ports, configs, process control)
from bench import LOADGEN, PORTS, REL, RESULTS, WORK, log, rss_mb, start, stop, wait_http, wait_port  # noqa: E402


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def load(port, headers, body, concurrency, seconds, cpu):
    cmd = [str(LOADGEN), "--target", f"127.0.0.1:{port}", "--body", str(body), "--concurrency", str(concurrency),
           "--duration", f"{seconds}s", "--header", "anthropic-version: 2023-06-01"]
    for h in headers:
        cmd += ["--header", h]
    return subprocess.Popen(bench.pinned(cmd, cpu), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5, help="how long to soak")
    ap.add_argument("--round", type=int, default=15, help="seconds per round of load generators")
    ap.add_argument("--sample", type=float, default=5, help="seconds between samples")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # A fresh ledger and audit log: the soak starts as a new deployment does, and leaves no
    # gigabytes behind.
    fresh = [WORK / "tollgate-audit.jsonl"] + list(WORK.glob("tollgate.db*"))
    for f in fresh:
        f.unlink(missing_ok=True)
    bench.PIN = bench.pin_plan()
    pin = bench.PIN
    mock = start([str(REL / "tollgate-mock"), "--listen", f"127.0.0.1:{PORTS['mock']}", "--threads", "1",
                  "--deltas", "30", "--delay-ms", "2"], pin["other"], logname="soak-mock")
    key = "tg-" + secrets.token_hex(24)
    import hashlib
    cfg = bench.tollgate_config(PORTS["mock"], hashlib.sha256(key.encode()).hexdigest())
    gw = start([str(REL / "tollgate"), "run", "--config", str(cfg)], pin["gateway"],
               env={"BENCH_PROVIDER_KEY": bench.PROVIDER_KEY, "TOLLGATE_LOG": "warn"}, logname="soak-tollgate")
    samples = []
    done = threading.Event()
    try:
        wait_port(PORTS["mock"])
        wait_http(f"http://127.0.0.1:{PORTS['tollgate_admin']}/readyz")
        bodies = {s: bench.body_file(s) for s in (False, True)}
        started = time.time()

        def sampler():
            while not done.is_set():
                samples.append((round(time.time() - started, 1), round(rss_mb(gw.pid), 1), fds(gw.pid)))
                done.wait(args.sample)

        t = threading.Thread(target=sampler, daemon=True)
        t.start()
        rounds = requests = 0
        good = [f"x-api-key: {key}"]
        while time.time() - started < args.minutes * 60:
            procs = [load(PORTS["tollgate"], good, bodies[True], 8, args.round, pin["other"]),
                     load(PORTS["tollgate"], good, bodies[False], 8, args.round, pin["other"]),
                     load(PORTS["tollgate"], ["x-api-key: tg-unknown"], bodies[False], 2, args.round, pin["other"])]
            for p in procs:
                out, _ = p.communicate(timeout=args.round + 120)
                try:
                    requests += bench.json.loads(out)["requests"]
                except (ValueError, KeyError):
                    pass
            rounds += 1
        done.set()
        t.join()
    finally:
        done.set()
        stop(gw)
        stop(mock)
        ledger_mb = sum(f.stat().st_size for f in WORK.glob("tollgate.db*")) / 1e6
        for f in [WORK / "tollgate-audit.jsonl"] + list(WORK.glob("tollgate.db*")):
            f.unlink(missing_ok=True)
    report(samples, rounds, requests, ledger_mb, args)


def report(samples, rounds, requests, ledger_mb, args):
    (RESULTS / "soak.csv").write_text("seconds,rss_mb,fds\n" + "".join(f"{s},{r},{f}\n" for s, r, f in samples))
    # Flat: the last third of the run holds no more than the middle third plus a small allowance
    # for allocator noise. The first third is warm-up: caches fill (SQLite's page cache among
    # them, while the ledger grows by hundreds of MB).
    third = max(1, len(samples) // 3)
    first, last = samples[third:2 * third], samples[-third:]
    rss_first = round(statistics.median(r for _, r, _ in first), 1)
    rss_last = round(statistics.median(r for _, r, _ in last), 1)
    fd_first, fd_last = max(f for _, _, f in first), max(f for _, _, f in last)
    rss_flat = max(r for _, r, _ in last) <= max(r for _, r, _ in first) * 1.03 + 2
    fds_flat = fd_last <= fd_first + 8
    lines = [
        "# Soak: Tollgate under steady mixed load",
        "",
        f"{args.minutes:g} minutes, {rounds} rounds of {args.round} s, {requests:,} requests answered "
        "(streamed and non-streamed on 8 connections each, unknown-key refusals on 2), "
        f"sampled every {args.sample:g} s. Produced by `benches/load/soak.sh`.",
        "",
        f"The ledger reached {ledger_mb:,.0f} MB on disk. The first third of the run is warm-up and not judged.",
        "",
        "| | middle third (median / max) | last third (median / max) | flat |",
        "|---|---|---|---|",
        f"| RSS (MB) | {rss_first} / {max(r for _, r, _ in first)} | {rss_last} / {max(r for _, r, _ in last)} | "
        f"{'yes' if rss_flat else 'NO'} |",
        f"| open file descriptors | {statistics.median(f for _, _, f in first)} / {fd_first} | "
        f"{statistics.median(f for _, _, f in last)} / {fd_last} | {'yes' if fds_flat else 'NO'} |",
        "",
        "Every sample is in `soak.csv`.",
    ]
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if rss_flat and fds_flat else 1)


if __name__ == "__main__":
    main()
