#!/usr/bin/env bash
# Installs what the SSO tests need for their identity provider: `oidc-provider` (panva's
# certified OpenID Connect provider) from npm at the version pinned in tests/sso/versions.env,
# into .cache/sso/ (`oidc-provider-<version>/`). tests/sso/idp.mjs runs it on loopback as a real
# provider (discovery, JWKS, code flow with PKCE, device flow, refresh), so the gateway signs in
# against the protocol as implemented, not a mock of it. tests/sso/approve.mjs approves a
# device-flow sign-in with the console's Chromium (scripts/console-deps.sh). An install already
# there is reused; nothing is downloaded while the tests run. A version set in the environment
# wins over the pin:
#     OIDC_PROVIDER_VERSION=9.13.3 scripts/test --test sso
# TOLLGATE_SSO_DIR moves the cache. Sourced by scripts/test, which exports
# TOLLGATE_SSO_NODE_PATH for `cargo test`; run alone, it prints it:
#     export $(scripts/sso-deps.sh) && cargo test --test sso
# Needs node and npm (Node.js 20.19 or later: oidc-provider 9 is ESM-only); it does not install
# them.

sso_deps() {
    local root cache pins
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cache="${TOLLGATE_SSO_DIR:-$root/.cache/sso}"
    pins="$root/tests/sso/versions.env"
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { echo "error: the SSO tests need node and npm (Node.js 20.19 or later) for their identity provider: e.g. sudo apt-get install -y nodejs npm" >&2; return 1; }

    # The pin, unless the environment already says otherwise.
    local name value
    while IFS='=' read -r name value; do
        case "$name" in ''|\#*) continue ;; esac
        [ -n "${!name:-}" ] || printf -v "$name" '%s' "$value"
    done < "$pins"

    mkdir -p "$cache" && cache="$(cd "$cache" && pwd)"
    local op_dir="$cache/oidc-provider-$OIDC_PROVIDER_VERSION"
    (
        # One installer at a time; a folder counts only once its marker is written.
        if command -v flock >/dev/null 2>&1; then flock 9; fi
        if [ ! -e "$op_dir/.installed" ]; then
            echo "sso: installing oidc-provider $OIDC_PROVIDER_VERSION from npm into $op_dir ..." >&2
            rm -rf "$op_dir"
            npm install --no-audit --no-fund --loglevel=error --prefix "$op_dir" \
                "oidc-provider@$OIDC_PROVIDER_VERSION" >&2 || { rm -rf "$op_dir"; exit 1; }
            # ESM-only: a dynamic import is the load check (require() of it fails on older Node).
            (cd "$op_dir" && node --input-type=module -e 'await import("oidc-provider")') || { echo "error: the installed oidc-provider does not load (it needs Node.js 20.19 or later; this is $(node --version))" >&2; rm -rf "$op_dir"; exit 1; }
            touch "$op_dir/.installed"
        fi
    ) 9>"$cache/.lock" || { echo "error: installing oidc-provider failed (see above)" >&2; return 1; }

    export TOLLGATE_SSO_DIR="$cache"
    export TOLLGATE_SSO_NODE_PATH="$op_dir/node_modules"
    echo "sso: oidc-provider $OIDC_PROVIDER_VERSION at $TOLLGATE_SSO_NODE_PATH" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    sso_deps
    echo "TOLLGATE_SSO_DIR=$TOLLGATE_SSO_DIR"
    echo "TOLLGATE_SSO_NODE_PATH=$TOLLGATE_SSO_NODE_PATH"
fi
