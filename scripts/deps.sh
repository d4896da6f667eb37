# Sourced by scripts/run and scripts/test: makes sure a fresh machine can build Tollgate.
# Pingora's build needs cmake and a C compiler (zlib-ng, ring, zstd). Installs them with apt-get
# when running as root on Debian/Ubuntu; otherwise says exactly what to install.

ensure_build_deps() {
    local missing=()
    command -v cargo >/dev/null 2>&1 || { echo "error: cargo is not installed: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v cc >/dev/null 2>&1 || missing+=(gcc)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${missing[*]} (needed to build Pingora)..." >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "error: building Tollgate needs: ${missing[*]}" >&2
        echo "       install them, e.g.: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
}

# The per-request cost guard counts instructions with callgrind (Debian's valgrind package).
ensure_valgrind() {
    command -v valgrind >/dev/null 2>&1 && command -v callgrind_control >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing valgrind (the per-request cost guard counts instructions with callgrind)..." >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
    else
        echo "error: the per-request cost guard needs valgrind: sudo apt-get install -y valgrind" >&2
        exit 1
    fi
}
