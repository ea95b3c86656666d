#!/usr/bin/env bash
# Brings up a local Tollgate stack: PostgreSQL and Redis (reused when already
# listening, else started under target/services/), two gpu-sim backends, and
# `tollgate serve` with config/tollgate.example.toml on a `tollgate` database,
# migrated, with a demo key per tier. Processes started here run in the
# background; their logs, pid files and Tollgate's usage spool are in .dev/. Run it again to restart
# them; `scripts/dev.sh stop` stops them.
#
#   scripts/dev.sh            # start (or restart) the stack
#   scripts/dev.sh stop       # stop what dev.sh started (not Postgres/Redis)
#
# Ports are those of config/tollgate.example.toml: the API on 8080, admin on
# 8081, metrics on 9091, backends on 8101 and 8102.

source "$(dirname "$0")/lib.sh"
cd "$ROOT"

RUN_DIR="$ROOT/.dev"
CONFIG="$ROOT/config/tollgate.example.toml"
SIM_A_PORT=8101
SIM_B_PORT=8102
API_PORT=8080
export TOLLGATE_ADMIN_TOKEN="${TOLLGATE_ADMIN_TOKEN:-dev-admin-token-change-me}"

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
    listening 127.0.0.1 "$port" && die "port $port is taken (by something dev.sh did not start)"
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

# The gateway's own database, next to whatever DATABASE_URL points at.
TOLLGATE_DB_URL="${DATABASE_URL%/*}/tollgate"
psql "$DATABASE_URL" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'tollgate'" | grep -q 1 ||
    psql "$DATABASE_URL" -qc "CREATE DATABASE tollgate"
export DATABASE_URL="$TOLLGATE_DB_URL"
"$BIN/tollgate" --config "$CONFIG" migrate
# Run from .dev/ so the config's relative spool_dir ("spool") lands there.
start tollgate "$API_PORT" env --chdir="$RUN_DIR" "$BIN/tollgate" --config "$CONFIG" serve

# A demo key per tier, each on its own account (new keys every run).
declare -A KEYS
for tier in $(grep -A1 '^\[\[tiers\]\]' "$CONFIG" | sed -n 's/^name = "\([^"]*\)".*/\1/p'); do
    KEYS[$tier]="$("$BIN/tollgate" --config "$CONFIG" keys create --account "demo-$tier" --tier "$tier" --name dev.sh | tail -1)"
done
KEY="${KEYS[pro]:-${KEYS[free]}}"
printf '%s\n' "${!KEYS[@]}" | sort | while read -r tier; do echo "$tier ${KEYS[$tier]}"; done >"$RUN_DIR/keys.txt"

cat <<MSG

Tollgate dev stack is up.
  Tollgate API   http://127.0.0.1:$API_PORT/v1      (log .dev/tollgate.log)
  Admin API      http://127.0.0.1:8081/admin    (Bearer \$TOLLGATE_ADMIN_TOKEN = $TOLLGATE_ADMIN_TOKEN)
  Metrics        http://127.0.0.1:9091/metrics
  gpu-sim A      http://127.0.0.1:$SIM_A_PORT   (64 batch slots)
  gpu-sim B      http://127.0.0.1:$SIM_B_PORT   (4 batch slots)
  PostgreSQL     $DATABASE_URL
  Redis          $REDIS_URL
Demo keys, one per tier (also in .dev/keys.txt):
$(sed 's/^/  /' "$RUN_DIR/keys.txt")

Call it with curl:
  curl -s http://127.0.0.1:$API_PORT/v1/chat/completions \\
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
    -d '{"model":"sim-model","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'

Or with the official Python SDK (pip install openai):
  python3 - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:$API_PORT/v1", api_key="$KEY")
reply = client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "Hello"}])
print(reply.choices[0].message.content)
for chunk in client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "Stream"}], stream=True):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

Load it:
  target/debug/loadgen --url http://127.0.0.1:$API_PORT --key $KEY --rate 100 --duration 5
  (the pro tier allows 600 requests a minute: push past it to see 429s with Retry-After)

Stop with: scripts/dev.sh stop
MSG
