#!/usr/bin/env python3
"""CPU per request of each of the gateway's threads under load: the workers, and the writers
that run beside them (ledger, audit) and share their core.

The release gateway (the instruction count's configuration: key auth, budgets, limits,
metering, the audit log, the SQLite ledger; one worker) is pinned to the last CPU, the release
mock and the load generator to the others. The load generator sends the load benchmark's 53 KB
non-streamed request (or `--small-body`) for `--duration` seconds at `--concurrency`. Each
thread's user and system time over the run (from /proc/PID/task/TID/stat, so at the kernel's
tick of 10 ms: read long runs) is divided by the requests completed. The writers batch, so a
busy gateway's share per row is what this shows; `benches/instructions.py` counts the same
work at a few requests at a time.

  python3 benches/thread_cpu.py                        # 10 s at c=64
  python3 benches/thread_cpu.py --binary /tmp/other    # another gateway build, for an A/B

Needs release builds of `tollgate`, `tollgate-mock` and `examples/loadgen`.
"""

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "load"))
import instructions  # noqa: E402  (its gateway configuration and helpers)
from bench import claude_code_body, small_body, pin_plan, pinned, stop  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def thread_times(pid):
    """{thread name: CPU seconds} summed over the threads of that name."""
    times = collections.Counter()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        times[name] += (int(fields[11]) + int(fields[12])) / CLK
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(instructions.REL / "tollgate"), help="the gateway to run")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--small-body", action="store_true", help="a 0.9 KB request instead of 53 KB")
    args = ap.parse_args()
    loadgen = instructions.REL / "examples" / "loadgen"
    for path in (pathlib.Path(args.binary), instructions.REL / "tollgate-mock", loadgen):
        if not path.exists():
            raise SystemExit(f"error: {path} is missing: cargo build --release --bin tollgate --bin tollgate-mock "
                             "--example loadgen")
    pins = pin_plan()
    work = pathlib.Path(tempfile.mkdtemp(prefix="tollgate-threads-"))
    upstream, port, admin = instructions.free_port(), instructions.free_port(), instructions.free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(pinned([str(instructions.REL / "tollgate-mock"), "--listen",
                                              f"127.0.0.1:{upstream}", "--threads", "1"], pins["other"]),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        env = dict(os.environ, BENCH_PROVIDER_KEY="bench-provider-key", TOLLGATE_LOG="warn")
        gw = subprocess.Popen(pinned([args.binary, "run", "--config", str(instructions.config(work, port, admin, upstream))],
                                     pins["gateway"]),
                              cwd=work, env=env, stdout=open(work / "gateway.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
        procs.append(gw)
        instructions.wait_http(admin, "/readyz", 60)
        body = work / "body.json"
        body.write_bytes(small_body(False) if args.small_body else claude_code_body(False))
        before = thread_times(gw.pid)
        run = subprocess.run(pinned([str(loadgen), "--target", f"127.0.0.1:{port}", "--body", str(body),
                                     "--concurrency", str(args.concurrency), "--duration", f"{args.duration}s",
                                     "--header", "anthropic-version: 2023-06-01",
                                     "--header", f"x-api-key: {instructions.KEY}"], pins["other"]),
                             capture_output=True, text=True, timeout=args.duration + 120)
        if run.returncode != 0:
            raise SystemExit(f"loadgen failed: {run.stderr}")
        # The writers flush what the last requests queued (the ledger every 200 ms).
        time.sleep(1.0)
        after = thread_times(gw.pid)
        result = json.loads(run.stdout)
        n = result["requests"]
        if result["errors"] or not n:
            raise SystemExit(f"the run had errors: {run.stdout}")
        print(f"{n} requests in {result['seconds']:.1f} s ({result['rps']:.0f} a second), "
              f"c={args.concurrency}, {body.stat().st_size} byte request\n")
        print("| thread | CPU s | µs per request |\n|---|---|---|")
        total = 0.0
        for name in sorted(after, key=lambda k: -(after[k] - before.get(k, 0))):
            spent = after[name] - before.get(name, 0)
            total += spent
            if spent > 0:
                print(f"| {name} | {spent:.2f} | {spent / n * 1e6:.1f} |")
        print(f"| all | {total:.2f} | {total / n * 1e6:.1f} |")
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
