#!/usr/bin/env bash
# The money path under faults: "no usage lost, no overspend", end to end.
#
#   scripts/soak.sh                     # 10 minutes
#   SOAK_SECS=60 scripts/soak.sh        # what CI runs
#   SOAK_KEEP=1 SOAK_SECS=180 scripts/soak.sh   # keep target/soak/ (logs, ledger) afterwards
#
# One Tollgate in front of two gpu-sims, with its OWN Postgres (initdb into
# target/soak/pg) and its OWN Redis, each on a free port (never the shared
# 5432/6379: the soak restarts them). `loadgen soak` drives a mix at SOAK_RATE
# req/s for SOAK_SECS: chat, streamed chat, completions with one prompt,
# streamed completions with a prompt array and n = 2, embeddings, and clients
# that hang up after a few stream events; from six accounts on four tiers, two
# of them hard-capped with caps sized so their accounts reach them a fifth of
# the way in, so most faults find them at their caps. It writes one ledger
# line per request (request id sent as
# x-request-id, status, how the body ended, bytes, the text of each choice).
#
# Meanwhile the script injects, in this order, spread over 10 %-50 % of the
# run (SOAK_SECS / 150 rounds of all five, at least one; each outage lasts
# SOAK_OUTAGE_SECS, default max(2, SOAK_SECS / 100)):
#   pg_restart        Postgres stopped (fast), down for the outage, started
#   redis_restart     Redis stopped (its data is gone), down, started
#   gpu_sim_kill      gpu-sim A SIGKILLed, down, started again on its port
#   tollgate_sigkill  Tollgate SIGKILLed and started again (replays its spool)
#   tollgate_sigterm  Tollgate SIGTERMed (drain), and started again once it exits
# Every fault is logged (Unix ms and name) to target/soak/faults.log. The last
# Tollgate process then serves the quiet rest of the run: its RSS is taken a
# quarter of the way into that tail ("after warm-up") and again when the load
# ends ("at the end"); it must not grow by more than 20 %.
#
# At the end Tollgate is stopped with SIGTERM once its spool is empty (so the
# events of the last requests are written), and `loadgen soak-check` compares
# the ledger with usage_events (matching request_id). One line per check, then
# `N passed, M failed`; the script exits non-zero on any failure:
#   - the gateway served the load: at least a third of requests got a 2xx;
#   - a 2xx read to its end (whole JSON, or [DONE] with no error event) has
#     exactly one event, status ok, ...
#   - ... whose completion_tokens equal tiktoken-rs's recount (cl100k_base, the
#     encoding gpu-sim counts sim-model with; every word it generates is one
#     token) of the text received, summed over choices;
#   - a stream the client hung up on has exactly one event, partial (or ok when
#     Tollgate had already passed the whole answer on), billing at least the
#     recount of what the client read;
#   - a 2xx cut by the server side (a kill, an error event, the timeout) has at
#     most one event, billing at least what arrived;
#   - a non-2xx answer, no answer, or a request never sent has at most one
#     event, only rejected / client_error / upstream_error with 0 units;
#   - every event's request_id is in the ledger; no event_id or request_id twice;
#   - per account of a hard-capped tier, sum(units) <= the tier's included_units;
#   - Tollgate's RSS at the end within 20 % of after warm-up.
# docs/soak.md explains each rule and what a failure means.
#
# Binaries: by default the debug build scripts/test.sh makes (cargo build
# --workspace --all-targets), so in CI, right after the tests, building is a
# no-op. Building only the three binaries is not: without the tests' dev-
# dependencies, tokio and hyper resolve other features (no test-util, no
# server) and most of the tree is compiled again (6 min here). A release build
# (SOAK_PROFILE=release: --release of the three binaries) took over 40 min of a
# contended 2-core machine from scratch; ~15 req/s is far below what a debug
# gateway sustains, and its RSS stays flat, so debug measures the same thing.
#
# Settings (environment): SOAK_SECS (600, at least 30), SOAK_RATE (15),
# SOAK_MIX (loadgen soak --mix), SOAK_OUTAGE_SECS, SOAK_PROFILE (debug|release),
# SOAK_KEEP (1: keep target/soak/). Everything started here is stopped, and
# target/soak/ removed, on exit, also on failure.

