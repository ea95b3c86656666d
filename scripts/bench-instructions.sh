#!/usr/bin/env bash
# Instructions per request on the proxy's request path, Tollgate against the bare
# Pingora passthrough: noise-free and repeatable where wall-clock figures are not.
# Each proxy runs under `valgrind --tool=callgrind` (one worker thread) in front of
# gpu-sim while wrk sends non-streamed chat completions for DURATION seconds; the
# figure is the inclusive count of Pingora's `process_request` (the whole request
# path) divided by the requests wrk completed; beside it, the whole process's count
# per request (every thread: the usage writer, the tokio runtime, background
# tasks), which is what the machine pays. A second of warm-up load runs first
# and the counters are zeroed after it, so one-time costs (connections, caches)
# are left out. With BASE_REV, Tollgate built from that revision is measured too.
#
#   scripts/bench-instructions.sh            # prints a Markdown table
#   DURATION=5 scripts/bench-instructions.sh
#   BASE_REV=ed618e2 scripts/bench-instructions.sh

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench-lib.sh"
provision
cd "$ROOT"
DURATION="${DURATION:-10}"
BASE_REV="${BASE_REV:-}"
apt_install valgrind wrk
[ -n "$BASE_REV" ] && bench_baseline "$BASE_REV"
cargo build --release --locked --bins --example passthrough >&2
SIM_PORT=18501 PASS_PORT=18502 TG_PORT=18503 BASE_PORT=18506
bench_sim $SIM_PORT
if [ -n "$BASE_REV" ]; then
    bench_gateway $BASE_PORT $SIM_PORT
    BASE_TG=("$BASELINE" --config "$OUT/tollgate-$BASE_PORT.toml") BASE_KEY=$KEY
fi
bench_gateway $TG_PORT $SIM_PORT

# load PORT KEY SECONDS : non-streamed chat completions with wrk; prints the
# number of requests completed.
load() {
    STREAM=0 wrk -t1 -c4 -d"$3s" -H "Authorization: Bearer $2" \
        -s load-tests/wrk/chat.lua "http://127.0.0.1:$1/v1/chat/completions" |
        awk '/requests in/ {print $1}'
}

# measure NAME PORT KEY COMMAND... : prints thousands of instructions per request
# for one proxy, on the request path and in the whole process.
measure() {
    local name=$1 port=$2 key=$3; shift 3
    local profile="$OUT/callgrind-$name.out"
    rm -f "$profile"
    "${TG_ENV[@]}" valgrind --tool=callgrind --callgrind-out-file="$profile" "$@" 2>/dev/null &
    local pid=$!
    # Under valgrind start-up takes seconds: wait for the listener, not a fixed time.
    wait_listening 127.0.0.1 "$port" 120 || die "$name did not start under valgrind"
    load "$port" "$key" 1 >/dev/null
    timeout 60 callgrind_control --zero "$pid" >/dev/null || die "could not zero $name's counters"
    local requests
    requests=$(load "$port" "$key" "$DURATION")
    kill -INT "$pid"
    wait "$pid" 2>/dev/null
    local annotated path whole
    annotated=$(callgrind_annotate --inclusive=yes "$profile" 2>/dev/null)
    path=$(grep -m1 -E 'process_request::\{\{closure\}\} \[' <<<"$annotated" |
        awk '{gsub(",", "", $1); print $1}')
    whole=$(grep -m1 'PROGRAM TOTALS' <<<"$annotated" | awk '{gsub(",", "", $1); print $1}')
    awk -v p="$path" -v w="$whole" -v r="$requests" \
        'BEGIN {printf "%.1f %.1f", p / r / 1000, w / r / 1000}'
}

pass=$(measure passthrough $PASS_PORT "$KEY" "$BIN/examples/passthrough" "127.0.0.1:$PASS_PORT" "127.0.0.1:$SIM_PORT" 1)
tollgate=$(measure tollgate $TG_PORT "$KEY" "${TG[@]}" serve)

# row NAME "PATH WHOLE" : one table row, each figure with its ratio to the passthrough's.
row() {
    local path whole
    read -r path whole <<<"$2"
    awk -v n="$1" -v p="$path" -v w="$whole" -v pp="${pass% *}" -v pw="${pass#* }" \
        'BEGIN {printf "| %s | %.1fk | %.2f | %.1fk | %.2f |\n", n, p, p / pp, w, w / pw}'
}
echo "| target | request path / request | relative | whole process / request | relative |"
echo "|---|---|---|---|---|"
row "bare passthrough" "$pass"
if [ -n "$BASE_REV" ]; then
    row "Tollgate at $BASE_REV" "$(measure "tollgate-$BASE_REV" $BASE_PORT "$BASE_KEY" "${BASE_TG[@]}" serve)"
fi
row "Tollgate" "$tollgate"
