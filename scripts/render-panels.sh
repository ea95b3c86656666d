#!/usr/bin/env bash
# Renders the README's dashboard pictures (docs/img/panels/*.svg) from a real
# run, for where Grafana cannot run: two gpu-sim backends and `tollgate serve`
# (release builds, a throwaway database, no Redis), about 80 s of open-loop
# load from `loadgen` with a surge to twice the pool's capacity in the middle,
# and a scrape of the metrics listener every second. `panels` then draws the
# Gateway and GPU fleet dashboards' main panels from the scrapes.
#
#   scripts/render-panels.sh                 # run, record, draw into docs/img/panels/
#   target/release/panels --recording target/panels/scrapes --out /tmp/p   # redraw only
#
# The load (all chat completions, max_tokens 32, 256-byte prompts):
#   base   15 req/s for 75 s, streamed: pro 6, enterprise 3, free 2+2+2 (three
#          free accounts)
#   surge  +35 req/s from 20 s to 50 s: pro 3, enterprise 1, free 1+1+1
# The pool has 12 slots (gpu-sim 8 + 4, 40 ms to the first token, 80 tokens/s:
# about 0.45 s a request, so about 27 req/s); the surge takes the offer to
# about 50 req/s. The tiers are config/tollgate.example.toml's with their waits
# shortened so a minute's run shows queueing, shedding and rate limits: free
# 30 requests a minute per account and shed past an expected 3 s wait, pro
# waits at most 3 s, enterprise 2 s.
#
# Ports 18780-18782 (API, admin, metrics) and 18791-18792 (gpu-sim). The
# scrapes and loadgen's JSON reports stay in target/panels/; everything
# started here is stopped, and the database dropped, on exit.

source "$(dirname "$0")/lib.sh"
provision
cd "$ROOT"

BIN="$ROOT/target/release"
RUN_DIR="$ROOT/target/panels"
SCRAPES="$RUN_DIR/scrapes"
OUT_DIR="$ROOT/docs/img/panels"
API_PORT=18780 ADMIN_PORT=18781 METRICS_PORT=18782 SIM_A_PORT=18791 SIM_B_PORT=18792
DB="tollgate_panels_$$"
PIDS=()
DBS=()

cleanup() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for db in "${DBS[@]}"; do
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# background NAME COMMAND... : runs COMMAND until the script exits, logging to RUN_DIR.
background() {
    local name=$1; shift
    "$@" >"$RUN_DIR/$name.log" 2>&1 &
    PIDS+=($!)
}

for port in $API_PORT $ADMIN_PORT $METRICS_PORT $SIM_A_PORT $SIM_B_PORT; do
    listening 127.0.0.1 "$port" && die "port $port is taken"
done
log "building"
cargo build --release --locked --bins -p tollgate -p tollgate-backends -p tollgate-loadgen >&2
rm -rf "$RUN_DIR"
mkdir -p "$SCRAPES"

# --threads 1: the machine is shared by two simulators, the gateway and the load.
background sim_a "$BIN/gpu-sim" --listen "127.0.0.1:$SIM_A_PORT" --model sim-model \
    --max-concurrency 8 --threads 1
background sim_b "$BIN/gpu-sim" --listen "127.0.0.1:$SIM_B_PORT" --model sim-model \
    --max-concurrency 4 --threads 1 --seed 1

DBS+=("$DB")
psql "$DATABASE_URL" -qc "CREATE DATABASE $DB" >/dev/null
CONFIG="$RUN_DIR/tollgate.toml"
cat >"$CONFIG" <<TOML
[server]
listen = "127.0.0.1:$API_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
workers = 1
drain_timeout = "2s"
[database]
url = "${DATABASE_URL%/*}/$DB"
[metering]
spool_dir = "$RUN_DIR/spool"

