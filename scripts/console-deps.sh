#!/usr/bin/env bash
# Installs what the browser test of the spend console (tests/console.rs) needs: Debian's
# `chromium` (/usr/bin/chromium; apt-get, as root, only when missing) and `playwright-core` from
# npm at the version pinned in tests/console/versions.env, into .cache/console/
# (`playwright-core-<version>/`). playwright-core brings no browser of its own: the test drives
# Debian's. An install already there is reused; nothing is downloaded while the tests run. A
# version set in the environment wins over the pin:
#     PLAYWRIGHT_CORE_VERSION=1.65.1 scripts/test --test console
# TOLLGATE_CONSOLE_DIR moves the cache. Sourced by scripts/test, which exports
# TOLLGATE_CONSOLE_NODE_PATH and TOLLGATE_CHROMIUM for `cargo test`; run alone, it prints them:
#     export $(scripts/console-deps.sh) && cargo test --test console
# Needs node and npm (Node.js 18 or later); it does not install them.

ensure_chromium() {
    [ -x /usr/bin/chromium ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium (the spend console's browser test drives it)..." >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "error: the spend console's browser test needs Debian's chromium: sudo apt-get install -y chromium" >&2
        return 1
    fi
}

console_deps() {
    local root cache pins
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cache="${TOLLGATE_CONSOLE_DIR:-$root/.cache/console}"
    pins="$root/tests/console/versions.env"
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { echo "error: the spend console's browser test needs node and npm (Node.js 18 or later): e.g. sudo apt-get install -y nodejs npm" >&2; return 1; }
    ensure_chromium || return 1

    # The pin, unless the environment already says otherwise.
    local name value
    while IFS='=' read -r name value; do
        case "$name" in ''|\#*) continue ;; esac
        [ -n "${!name:-}" ] || printf -v "$name" '%s' "$value"
    done < "$pins"

    mkdir -p "$cache" && cache="$(cd "$cache" && pwd)"
    local pw_dir="$cache/playwright-core-$PLAYWRIGHT_CORE_VERSION"
    (
        # One installer at a time; a folder counts only once its marker is written.
        if command -v flock >/dev/null 2>&1; then flock 9; fi
        if [ ! -e "$pw_dir/.installed" ]; then
            echo "console: installing playwright-core $PLAYWRIGHT_CORE_VERSION from npm into $pw_dir ..." >&2
            rm -rf "$pw_dir"
            # playwright-core downloads no browser on install (only the `playwright` package would).
            npm install --no-audit --no-fund --loglevel=error --prefix "$pw_dir" \
                "playwright-core@$PLAYWRIGHT_CORE_VERSION" >&2 || { rm -rf "$pw_dir"; exit 1; }
            (cd "$pw_dir" && node -e 'require("playwright-core")') || { echo "error: the installed playwright-core does not load" >&2; rm -rf "$pw_dir"; exit 1; }
            touch "$pw_dir/.installed"
        fi
    ) 9>"$cache/.lock" || { echo "error: installing playwright-core failed (see above)" >&2; return 1; }

    export TOLLGATE_CONSOLE_DIR="$cache"
    export TOLLGATE_CONSOLE_NODE_PATH="$pw_dir/node_modules"
    export TOLLGATE_CHROMIUM=/usr/bin/chromium
    echo "console: playwright-core $PLAYWRIGHT_CORE_VERSION at $TOLLGATE_CONSOLE_NODE_PATH, $(/usr/bin/chromium --version 2>/dev/null || echo chromium) at $TOLLGATE_CHROMIUM" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    console_deps
    echo "TOLLGATE_CONSOLE_DIR=$TOLLGATE_CONSOLE_DIR"
    echo "TOLLGATE_CONSOLE_NODE_PATH=$TOLLGATE_CONSOLE_NODE_PATH"
    echo "TOLLGATE_CHROMIUM=$TOLLGATE_CHROMIUM"
fi
