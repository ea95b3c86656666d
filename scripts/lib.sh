# Shared provisioning for scripts/dev.sh, scripts/test.sh and .ci/run.
#
# Sourced, not run. On Debian it installs what is missing (build tools,
# PostgreSQL, Redis) and starts a throwaway Postgres and Redis under
# target/services/ only when none is listening at DATABASE_URL / REDIS_URL
# (default 127.0.0.1:5432 and 127.0.0.1:6379). It changes nothing system-wide
# beyond installing packages.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="$ROOT/target/services"

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
# apt_install PACKAGE... : installs the Debian packages that are not installed yet.
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    if [ "$APT_UPDATED" -eq 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Build tools: a C toolchain and cmake (Pingora's zlib-ng build needs cmake),
# and Rust.
ensure_build_tools() {
    apt_install build-essential cmake pkg-config ca-certificates curl
    ensure_rust
}

# Rust, as rust-toolchain.toml at the root pins it. A machine without cargo
# gets rustup for this user, non-interactively and with no toolchain of its
# own: `rustup toolchain install` then reads rust-toolchain.toml and installs
# that toolchain with its components (rustfmt, clippy). Where cargo is
# already there, rustup installs the pinned toolchain on first use.
ensure_rust() {
    if ! command -v cargo >/dev/null; then
        if [ -f "$HOME/.cargo/env" ]; then
            # shellcheck source=/dev/null
            . "$HOME/.cargo/env"
        elif [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        fi
    fi
    command -v cargo >/dev/null && return 0
    log "installing Rust with rustup (toolchain from rust-toolchain.toml)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --default-toolchain none ||
        die "the rustup installer failed: install Rust from https://rustup.rs, then re-run"
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
    (cd "$ROOT" && rustup toolchain install) ||
        die "rustup could not install the toolchain rust-toolchain.toml names"
    command -v cargo >/dev/null || die "rustup installed no cargo on PATH"
}

# host_port URL DEFAULT_PORT : prints "HOST PORT" of a postgres:// or redis:// URL.
host_port() {
    local rest="${1#*://}"
    rest="${rest#*@}"
    rest="${rest%%/*}"
    rest="${rest%%\?*}"
    local host="${rest%:*}" port="${rest##*:}"
    [ "$host" = "$rest" ] && port="$2"
    [ -z "$host" ] && host=127.0.0.1
    echo "$host $port"
}

# listening HOST PORT : true when something accepts TCP connections there.
listening() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# free_port [TAKEN...] : prints a port on 127.0.0.1 that nothing listens on and that
# is not among TAKEN, from 30000-32767: above the tests' 20000-30000 and below the
# kernel's ephemeral range (32768-60999), so no outgoing connection takes it later.
free_port() {
    local port tries
    for ((tries = 0; tries < 200; tries++)); do
        port=$((30000 + RANDOM % 2768))
        case " $* " in *" $port "*) continue ;; esac
        listening 127.0.0.1 "$port" || { echo "$port"; return 0; }
    done
    return 1
}

# wait_http URL SECONDS : polls URL until it answers 2xx; false after SECONDS.
wait_http() {
    local deadline=$((SECONDS + $2))
    until curl -sf --max-time 1 -o /dev/null "$1"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.1
    done
}

# Waits up to $3 seconds for HOST PORT to accept connections.
wait_listening() {
    local deadline=$((SECONDS + $3))
    until listening "$1" "$2"; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.1
    done
}

ensure_postgres() {
    apt_install postgresql postgresql-client
    local host port
    read -r host port < <(host_port "$DATABASE_URL" 5432)
    if listening "$host" "$port"; then
        log "PostgreSQL: using the server at $host:$port"
        return 0
    fi
    case "$host" in 127.0.0.1|localhost) ;; *) die "PostgreSQL at $host:$port is not reachable";; esac
    local bin data="$SERVICES_DIR/postgres"
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    log "PostgreSQL: starting a throwaway server on 127.0.0.1:$port ($data)"
    mkdir -p "$SERVICES_DIR"
    # initdb and postgres refuse to run as root: run them as the postgres user.
    local run=()
    if [ "$(id -u)" -eq 0 ]; then run=(runuser -u postgres --); fi
    if [ ! -f "$data/PG_VERSION" ]; then
        rm -rf "$data"; mkdir -p "$data"
        [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$data"
        "${run[@]}" "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
    fi
    "${run[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off" start >/dev/null
    wait_listening 127.0.0.1 "$port" 30 || die "PostgreSQL did not start; see $data/server.log"
}

ensure_redis() {
    apt_install redis-server
    local host port
    read -r host port < <(host_port "$REDIS_URL" 6379)
    if listening "$host" "$port"; then
        log "Redis: using the server at $host:$port"
        return 0
    fi
    case "$host" in 127.0.0.1|localhost) ;; *) die "Redis at $host:$port is not reachable";; esac
    local data="$SERVICES_DIR/redis"
    log "Redis: starting a throwaway server on 127.0.0.1:$port ($data)"
    mkdir -p "$data"
    redis-server --bind 127.0.0.1 --port "$port" --daemonize yes --save "" --appendonly no \
        --dir "$data" --logfile "$data/redis.log" --pidfile "$data/redis.pid"
    wait_listening 127.0.0.1 "$port" 30 || die "Redis did not start; see $data/redis.log"
}

