#!/usr/bin/env python3
"""What one ledger row costs the SQLite writer as the ledger grows, by the shape of its request id.

The ledger's primary key is the request id. A random id puts each new index entry on a random
page of the index: once the index outgrows SQLite's page cache, an insert reads a page from the
file and the commit writes it back, so a row costs more the larger the ledger. A time-ordered
id (`req_` + the time in ms + random bits, as the gateway issues) lands at the index's end,
or, in a ledger an older gateway filled with random ids, at one point inside it (the last
column).

The schema is read from `src/store/sqlite.rs` and opened with the store's pragmas (WAL,
`synchronous = NORMAL`, SQLite's default cache), so the measurement follows the code. Each
cell fills a fresh file to its size, then times commits of `--batch` rows (the writer commits
what a second of traffic queued: 1,000 rows at 1,000 requests a second), and reports the time
per row spent in SQLite (rows are built before the clock starts).

  python3 benches/ledger.py                      # 0, 1 M and 3 M rows; random and time-ordered ids
  python3 benches/ledger.py --sizes 0,5000000 --rows 50000

Uses Python's sqlite3 module (the system SQLite; the gateway bundles its own build of the same
engine), so its figures compare the id shapes and sizes with each other, not with the gateway's
absolute cost per request.
"""

import argparse
import os
import pathlib
import random
import re
import sqlite3
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def schema():
    source = (ROOT / "src" / "store" / "sqlite.rs").read_text()
    text = re.search(r'const SCHEMA: &str = "(.*?)";', source, re.S).group(1)
    # The ledger and its indexes only.
    return ";\n".join(s for s in text.split(";") if "ledger" in s) + ";"


def random_id(_ms):
    return "req_%024x" % random.getrandbits(96)


def ordered_id(ms):
    return "req_%012x%020x" % (ms & 0xFFFF_FFFF_FFFF, random.getrandbits(80))


def rows(make_id, start_ms, first, count, per_ms):
    out = []
    for i in range(first, first + count):
        ms = start_ms + i // per_ms
        out.append((make_id(ms), ms, f"key-{i % 40}", f"user-{i % 200}", f"team-{i % 8}", "claude-sonnet-4-5",
                    "anthropic", "claude-sonnet-4-5-20250929", 200, "ok", i % 2, 1200 + i % 900, 300 + i % 200,
                    0, 0, 0, 4_500_000 + i % 1000, 1, None))
    return out


INSERT = "INSERT OR IGNORE INTO ledger VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"


def cell(directory, fill_id, make_id, size, measured, batch, per_ms):
    path = directory / "ledger.db"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.remove(f"{path}{suffix}")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema())
    # Rows are spread over the past at `per_ms` a millisecond, ending now.
    start_ms = int(time.time() * 1000) - (size + measured) // per_ms
    done = 0
    while done < size:
        n = min(50_000, size - done)
        db.execute("BEGIN")
        db.executemany(INSERT, rows(fill_id, start_ms, done, n, per_ms))
        db.execute("COMMIT")
        done += n
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # Warm-up: one batch, untimed.
    batches = [rows(make_id, start_ms, size + i, batch, per_ms) for i in range(0, measured + batch, batch)]
    db.execute("BEGIN")
    db.executemany(INSERT, batches.pop(0))
    db.execute("COMMIT")
    spent = 0.0
    for b in batches[: measured // batch]:
        t = time.perf_counter()
        db.execute("BEGIN")
        db.executemany(INSERT, b)
        db.execute("COMMIT")
        spent += time.perf_counter() - t
    count = db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    db.close()
    megabytes = os.path.getsize(path) / 2**20
    return spent / (measured // batch * batch) * 1e6, count, megabytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,1000000,3000000", help="ledger sizes in rows, comma-separated")
    ap.add_argument("--rows", type=int, default=30_000, help="rows timed in each cell")
    ap.add_argument("--batch", type=int, default=1000, help="rows a commit")
    ap.add_argument("--per-ms", type=int, default=1, help="rows a millisecond in the filled history")
    args = ap.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}; {args.rows} rows timed a cell, {args.batch} a commit")
    print("| rows in the ledger | file | random ids: µs a row | time-ordered ids | time-ordered after random |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        for size in (int(s) for s in args.sizes.split(",")):
            r, _, mb = cell(directory, random_id, random_id, size, args.rows, args.batch, args.per_ms)
            o, count, _ = cell(directory, ordered_id, ordered_id, size, args.rows, args.batch, args.per_ms)
            assert count == size + args.rows + args.batch, f"rows lost: {count}"
            u = cell(directory, random_id, ordered_id, size, args.rows, args.batch, args.per_ms)[0] if size else o
            print(f"| {size:,} | {mb:,.0f} MB | {r:.1f} | {o:.1f} | {u:.1f} |", flush=True)


if __name__ == "__main__":
    main()
