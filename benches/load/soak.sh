#!/usr/bin/env bash
# The soak test in one command: builds Tollgate, the mock provider and the load generator in
# release mode, then runs Tollgate under steady mixed load (default 5 minutes) while sampling its
# memory and file descriptors. Exits non-zero if either grows. Not part of CI (it takes minutes).
# Options go to soak.py: --minutes M, --round SECONDS, --sample SECONDS.
# Results: benches/results/soak.md (summary) and soak.csv (every sample).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/deps.sh
ensure_build_deps
cargo build --release --bin tollgate --bin tollgate-mock --example loadgen
exec python3 benches/load/soak.py "$@"