# The official openai SDKs for the compatibility tests: Python in a venv under
# target/, Node in proxy/tests/sdk/node_modules, both pinned.
ensure_sdks() {
    local venv="$ROOT/target/sdk-venv" sdk="$ROOT/proxy/tests/sdk"
    command -v python3 >/dev/null || apt_install python3
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
    fi
    if ! "$venv/bin/pip" install -q --disable-pip-version-check -r "$sdk/requirements.txt"; then
        die "cannot install the openai Python SDK (with mutagen, the tests' independent audio reader, and moto, their S3)"
    fi
    command -v npm >/dev/null || apt_install nodejs npm
    if [ ! -d "$sdk/node_modules/openai" ] || [ "$sdk/package-lock.json" -nt "$sdk/node_modules" ]; then
        (cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error) || die "cannot install the openai Node SDK"
        touch "$sdk/node_modules"
    fi
    export TOLLGATE_TEST_PYTHON="$venv/bin/python"
}

# A real Triton Inference Server for the Triton protocol's tests
# (proxy/tests/gateway/triton.rs): PyPI's nvidia-pytriton bundles
# tritonserver 2.51, which runs on CPU. Its Python stub is built for Debian's
# python3.11 (a pyenv interpreter breaks it), hence a venv of its own.
ensure_triton() {
    local venv="$ROOT/target/triton-venv"
    [ -x /usr/bin/python3.11 ] || apt_install python3.11
    if [ ! -x "$venv/bin/python" ]; then
        /usr/bin/python3.11 -m venv "$venv" 2>/dev/null \
            || { apt_install python3.11-venv; /usr/bin/python3.11 -m venv "$venv"; }
    fi
    if ! "$venv/bin/pip" install -q --disable-pip-version-check -r "$ROOT/proxy/tests/triton/requirements.txt"; then
        die "cannot install nvidia-pytriton (a real Triton server for the tests)"
    fi
    export TOLLGATE_TEST_TRITON_PYTHON="$venv/bin/python"
}

# promtool, for the alert rules' tests (proxy/tests/alert_rules.rs runs
# `promtool check rules` and `promtool test rules` when it is on PATH).
# Debian ships it in the `prometheus` package.
ensure_promtool() {
    command -v promtool >/dev/null || apt_install prometheus
}

# Everything the stack and its tests need on this machine.
provision() {
    ensure_build_tools
    ensure_promtool
    ensure_postgres
    ensure_redis
}
