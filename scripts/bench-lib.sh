# Shared set-up for the benchmark scripts; sourced after lib.sh.
#
# bench_sim PORT            unpaced gpu-sim: one thread, 16-token answers
# bench_gateway PORT SIM    a throwaway database, a Tollgate config in front of
#                           gpu-sim at SIM (its usage spool under target/bench),
#                           migrated, with one key:
#                           sets TG (the tollgate command for that config),
#                           TG_ENV (the environment to run it in) and KEY;
#                           the backend's max_concurrency is
#                           BENCH_MAX_CONCURRENCY (default 4096)
# bench_background CMD...   runs CMD in the background until the script exits
# bench_baseline REV        tollgate built from REV, set aside as $OUT/tollgate-REV
#                           (call before building this checkout); sets BASELINE
# Everything started here is stopped, and the database dropped, on exit.

BIN="$ROOT/target/release"
OUT="$ROOT/target/bench"
mkdir -p "$OUT"
BENCH_PIDS=()
BENCH_DBS=()

bench_cleanup() {
    # SIGINT: every process here exits at once on it (callgrind writes its profile).
    for pid in "${BENCH_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null; done
    wait 2>/dev/null
    for db in "${BENCH_DBS[@]}"; do
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
    done
    rm -rf "$OUT"/spool-*
}
trap bench_cleanup EXIT

bench_background() {
    "$@" &
    BENCH_PIDS+=($!)
}

bench_baseline() {
    BASELINE="$OUT/tollgate-$1"
    [ -x "$BASELINE" ] && return
    # A worktree sharing this target directory, so dependencies are built once.
    local src="$OUT/src-$1"
    [ -d "$src" ] || git -C "$ROOT" worktree add --detach "$src" "$1" >&2
    CARGO_TARGET_DIR="$ROOT/target" cargo build --release --locked -p tollgate \
        --manifest-path "$src/Cargo.toml" >&2
    cp "$BIN/tollgate" "$BASELINE"
    git -C "$ROOT" worktree remove --force "$src" >&2
}

bench_sim() {
    bench_background "$BIN/gpu-sim" --listen "127.0.0.1:$1" --ttft-ms 0 --tokens-per-sec 0 \
        --output-tokens 16 --threads 1 --max-concurrency 4096 >/dev/null
}

bench_gateway() {
    local port=$1 sim=$2 config="$OUT/tollgate-$1.toml" db="tollgate_bench_$$_$1"
    BENCH_DBS+=("$db")
    psql "$DATABASE_URL" -qc "CREATE DATABASE $db" >/dev/null
    cat >"$config" <<TOML
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$((port + 1))"
metrics_listen = "127.0.0.1:$((port + 2))"
workers = 1
[database]
url = "${DATABASE_URL%/*}/$db"
[metering]
spool_dir = "$OUT/spool-$port"
[jobs]
results_dir = "$OUT/spool-$port-results"
max_queued_per_account = 100000000
[[tiers]]
name = "pro"
[[backends]]
name = "sim"
url = "http://127.0.0.1:$sim"
models = ["sim-model"]
max_concurrency = ${BENCH_MAX_CONCURRENCY:-4096}
TOML
    # The config names the database: the environment must not override it.
    # Per-request access logs off (LOG_LEVEL=warn): benchmarks measure the request path.
    TG_ENV=(env -u DATABASE_URL -u REDIS_URL LOG_LEVEL=warn)
    TG=("$BIN/tollgate" --config "$config")
    "${TG_ENV[@]}" "${TG[@]}" migrate >/dev/null
    KEY="$("${TG_ENV[@]}" "${TG[@]}" keys create --account bench --tier pro | tail -1)"
}

# section NAME : true when NAME is one of the words in $SECTIONS (each script
# sets its own default).
section() { [[ " $SECTIONS " == *" $1 "* ]]; }
