#!/usr/bin/env python3
"""Where a saturated gateway's CPU time goes, by part, from `perf` samples.

callgrind (benches/instructions.py) counts instructions in user space, exactly; this counts
time, the kernel's included, at the load benchmark's concurrency. The two disagree where a
copy is cheap in instructions and dear in cache misses, or where the kernel does the work.

Record while the load benchmark holds the pinned gateway busy (its json cell at c=64 runs
first after start-up and lasts --duration seconds):

    python3 benches/load/bench.py --targets tollgate --duration 10 --concurrency 64 --hold 0 &
    sleep 6; pid=$(pgrep -f '^[^ ]*release/tollgate run')   # anchored: not the shell running this
    perf record -e cpu-clock -F 400 --call-graph dwarf,8192 -p "$pid" -o tollgate.data -- sleep 3
    perf script -i tollgate.data -F comm,tid,ip,sym > tollgate.txt
    python3 benches/time_breakdown.py tollgate.txt 163

The second argument is the cell's CPU microseconds per request (bench.py's "CPU s/1k req"
times 1,000): each part's share of the samples is scaled to it. Several dumps may be given,
each followed by its figure, for a side-by-side table (bare Pingora's process name is
`bare_pingora`). Each sample goes to the first part below that any frame of its stack names,
so the kernel's work is counted with the call that asked for it.
"""

import collections
import re
import sys

# In order: the first part any frame of a sample matches takes the sample.
PARTS = [
    ("ledger writer (SQLite)", r"sqlite3|commit_queue|rusqlite|pcache1|pagerWal|walIndex"),
    ("audit writer", r"tollgate::audit::"),
    ("metrics", r"prometheus"),
    ("body: walk (peek, reference scan, UTF-8)", r"json_peek|references::|simdutf8"),
    ("body: read from the client", r"proxy::body::|read_body_within"),
    ("upstream: write the request", r"exchange.*send::|write_request_header|write_request_body|finish_request_body|write_body"),
    ("upstream: read the answer's head", r"read_final_header|read_response_header|read_response::"),
    ("answer: forward and meter", r"stream_answer|ResponseMeter|usage_from_json|write_response_body|read_response_body"),
    ("connection back to the pool", r"release_http_session|Connector::release|release_stream"),
    ("logging phase (settle, record)", r"ProxyHttp>::logging|proxy::accounting::"),
    ("admission, key lookup, routing", r"proxy::admission|tollgate::limits::|tollgate::auth::|tollgate::routing::|proxy::identity"),
    ("request head: read and guard", r"read_request|HeadGuard|connections::head"),
    ("rest of request_filter", r"request_filter|Gateway::serve|proxy::fallback::"),
    ("Pingora: the rest of its request loop", r"pingora_proxy|process_new|pingora_core"),
    ("tokio: scheduler, timers, I/O driver", r"tokio::|mio::|pingora_timeout|epoll"),
]


def samples(path):
    """Each sample's frames, leaf first, from `perf script -F comm,tid,ip,sym` output."""
    frames = []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                if frames:
                    yield frames
                frames = []
            elif line[0] in " \t":
                parts = line.split(None, 1)
                frames.append(parts[1].strip() if len(parts) > 1 else "")
    if frames:
        yield frames


def part_of(frames):
    for name, pattern in PARTS:
        if any(re.search(pattern, frame) for frame in frames):
            return name
    return "other"


def breakdown(path, us_per_request):
    counts = collections.Counter(part_of(frames) for frames in samples(path))
    total = sum(counts.values()) or 1
    return {name: n / total * us_per_request for name, n in counts.items()}, total


def main(argv):
    if len(argv) < 2 or len(argv) % 2:
        raise SystemExit(__doc__)
    runs = [(argv[i], breakdown(argv[i], float(argv[i + 1]))) for i in range(0, len(argv), 2)]
    names = [n for n, _ in PARTS] + ["other"]
    print("| µs per request | " + " | ".join(f"{path} ({n} samples)" for path, (_, n) in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for name in names:
        if any(name in parts for _, (parts, _) in runs):
            print(f"| {name} | " + " | ".join(f"{parts.get(name, 0):.1f}" for _, (parts, _) in runs) + " |")
    print("| total | " + " | ".join(f"{sum(parts.values()):.1f}" for _, (parts, _) in runs) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