source "$(dirname "$0")/lib.sh"
cd "$ROOT"

SOAK_SECS="${SOAK_SECS:-600}"
SOAK_RATE="${SOAK_RATE:-15}"
SOAK_MIX="${SOAK_MIX:-chat=3,chat_stream=3,completion=1,completion_multi=1,embedding=1,disconnect=1}"
SOAK_PROFILE="${SOAK_PROFILE:-debug}"
SOAK_KEEP="${SOAK_KEEP:-0}"
[[ "$SOAK_SECS" =~ ^[0-9]+$ ]] && [ "$SOAK_SECS" -ge 30 ] || die "SOAK_SECS must be a whole number of seconds, at least 30"
[[ "$SOAK_RATE" =~ ^[0-9]+$ ]] && [ "$SOAK_RATE" -ge 1 ] || die "SOAK_RATE must be a whole number of requests per second"
OUTAGE="${SOAK_OUTAGE_SECS:-$((SOAK_SECS / 100 > 2 ? SOAK_SECS / 100 : 2))}"
[[ "$OUTAGE" =~ ^[0-9]+$ ]] || die "SOAK_OUTAGE_SECS must be a whole number of seconds"
case "$SOAK_PROFILE" in
    debug) BUILD=(--workspace --all-targets) BIN="$ROOT/target/debug" ;;
    release) BUILD=(--release --bins -p tollgate -p tollgate-backends -p tollgate-loadgen)
        BIN="$ROOT/target/release" ;;
    *) die "SOAK_PROFILE must be debug or release" ;;
esac

RUN_DIR="$ROOT/target/soak"
PGDATA="$RUN_DIR/pg"
FAULTS="$RUN_DIR/faults.log"
LEDGER="$RUN_DIR/ledger.jsonl"
CONFIG="$RUN_DIR/tollgate.toml"
KEYS="$RUN_DIR/keys.txt"

# How long a process gets to become ready, generous for a debug build on a busy
# 2-core machine; only reached when something is broken.
READY_SECS=60

ensure_build_tools
apt_install postgresql redis-server curl
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
[ -x "$PG_BIN/pg_ctl" ] || die "no pg_ctl under /usr/lib/postgresql/*/bin"
# initdb and postgres refuse to run as root: run them as the postgres user.
AS_PG=()
[ "$(id -u)" -eq 0 ] && AS_PG=(runuser -u postgres --)

log "building ($SOAK_PROFILE)"
cargo build --locked "${BUILD[@]}" >&2

PORTS=()
for _ in 1 2 3 4 5 6 7; do
    port=$(free_port "${PORTS[@]}") || die "no free port in 30000-32767"
    PORTS+=("$port")
done
read -r PG_PORT REDIS_PORT SIM_A_PORT SIM_B_PORT API_PORT ADMIN_PORT METRICS_PORT <<<"${PORTS[*]}"
DATABASE="postgres://postgres@127.0.0.1:$PG_PORT/tollgate"

PG_STARTED=0 REDIS_PID="" SIM_A_PID="" SIM_B_PID="" TG_PID="" LOADGEN_PID=""