[[tiers]]
name = "free"
priority = 0
requests_per_minute = 30
tokens_per_minute = 40000
max_concurrent = 4
max_queue_wait = "6s"
max_expected_wait = "3s"
[[tiers]]
name = "pro"
priority = 30
requests_per_minute = 1200
tokens_per_minute = 400000
max_concurrent = 32
max_queue_wait = "3s"
[[tiers]]
name = "enterprise"
priority = 100
max_queue_wait = "2s"

[[backends]]
name = "gpu-a"
url = "http://127.0.0.1:$SIM_A_PORT"
models = ["sim-model"]
max_concurrency = 8
[[backends]]
name = "gpu-b"
url = "http://127.0.0.1:$SIM_B_PORT"
models = ["sim-model"]
max_concurrency = 4
TOML
# The config names the database and leaves Redis out: the environment must not
# override either. Per-request access logs off: only the metrics matter here.
TG=(env -u DATABASE_URL -u REDIS_URL LOG_LEVEL=warn "$BIN/tollgate" --config "$CONFIG")
"${TG[@]}" migrate >/dev/null
key() { "${TG[@]}" keys create --account "$1" --tier "$2" --name render-panels | tail -1; }
PRO=$(key panels-pro pro)
ENT=$(key panels-enterprise enterprise)
FREE_A=$(key panels-free-a free)
FREE_B=$(key panels-free-b free)
FREE_C=$(key panels-free-c free)

wait_listening 127.0.0.1 "$SIM_A_PORT" 30 || die "gpu-sim A did not start; see $RUN_DIR/sim_a.log"
wait_listening 127.0.0.1 "$SIM_B_PORT" 30 || die "gpu-sim B did not start; see $RUN_DIR/sim_b.log"
background tollgate "${TG[@]}" serve
wait_listening 127.0.0.1 "$METRICS_PORT" 30 || die "tollgate did not start; see $RUN_DIR/tollgate.log"
wait_listening 127.0.0.1 "$API_PORT" 30 || die "tollgate did not start; see $RUN_DIR/tollgate.log"

log "recording a scrape of http://127.0.0.1:$METRICS_PORT/metrics every second into $SCRAPES"
record() {
    while :; do
        local at; at=$(date +%s%3N)
        # Written under another name first: panels reads only complete files.
        if curl -sf --max-time 1 "http://127.0.0.1:$METRICS_PORT/metrics" -o "$SCRAPES/$at.tmp"; then
            mv "$SCRAPES/$at.tmp" "$SCRAPES/$at.prom"
        fi
        sleep 1
    done
}
record &
RECORD_PID=$!
PIDS+=("$RECORD_PID")
sleep 3

LOAD=(--url "http://127.0.0.1:$API_PORT" --max-tokens 32 --prompt-bytes 256 --timeout 30)
log "base load: 15 req/s for 75 s; surge: +35 req/s from 20 s to 50 s"
"$BIN/loadgen" "${LOAD[@]}" --rate 15 --duration 75 --stream --json "$RUN_DIR/base.json" \
    --key-mix "$PRO:6,$ENT:3,$FREE_A:2,$FREE_B:2,$FREE_C:2" >"$RUN_DIR/base.txt" 2>&1 &
BASE_PID=$!
PIDS+=("$BASE_PID")
sleep 20
"$BIN/loadgen" "${LOAD[@]}" --rate 35 --duration 30 --json "$RUN_DIR/surge.json" \
    --key-mix "$PRO:3,$ENT:1,$FREE_A:1,$FREE_B:1,$FREE_C:1" >"$RUN_DIR/surge.txt" 2>&1
wait "$BASE_PID"
# A few idle scrapes: the queue drains and the rates fall to zero.
sleep 5
kill -TERM "$RECORD_PID"

log "drawing into $OUT_DIR"
mkdir -p "$OUT_DIR"
"$BIN/panels" --recording "$SCRAPES" --out "$OUT_DIR"
log "$(find "$SCRAPES" -name '*.prom' | wc -l) scrapes; loadgen reports: $RUN_DIR/base.txt, $RUN_DIR/surge.txt"
