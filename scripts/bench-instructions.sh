#!/usr/bin/env bash
# Instructions per request on the proxy's request path, Tollgate against the bare
# Pingora passthrough: noise-free and repeatable where wall-clock figures are not.
# Each proxy runs under `valgrind --tool=callgrind` (one worker thread) in front of
# gpu-sim while wrk sends non-streamed chat completions for DURATION seconds; the
# figure is the inclusive count of Pingora's `process_request` (the whole request
# path) divided by the requests wrk completed.
#
#   scripts/bench-instructions.sh            # prints a Markdown table
#   DURATION=5 scripts/bench-instructions.sh

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench-lib.sh"
provision
cd "$ROOT"
DURATION="${DURATION:-10}"
apt_install valgrind wrk
cargo build --release --locked --bins --example passthrough >&2
SIM_PORT=18501 PASS_PORT=18502 TG_PORT=18503
bench_sim $SIM_PORT
bench_gateway $TG_PORT $SIM_PORT

# measure NAME PORT COMMAND... : prints instructions per request for one proxy.
measure() {
    local name=$1 port=$2; shift 2
    local profile="$OUT/callgrind-$name.out"
    rm -f "$profile"
    "${TG_ENV[@]}" valgrind --tool=callgrind --callgrind-out-file="$profile" "$@" 2>/dev/null &
    local pid=$!
    # Under valgrind start-up takes seconds: wait for the listener, not a fixed time.
    wait_listening 127.0.0.1 "$port" 120 || die "$name did not start under valgrind"
    local requests
    requests=$(STREAM=0 wrk -t1 -c4 -d"${DURATION}s" -H "Authorization: Bearer $KEY" \
        -s load-tests/wrk/chat.lua "http://127.0.0.1:$port/v1/chat/completions" |
        awk '/requests in/ {print $1}')
    kill -INT "$pid"
    wait "$pid" 2>/dev/null
    local total
    total=$(callgrind_annotate --inclusive=yes "$profile" 2>/dev/null |
        grep -m1 -E 'process_request::\{\{closure\}\} \[' | awk '{gsub(",", "", $1); print $1}')
    awk -v t="$total" -v r="$requests" 'BEGIN {printf "%.1f", t / r / 1000}'
}

pass=$(measure passthrough $PASS_PORT "$BIN/examples/passthrough" "127.0.0.1:$PASS_PORT" "127.0.0.1:$SIM_PORT" 1)
tollgate=$(measure tollgate $TG_PORT "${TG[@]}" serve)

echo "| target | instructions / request | relative to passthrough |"
echo "|---|---|---|"
echo "| bare passthrough | ${pass}k | 1.00 |"
echo "| Tollgate | ${tollgate}k | $(awk -v a="$tollgate" -v b="$pass" 'BEGIN {printf "%.2f", a / b}') |"