cleanup() {
    # Best effort from here on: one step failing must not skip the others.
    set +e
    local pid
    # Everything is thrown away: no process needs a graceful stop.
    for pid in "$LOADGEN_PID" "$TG_PID" "$SIM_A_PID" "$SIM_B_PID" "$REDIS_PID"; do
        [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
    done
    for pid in "$LOADGEN_PID" "$TG_PID" "$SIM_A_PID" "$SIM_B_PID" "$REDIS_PID"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null
    done
    if [ "$PG_STARTED" -eq 1 ]; then
        "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ "$SOAK_KEEP" = 1 ]; then
        log "kept $RUN_DIR"
    else
        rm -rf "$RUN_DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ms() { date +%s%3N; }
# Seconds since the load started, for the log.
since_start() { local ms=$(($(now_ms) - LOAD_START_MS)); printf '+%d.%01ds' $((ms / 1000)) $((ms % 1000 / 100)); }
sleep_until_ms() {
    local wait=$(($1 - $(now_ms)))
    [ "$wait" -gt 0 ] && sleep "$((wait / 1000)).$(printf '%03d' $((wait % 1000)))"
    return 0
}
# Shows the end of a log, then exits: a process did not come up.
die_with_log() { tail -n 30 "$2" >&2 || true; die "$1 (log: $2)"; }

pg_start() {
    "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t "$READY_SECS" \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PGDATA -c fsync=off" start >/dev/null \
        || die_with_log "Postgres did not start" "$PGDATA/server.log"
    PG_STARTED=1
}

redis_start() {
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$RUN_DIR/redis" >>"$RUN_DIR/redis.log" 2>&1 &
    REDIS_PID=$!
    local deadline=$((SECONDS + READY_SECS))
    until [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; do
        [ $SECONDS -lt $deadline ] || die_with_log "Redis did not start" "$RUN_DIR/redis.log"
        sleep 0.1
    done
}

# sim_start a|b : gpu-sim A or B on its port; sets SIM_A_PID / SIM_B_PID.
sim_start() {
    local port seed
    if [ "$1" = a ]; then port=$SIM_A_PORT seed=0; else port=$SIM_B_PORT seed=1; fi
    # gpu-sim's own pace (40 ms to the first token, 80 tokens/s: about half a second
    # an answer), so a kill finds streams in flight. --threads 1: two simulators, a
    # gateway, Postgres, Redis and the load share 2 cores.
    "$BIN/gpu-sim" --listen "127.0.0.1:$port" --model sim-model --ttft-ms 40 \
        --tokens-per-sec 80 --max-concurrency 16 --threads 1 --seed "$seed" \
        >>"$RUN_DIR/sim_$1.log" 2>&1 &
    if [ "$1" = a ]; then SIM_A_PID=$!; else SIM_B_PID=$!; fi
    wait_http "http://127.0.0.1:$port/health" "$READY_SECS" \
        || die_with_log "gpu-sim $1 did not start" "$RUN_DIR/sim_$1.log"
}

# The config names the database and Redis: the environment must not override them.
TG=(env -u DATABASE_URL -u REDIS_URL LOG_LEVEL=info "$BIN/tollgate" --config "$CONFIG")

tollgate_start() {
    echo "=== start $(now_ms)" >>"$RUN_DIR/tollgate.log"
    "${TG[@]}" serve >>"$RUN_DIR/tollgate.log" 2>&1 &
    TG_PID=$!
    # /readyz: Postgres reachable and a backend routable, so it can take the load.
    wait_http "http://127.0.0.1:$API_PORT/readyz" "$READY_SECS" \
        || die_with_log "tollgate did not become ready" "$RUN_DIR/tollgate.log"
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# The usage events Tollgate holds in its spool (0 once all are in Postgres).
spooled_events() {
    curl -sf --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" \
        | awk '$1 == "tollgate_usage_spool_events" { print $2 }'
}

fault() {
    echo "$(now_ms) $1" >>"$FAULTS"
    log "$(since_start) fault: $1"
    case "$1" in
        pg_restart)
            "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
            sleep "$OUTAGE"
            pg_start
            ;;
        redis_restart)
            kill -TERM "$REDIS_PID"
            wait "$REDIS_PID" 2>/dev/null || true
            sleep "$OUTAGE"
            redis_start
            ;;
        gpu_sim_kill)
            kill -KILL "$SIM_A_PID"
            wait "$SIM_A_PID" 2>/dev/null || true
            sleep "$OUTAGE"
            sim_start a
            ;;
        tollgate_sigkill)
            kill -KILL "$TG_PID"
            wait "$TG_PID" 2>/dev/null || true
            tollgate_start
            ;;
        tollgate_sigterm)
            kill -TERM "$TG_PID"
            # Bounded by drain_timeout (10 s) plus the writer's last flush.
            wait "$TG_PID" 2>/dev/null || true
            tollgate_start
            ;;
    esac
    log "$(since_start) recovered: $1"
}

rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR/redis" "$PGDATA"
: >"$FAULTS"

log "Postgres on 127.0.0.1:$PG_PORT ($PGDATA)"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PGDATA"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >"$RUN_DIR/initdb.log" 2>&1 \
    || die_with_log "initdb failed" "$RUN_DIR/initdb.log"
pg_start
psql "postgres://postgres@127.0.0.1:$PG_PORT/postgres" -qc "CREATE DATABASE tollgate" >/dev/null
log "Redis on 127.0.0.1:$REDIS_PORT"
redis_start
log "gpu-sim on 127.0.0.1:$SIM_A_PORT and 127.0.0.1:$SIM_B_PORT"
sim_start a
sim_start b

# Six accounts: weight is each key's share of the requests.
ACCOUNTS=(
    "soak-free-a free 1"
    "soak-free-b free 1"
    "soak-starter-a starter 2"
    "soak-pro-a pro 3"
    "soak-pro-b pro 2"
    "soak-enterprise-a enterprise 2"
)
TOTAL_WEIGHT=11
# Measured over a 10-minute run, a request of this mix bills about 50 units on
# average (a ~45-token prompt and up to 32 generated tokens, two ~35-token
# embedding inputs, and refusals at 0), so an account of weight W asks for about
# RATE * SECS * W / 11 * 50 units: a fifth of that is its cap, reached at about
# 20 % of the run, before most faults.
cap_for() { echo $((SOAK_RATE * SOAK_SECS * $1 * 10 / TOTAL_WEIGHT)); }
FREE_CAP=$(cap_for 1)
STARTER_CAP=$(cap_for 2)

cat >"$CONFIG" <<TOML
# Written by scripts/soak.sh for one run.
[server]
listen = "127.0.0.1:$API_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
workers = 1
drain_timeout = "10s"
[database]
url = "$DATABASE"
[redis]
url = "redis://127.0.0.1:$REDIS_PORT"
[metering]
spool_dir = "$RUN_DIR/spool"
# A batch is written 1 s after its first event (default 200 ms): every SIGKILL
# then finds events not yet in Postgres, which only the journal brings back.
flush_interval = "1s"

# Hard-capped, and refused while Redis is down (the default for a free tier).
[[tiers]]
name = "free"
priority = 0
included_units = $FREE_CAP
hard_cap = true
max_queue_wait = "20s"
# Hard-capped, and admitted on this instance's own counters while Redis is down
# (the default for a paid tier).
[[tiers]]
name = "starter"
priority = 10
monthly_price = 9.0
included_units = $STARTER_CAP
hard_cap = true
max_queue_wait = "20s"
[[tiers]]
name = "pro"
priority = 30
monthly_price = 49.0
included_units = 2000000
overage_price = 0.00002
max_queue_wait = "20s"
[[tiers]]
name = "enterprise"
priority = 100
max_queue_wait = "20s"

[[backends]]
name = "gpu-a"
url = "http://127.0.0.1:$SIM_A_PORT"
models = ["sim-model"]
max_concurrency = 16
[[backends]]
name = "gpu-b"
url = "http://127.0.0.1:$SIM_B_PORT"
models = ["sim-model"]
max_concurrency = 16
TOML
"${TG[@]}" migrate >"$RUN_DIR/migrate.log" 2>&1 || die_with_log "tollgate migrate failed" "$RUN_DIR/migrate.log"
echo "# KEY ACCOUNT TIER WEIGHT" >"$KEYS"
for account in "${ACCOUNTS[@]}"; do
    read -r name tier weight <<<"$account"
    key=$("${TG[@]}" keys create --account "$name" --tier "$tier" --name soak 2>>"$RUN_DIR/keys.log" | tail -1)
    [ -n "$key" ] || die_with_log "keys create failed" "$RUN_DIR/keys.log"
    echo "$key $name $tier $weight" >>"$KEYS"
