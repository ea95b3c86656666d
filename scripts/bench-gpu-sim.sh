#!/usr/bin/env bash
# gpu-sim's peak rate on this machine: one gpu-sim worker thread, unpaced
# (--ttft-ms 0 --tokens-per-sec 0), 16-token answers, driven by wrk with one
# thread and 16 connections (closed loop, to find the ceiling). The baseline,
# measured in the same run on the same process, is `GET /health`: the HTTP
# stack with a handler that does nothing. Each scenario runs RUNS times
# (default 5) and the median is reported, since the machine is shared and noisy.
#
#   scripts/bench-gpu-sim.sh            # prints a Markdown table
#   RUNS=3 DURATION=5 scripts/bench-gpu-sim.sh

source "$(dirname "$0")/lib.sh"
cd "$ROOT"
RUNS="${RUNS:-5}"
DURATION="${DURATION:-10}"
apt_install wrk
cargo build --release --locked -p tollgate-backends --bin gpu-sim >&2

PORT="${SIM_PORT:-18101}"
target/release/gpu-sim --listen "127.0.0.1:$PORT" --ttft-ms 0 --tokens-per-sec 0 \
    --output-tokens 16 --threads 1 >/dev/null &
SIM_PID=$!
trap 'kill $SIM_PID 2>/dev/null; wait $SIM_PID 2>/dev/null' EXIT
wait_listening 127.0.0.1 "$PORT" 30 || die "gpu-sim did not start"

# run_wrk PATH [STREAM] : prints "requests/s p50_ms p99_ms" for one wrk run;
# with STREAM (0 or 1) it POSTs a chat completion, without it it GETs PATH.
run_wrk() {
    local script=()
    [ $# -gt 1 ] && script=(-s load-tests/wrk/chat.lua)
    STREAM="${2:-0}" wrk -t1 -c16 -d"${DURATION}s" --latency "${script[@]}" "http://127.0.0.1:$PORT$1" |
        awk '/Requests\/sec/ {rps=$2}
             /^ +50%/ {p50=$2} /^ +99%/ {p99=$2}
             function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
             END {printf "%.0f %.3f %.3f\n", rps, ms(p50), ms(p99)}'
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "| scenario | req/s (median of $RUNS) | vs baseline | p50 ms | p99 ms | runs (req/s) |"
echo "|---|---|---|---|---|---|"
baseline=""
for scenario in "baseline: GET /health|/health" \
                "chat, non-streamed (16 tokens)|/v1/chat/completions|0" \
                "chat, streamed (16 tokens)|/v1/chat/completions|1"; do
    IFS='|' read -r name path stream <<<"$scenario"
    results=()
    for _ in $(seq "$RUNS"); do results+=("$(run_wrk "$path" ${stream:+"$stream"})"); done
    rps=$(printf '%s\n' "${results[@]}" | awk '{print $1}' | median)
    p50=$(printf '%s\n' "${results[@]}" | awk '{print $2}' | median)
    p99=$(printf '%s\n' "${results[@]}" | awk '{print $3}' | median)
    all=$(printf '%s\n' "${results[@]}" | awk '{printf "%s%s", sep, $1; sep=", "}')
    baseline="${baseline:-$rps}"
    ratio=$(awk -v a="$rps" -v b="$baseline" 'BEGIN {printf "%.2f", a / b}')
    echo "| $name | $rps | $ratio | $p50 | $p99 | $all |"
done
