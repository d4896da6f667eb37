#!/usr/bin/env bash
# The load benchmark in one command: builds Tollgate, the mock provider, the bare Pingora proxy
# and the load generator in release mode, installs LiteLLM's proxy (pinned) into a local virtual
# environment, then measures direct-to-mock, bare Pingora, Tollgate and LiteLLM in turn.
# Results: benches/results/load.md (table), load.png (chart), load.json (raw).
# Options go to bench.py: --duration SECONDS, --concurrency 1,16,64,256, --hold 1000, --targets ...
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/deps.sh
ensure_build_deps
LITELLM_VERSION=1.108.7   # newest whose [proxy] extra resolves on the PyPI mirror this was built with (2026-11-27)

cargo build --release --bin tollgate --bin tollgate-mock --example loadgen --example bare_pingora

venv=benches/load/.venv
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$LITELLM_VERSION')" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION" matplotlib
fi
exec "$venv/bin/python" benches/load/bench.py "$@"