done

log "tollgate on 127.0.0.1:$API_PORT (admin $ADMIN_PORT, metrics $METRICS_PORT)"
tollgate_start

# The schedule: each round is the five faults in order, spread evenly from 10 %
# to 50 % of the run; the rest is the last Tollgate's quiet tail.
FAULT_NAMES=(pg_restart redis_restart gpu_sim_kill tollgate_sigkill tollgate_sigterm)
ROUNDS=$((SOAK_SECS / 150 > 1 ? SOAK_SECS / 150 : 1))
COUNT=$((ROUNDS * ${#FAULT_NAMES[@]}))
FIRST_MS=$((SOAK_SECS * 100))
LAST_MS=$((SOAK_SECS * 500))
STEP_MS=$(((LAST_MS - FIRST_MS) / (COUNT - 1)))

log "soak: $SOAK_RATE req/s for ${SOAK_SECS}s, $ROUNDS round(s) of ${#FAULT_NAMES[@]} faults, ${OUTAGE}s outages; caps free $FREE_CAP, starter $STARTER_CAP units"
LOAD_START_MS=$(now_ms)
"$BIN/loadgen" soak --url "http://127.0.0.1:$API_PORT" --keys-file "$KEYS" --ledger "$LEDGER" \
    --rate "$SOAK_RATE" --duration "$SOAK_SECS" --mix "$SOAK_MIX" --timeout 30 \
    --run-id "soak-$LOAD_START_MS" >"$RUN_DIR/loadgen.txt" 2>&1 &
LOADGEN_PID=$!

for ((i = 0; i < COUNT; i++)); do
    sleep_until_ms $((LOAD_START_MS + FIRST_MS + i * STEP_MS))
    fault "${FAULT_NAMES[i % ${#FAULT_NAMES[@]}]}"
done

# The last Tollgate process runs undisturbed from here to the end.
END_MS=$((LOAD_START_MS + SOAK_SECS * 1000))
sleep_until_ms $(($(now_ms) + (END_MS - $(now_ms)) / 4))
RSS_WARM=$(rss_kib "$TG_PID")
log "$(since_start) tollgate RSS after warm-up: $RSS_WARM KiB"

status=0
wait "$LOADGEN_PID" || status=$?
LOADGEN_PID=""
[ "$status" -eq 0 ] || die_with_log "loadgen soak failed ($status)" "$RUN_DIR/loadgen.txt"
RSS_END=$(rss_kib "$TG_PID")
log "$(since_start) load done; tollgate RSS at the end: $RSS_END KiB"
cat "$RUN_DIR/loadgen.txt" >&2

# The last events reach Postgres: the spool replayed, then a drain flushes the rest.
deadline=$((SECONDS + READY_SECS))
until [ "$(spooled_events)" = 0 ]; do
    [ $SECONDS -lt $deadline ] || die_with_log "tollgate's spool did not empty" "$RUN_DIR/tollgate.log"
    sleep 0.2
done
kill -TERM "$TG_PID"
wait "$TG_PID" 2>/dev/null || true
TG_PID=""

log "checking the ledger against usage_events"
status=0
"$BIN/loadgen" soak-check --ledger "$LEDGER" --database-url "$DATABASE" \
    --hard-cap "free=$FREE_CAP" --hard-cap "starter=$STARTER_CAP" --faults "$FAULTS" \
    --rss-warm-kib "$RSS_WARM" --rss-end-kib "$RSS_END" --rss-tolerance 0.2 || status=$?
exit "$status"
