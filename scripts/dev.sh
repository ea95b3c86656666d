#!/usr/bin/env bash
# Brings up a local Tollgate stack: PostgreSQL and Redis (reused when already
# listening, else started under target/services/), and two gpu-sim backends.
# Processes started here run in the background; their logs and pid files are
# in .dev/. Run it again to restart them; `scripts/dev.sh stop` stops them.
#
#   scripts/dev.sh            # start (or restart) the stack
#   scripts/dev.sh stop       # stop what dev.sh started (not Postgres/Redis)
#
# Ports: SIM_A_PORT (8101) and SIM_B_PORT (8102).

source "$(dirname "$0")/lib.sh"
cd "$ROOT"

RUN_DIR="$ROOT/.dev"
SIM_A_PORT="${SIM_A_PORT:-8101}"
SIM_B_PORT="${SIM_B_PORT:-8102}"

stop_all() {
    local pidfile
    for pidfile in "$RUN_DIR"/*.pid; do
        [ -e "$pidfile" ] || continue
        local pid; pid="$(cat "$pidfile")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            # gpu-sim exits within its 5 s shutdown grace.
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

# start NAME PORT COMMAND... : runs COMMAND in the background and waits for PORT.
start() {
    local name="$1" port="$2"; shift 2
    listening 127.0.0.1 "$port" && die "port $port is taken; set ${name^^}_PORT to another"
    nohup "$@" >"$RUN_DIR/$name.log" 2>&1 &
    echo $! >"$RUN_DIR/$name.pid"
    wait_listening 127.0.0.1 "$port" 30 || die "$name did not start; see $RUN_DIR/$name.log"
}

if [ "${1:-}" = "stop" ]; then
    stop_all
    log "stopped"
    exit 0
fi

provision
mkdir -p "$RUN_DIR"
log "building"
cargo build --workspace --bins --locked
stop_all

BIN="$ROOT/target/debug"
# Two backends: a fast one and one with a small batch, so queueing is visible.
start sim_a "$SIM_A_PORT" "$BIN/gpu-sim" --listen "127.0.0.1:$SIM_A_PORT" \
    --model sim-model --model gpt-4o-mini --max-concurrency 64
start sim_b "$SIM_B_PORT" "$BIN/gpu-sim" --listen "127.0.0.1:$SIM_B_PORT" \
    --model sim-model --model gpt-4o-mini --max-concurrency 4 --seed 1

cat <<MSG

Tollgate dev stack is up.
  PostgreSQL  $DATABASE_URL
  Redis       $REDIS_URL
  gpu-sim A   http://127.0.0.1:$SIM_A_PORT   (64 batch slots; log .dev/sim_a.log)
  gpu-sim B   http://127.0.0.1:$SIM_B_PORT   (4 batch slots;  log .dev/sim_b.log)

Try a backend directly:
  curl -s http://127.0.0.1:$SIM_A_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"sim-model","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'
  curl -sN http://127.0.0.1:$SIM_A_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"sim-model","messages":[{"role":"user","content":"Hello"}],"stream":true}'
  curl -s http://127.0.0.1:$SIM_B_PORT/metrics | grep -v '^#'

Load it:
  target/debug/loadgen --url http://127.0.0.1:$SIM_A_PORT --rate 200 --duration 5

Stop with: scripts/dev.sh stop
MSG
