#!/usr/bin/env bash
# Installs the real clients the conformance suite (tests/conformance.rs) drives through the
# gateway: Claude Code from npm, and the `anthropic` Python SDK (with its Bedrock and Vertex
# extras) and boto3 from PyPI, at the versions pinned in tests/conformance/versions.env, into
# .cache/conformance/ (`npm-<version>/`, `py-anthropic-<v>-boto3-<v>-otelproto-<v>/`). The same
# Python gets opentelemetry-proto, which the OTLP receiver of tests/otel.rs decodes traces with.
# An install already there is reused; nothing is downloaded while the tests run. A version set in
# the environment wins over the pin, and `latest` means the registry's newest:
#     CLAUDE_CODE_VERSION=latest scripts/test --test conformance
# TOLLGATE_CONFORMANCE_DIR moves the cache (CI keeps it between runs). Sourced by scripts/test,
# which exports where the clients are for `cargo test`; run alone, it prints those variables:
#     export $(scripts/conformance-deps.sh) && cargo test --test conformance
# Needs npm (Node.js 18 or later) and python3 with venv; it does not install them.

conformance_deps() {
    local root cache pins
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cache="${TOLLGATE_CONFORMANCE_DIR:-$root/.cache/conformance}"
    pins="$root/tests/conformance/versions.env"
    command -v npm >/dev/null 2>&1 || { echo "error: the conformance suite needs npm (Node.js 18 or later) to install Claude Code: install Node.js, e.g. sudo apt-get install -y nodejs npm" >&2; return 1; }
    command -v python3 >/dev/null 2>&1 || { echo "error: the conformance suite needs python3 (with venv) to install the anthropic SDK, boto3 and opentelemetry-proto: e.g. sudo apt-get install -y python3 python3-venv" >&2; return 1; }
    python3 -c 'import venv, ensurepip' 2>/dev/null || { echo "error: python3 has no venv/ensurepip module: e.g. sudo apt-get install -y python3-venv" >&2; return 1; }

    # The pins, unless the environment already says otherwise.
    local name value
    while IFS='=' read -r name value; do
        case "$name" in ''|\#*) continue ;; esac
        [ -n "${!name:-}" ] || printf -v "$name" '%s' "$value"
    done < "$pins"

    # `latest` becomes the registry's newest version, so each install has its own folder.
    if [ "$CLAUDE_CODE_VERSION" = latest ]; then
        CLAUDE_CODE_VERSION="$(npm view @anthropic-ai/claude-code version)" || { echo "error: npm could not tell Claude Code's latest version" >&2; return 1; }
    fi
    local pkg
    for pkg in ANTHROPIC_PY_VERSION:anthropic BOTO3_VERSION:boto3 OTEL_PROTO_VERSION:opentelemetry-proto; do
        name="${pkg%%:*}"
        if [ "${!name}" = latest ]; then
            value="$(python3 -m pip index versions "${pkg#*:}" 2>/dev/null | sed -n 's/^[^ ]* (\(.*\))$/\1/p' | head -1)"
            [ -n "$value" ] || { echo "error: pip could not tell ${pkg#*:}'s latest version" >&2; return 1; }
            printf -v "$name" '%s' "$value"
        fi
    done

    mkdir -p "$cache" && cache="$(cd "$cache" && pwd)"
    local npm_dir="$cache/npm-$CLAUDE_CODE_VERSION"
    # Every pin is in the name: a folder from before a pin moved (or was added) is not reused.
    local py_dir="$cache/py-anthropic-$ANTHROPIC_PY_VERSION-boto3-$BOTO3_VERSION-otelproto-$OTEL_PROTO_VERSION"
    (
        # One installer at a time; a folder counts only once its marker is written.
        if command -v flock >/dev/null 2>&1; then flock 9; fi
        if [ ! -e "$npm_dir/.installed" ]; then
            echo "conformance: installing Claude Code $CLAUDE_CODE_VERSION from npm into $npm_dir ..." >&2
            rm -rf "$npm_dir"
            npm install --no-audit --no-fund --loglevel=error --prefix "$npm_dir" \
                "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2 || { rm -rf "$npm_dir"; exit 1; }
            "$npm_dir/node_modules/.bin/claude" --version >/dev/null || { echo "error: the installed claude does not run" >&2; rm -rf "$npm_dir"; exit 1; }
            touch "$npm_dir/.installed"
        fi
        if [ ! -e "$py_dir/.installed" ]; then
            echo "conformance: installing anthropic[bedrock,vertex]==$ANTHROPIC_PY_VERSION boto3==$BOTO3_VERSION opentelemetry-proto==$OTEL_PROTO_VERSION into $py_dir ..." >&2
            rm -rf "$py_dir"
            python3 -m venv "$py_dir" || { rm -rf "$py_dir"; exit 1; }
            "$py_dir/bin/python" -m pip install -q --disable-pip-version-check \
                "anthropic[bedrock,vertex]==$ANTHROPIC_PY_VERSION" "boto3==$BOTO3_VERSION" \
                "opentelemetry-proto==$OTEL_PROTO_VERSION" >&2 || { rm -rf "$py_dir"; exit 1; }
            touch "$py_dir/.installed"
        fi
    ) 9>"$cache/.lock" || { echo "error: installing the conformance clients failed (see above)" >&2; return 1; }

    export TOLLGATE_CONFORMANCE_DIR="$cache"
    export TOLLGATE_CONFORMANCE_CLAUDE="$npm_dir/node_modules/.bin/claude"
    export TOLLGATE_CONFORMANCE_PYTHON="$py_dir/bin/python"
    echo "conformance: Claude Code $CLAUDE_CODE_VERSION at $TOLLGATE_CONFORMANCE_CLAUDE" >&2
    echo "conformance: anthropic $ANTHROPIC_PY_VERSION, boto3 $BOTO3_VERSION, opentelemetry-proto $OTEL_PROTO_VERSION at $TOLLGATE_CONFORMANCE_PYTHON" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    conformance_deps
    echo "TOLLGATE_CONFORMANCE_DIR=$TOLLGATE_CONFORMANCE_DIR"
    echo "TOLLGATE_CONFORMANCE_CLAUDE=$TOLLGATE_CONFORMANCE_CLAUDE"
    echo "TOLLGATE_CONFORMANCE_PYTHON=$TOLLGATE_CONFORMANCE_PYTHON"
fi
