#!/usr/bin/env bash
# Tollgate's memory: resident set size (VmRSS, and its peak VmHWM, from
# /proc/PID/status) idle, with STREAMS concurrent streams open through it, after
# every stream has ended, and through a second identical wave: a second wave that
# grows the "after" figure is a leak, one that reuses what the first kept is the
# allocator's retention.
#
# One slow gpu-sim holds the streams (TOKENS tokens at TOKENS_PER_SEC, so each
# stream stays open TOKENS / TOKENS_PER_SEC seconds); `loadgen --stream` opens
# them at RAMP_RATE a second and holds them (one connection each). Tollgate runs
# bench_gateway's config (one worker thread) with the backend's max_concurrency
# raised to STREAMS. Each run starts every variant afresh, in alternating order;
# tables give medians of RUNS runs, then every run.
#
# When the figures are taken:
#  idle   the listener accepts and one warm-up request has been answered;
#  held   Tollgate reports STREAMS requests outstanding on the backend;
#  after  loadgen has exited, nothing is outstanding and no client connection is
#         left; the figure is read SETTLE seconds later (a measurement point,
#         not a wait for anything: jemalloc hands pages back over ~10 s);
#  peak   VmHWM at the end of the run.
#
# Variants (VARIANTS, default "system jemalloc mimalloc"), each a Tollgate build:
#  system             the default build: glibc malloc
#  jemalloc mimalloc  built with `--features jemalloc` / `--features mimalloc`
#  rev=REV            the default build of revision REV (before/after a change)
#  VARIANT:VAR=VALUE  VARIANT with an environment variable, e.g.
#                     system:MALLOC_ARENA_MAX=2
# With SECTIONS="memory peak" each variant's closed-loop peak throughput is
# measured too (wrk, 1 thread, 16 connections, PEAK_DURATION s, median of
# PEAK_RUNS runs, against an unpaced gpu-sim), as in bench-overhead.sh.
# Prints Markdown for BENCHMARKS.md; loadgen's JSON and Tollgate's logs go to
# target/bench/.
#
#   scripts/bench-memory.sh
#   RUNS=1 STREAMS=1000 VARIANTS=system scripts/bench-memory.sh
#   VARIANTS="system system:MALLOC_ARENA_MAX=2 jemalloc" SECTIONS="memory peak" scripts/bench-memory.sh

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench-lib.sh"
shopt -s inherit_errexit
provision
cd "$ROOT"
STREAMS="${STREAMS:-5000}"
RUNS="${RUNS:-3}"
RAMP_RATE="${RAMP_RATE:-1000}"
TOKENS="${TOKENS:-40}"
TOKENS_PER_SEC="${TOKENS_PER_SEC:-1}"
SETTLE="${SETTLE:-15}"
VARIANTS="${VARIANTS:-system jemalloc mimalloc}"
SECTIONS="${SECTIONS:-memory}"
PEAK_RUNS="${PEAK_RUNS:-3}"
PEAK_DURATION="${PEAK_DURATION:-5}"


# Each stream is a connection into Tollgate and one out of it.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((2 * STREAMS + 1024)) ] ||
    die "open-file limit $(ulimit -n) is too low for $STREAMS streams: raise it (ulimit -Hn) to $((2 * STREAMS + 1024))"

# Binaries: one per build a variant names.
section peak && apt_install wrk
declare -A BUILD
for variant in $VARIANTS; do
    build=${variant%%:*}
    case $build in
        system | jemalloc | mimalloc) ;;
        rev=*) bench_baseline "${build#rev=}"; BUILD[$build]=$BASELINE ;;
        *) die "unknown variant $variant" ;;
    esac
done
for build in jemalloc mimalloc; do
    if [[ " $VARIANTS " == *" $build"[\ :]* ]]; then
        cargo build --release --locked -p tollgate --features "$build" >&2
        cp "$BIN/tollgate" "$OUT/tollgate-$build"
        BUILD[$build]=$OUT/tollgate-$build
    fi
done
cargo build --release --locked --bins >&2
BUILD[system]=$BIN/tollgate

SIM_PORT=18701 FAST_SIM_PORT=18702
BENCH_MAX_CONCURRENCY=$((STREAMS + 64))
bench_background "$BIN/gpu-sim" --listen "127.0.0.1:$SIM_PORT" --ttft-ms 0 \
    --tokens-per-sec "$TOKENS_PER_SEC" --output-tokens "$TOKENS" --threads 1 \
    --max-concurrency "$BENCH_MAX_CONCURRENCY" >/dev/null
section peak && bench_sim $FAST_SIM_PORT

# One database, config and key per variant; GW_PORT[variant] is its listener.
declare -A GW_PORT GW_KEY GW_CONFIG
i=0
for variant in $VARIANTS; do
    port=$((18710 + 4 * i)) i=$((i + 1))
    bench_gateway $port $SIM_PORT
    GW_PORT[$variant]=$port GW_KEY[$variant]=$KEY GW_CONFIG[$variant]=$OUT/tollgate-$port.toml
done
wait_listening 127.0.0.1 $SIM_PORT 30 || die "gpu-sim did not start"

# status PID FIELD : a /proc/PID/status field in KiB.
status() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

# in_flight PORT : requests Tollgate (listening on PORT) has outstanding on its backend.
in_flight() {
    curl -sf --max-time 5 "http://127.0.0.1:$(($1 + 2))/metrics" |
        awk '/^tollgate_backend_in_flight[{ ]/ {n += $NF} END {print n + 0}'
}

# clients PORT : established TCP connections to 127.0.0.1:PORT (the client side
# is not counted: its local port is ephemeral).
clients() {
    local hex
    hex=$(printf '%04X' "$1")
    cat /proc/net/tcp | awk -v p=":$hex" '$4 == "01" && substr($2, length($2) - 4) == p {n++} END {print n + 0}'
}

# wait_for SECONDS WHAT CMD... : polls CMD until it succeeds; dies after SECONDS.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        [ $SECONDS -lt $deadline ] || die "timed out waiting for $what"
        sleep 0.2
    done
}
held() { [ "$(in_flight "$1")" -ge "$STREAMS" ]; }
drained() { [ "$(in_flight "$1")" -eq 0 ] && [ "$(clients "$1")" -eq 0 ]; }

STREAM_SECS=$(awk -v t="$TOKENS" -v r="$TOKENS_PER_SEC" 'BEGIN {printf "%d", t / r + 0.999}')
RAMP_SECS=$(awk -v s="$STREAMS" -v r="$RAMP_RATE" 'BEGIN {print s / r}')
[ "$(awk -v s="$STREAM_SECS" -v r="$RAMP_SECS" 'BEGIN {print (s > r + 10)}')" = 1 ] ||
    die "streams of ${STREAM_SECS}s would end before the ${RAMP_SECS}s ramp is over: raise TOKENS"

# wave VARIANT PID RUN N : opens STREAMS streams through the variant; sets HELD
# (VmRSS while they are all open) and AFTER (VmRSS once they have ended), in KiB.
wave() {
    local variant=$1 pid=$2 run=$3 n=$4 port=${GW_PORT[$1]}
    local json="$OUT/memory-$run-${variant//[:=\/]/_}-$n.json"
    "$BIN/loadgen" --url "http://127.0.0.1:$port" --key "${GW_KEY[$variant]}" --stream \
        --rate "$RAMP_RATE" --duration "$RAMP_SECS" --concurrency "$STREAMS" \
        --max-tokens "$TOKENS" --timeout $((STREAM_SECS + 120)) --json "$json" \
        >/dev/null 2>>"$OUT/memory-loadgen.log" &
    local loadgen=$!
    BENCH_PIDS+=("$loadgen")
    wait_for $((STREAM_SECS + 60)) "$STREAMS streams through $variant" held "$port"
    HELD=$(status "$pid" VmRSS)
    wait "$loadgen" || die "loadgen failed against $variant (see $json)"
    unlist "$loadgen"
    local ok
    ok=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['report']['requests']['ok'])" "$json")
    [ "$ok" -eq "$STREAMS" ] || die "$variant answered $ok of $STREAMS streams whole (see $json)"
    wait_for 60 "$variant to close every stream" drained "$port"
    # A measurement point, not synchronisation: see the header.
    sleep "$SETTLE"
    AFTER=$(status "$pid" VmRSS)
}

# start VARIANT CONFIG LOG : starts Tollgate as the variant builds and runs it;
# sets PID.
start() {
    local build=${1%%:*} envs=()
    [[ $1 == *:* ]] && envs=("${1#*:}")
    "${TG_ENV[@]}" "${envs[@]}" "${BUILD[$build]}" --config "$2" serve 2>>"$3" &
    PID=$!
    BENCH_PIDS+=("$PID")
}

stop() {
    kill -INT "$1"
    wait "$1" 2>/dev/null || true
    unlist "$1"
}

# unlist PID : PID has exited; bench_cleanup must not signal it (a failed kill
# there would fail the script).
unlist() {
    local keep=() p
    for p in "${BENCH_PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    BENCH_PIDS=("${keep[@]}")
}

# measure VARIANT RUN : one fresh Tollgate through two waves; sets
# RESULT[VARIANT,RUN] to "idle held1 after1 held2 after2 hwm" in KiB and
# "threads" (at idle).
measure() {
    local variant=$1 run=$2 port=${GW_PORT[$1]}
    start "$variant" "${GW_CONFIG[$variant]}" "$OUT/memory-tollgate-${variant//[:=\/]/_}.log"
    local pid=$PID
    wait_listening 127.0.0.1 "$port" 60 || die "$variant did not start"
    "$BIN/loadgen" --url "http://127.0.0.1:$port" --key "${GW_KEY[$variant]}" --rate 1 \
        --duration 1 >/dev/null 2>&1 || die "$variant did not answer the warm-up request"
    local idle threads one
    idle=$(status "$pid" VmRSS) threads=$(status "$pid" Threads)
    wave "$variant" "$pid" "$run" 1
    one="$HELD $AFTER"
    wave "$variant" "$pid" "$run" 2
    RESULT[$variant,$run]="$idle $one $HELD $AFTER $(status "$pid" VmHWM) $threads"
    stop "$pid"
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

if section memory; then
    declare -A RESULT
    variants=($VARIANTS)
    for run in $(seq "$RUNS"); do
        # Rotate the order each run, so no variant always goes first.
        for k in $(seq 0 $((${#variants[@]} - 1))); do
            variant=${variants[$(((k + run - 1) % ${#variants[@]}))]}
            log "run $run: $variant"
            measure "$variant" "$run"
        done
    done

    echo "### Memory: $STREAMS streams"
    echo
    echo "RSS in MiB, median of $RUNS runs; a stream lasts ${STREAM_SECS}s (${TOKENS} tokens at ${TOKENS_PER_SEC}/s), opened at ${RAMP_RATE}/s; \"after\" is read ${SETTLE}s after the last stream ended."
    echo
    echo "| variant | idle | $STREAMS streams | after | second wave | after second | peak (VmHWM) | per stream KiB | after / idle |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for variant in $VARIANTS; do
        cols=()
        for c in 1 2 3 4 5 6; do
            values=()
            for run in $(seq "$RUNS"); do
                read -ra r <<<"${RESULT[$variant,$run]}"
                values+=("${r[$((c - 1))]}")
            done
            cols+=("$(median "${values[@]}")")
        done
        per=$(awk -v h="${cols[1]}" -v i="${cols[0]}" -v s="$STREAMS" 'BEGIN {printf "%.1f", (h - i) / s}')
        ratio=$(awk -v a="${cols[4]}" -v i="${cols[0]}" 'BEGIN {printf "%.2f", a / i}')
        echo "| $variant | $(mib "${cols[0]}") | $(mib "${cols[1]}") | $(mib "${cols[2]}") | $(mib "${cols[3]}") | $(mib "${cols[4]}") | $(mib "${cols[5]}") | $per | $ratio |"
    done
    echo
    echo "Every run (MiB: idle, streams, after, second wave, after second, peak; threads at idle):"
    echo
    echo "| variant | run | idle | streams | after | second wave | after second | peak | threads |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for variant in $VARIANTS; do
        for run in $(seq "$RUNS"); do
            read -ra r <<<"${RESULT[$variant,$run]}"
            echo "| $variant | $run | $(mib "${r[0]}") | $(mib "${r[1]}") | $(mib "${r[2]}") | $(mib "${r[3]}") | $(mib "${r[4]}") | $(mib "${r[5]}") | ${r[6]} |"
        done
    done
fi

# peak VARIANT : closed-loop wrk runs of chat completions, plain then streamed,
# through a fresh Tollgate of VARIANT in front of the unpaced gpu-sim; prints
# "plain_median plain_runs stream_median stream_runs hwm_mib" (runs comma-joined).
peak() {
    local variant=$1 port=18790 config="$OUT/memory-peak.toml" out=()
    local old=${GW_PORT[$variant]}
    sed -e "s/127.0.0.1:$SIM_PORT\"/127.0.0.1:$FAST_SIM_PORT\"/" \
        -e "s/127.0.0.1:$old\"/127.0.0.1:$port\"/" \
        -e "s/127.0.0.1:$((old + 1))\"/127.0.0.1:$((port + 1))\"/" \
        -e "s/127.0.0.1:$((old + 2))\"/127.0.0.1:$((port + 2))\"/" \
        "${GW_CONFIG[$variant]}" >"$config"
    start "$variant" "$config" "$OUT/memory-tollgate-peak.log"
    wait_listening 127.0.0.1 "$port" 60 || die "$variant did not start"
    for stream in 0 1; do
        local rates=()
        for _ in $(seq "$PEAK_RUNS"); do
            rates+=("$(STREAM=$stream wrk -t1 -c16 -d"${PEAK_DURATION}s" -H "Authorization: Bearer ${GW_KEY[$variant]}" \
                -s load-tests/wrk/chat.lua "http://127.0.0.1:$port/v1/chat/completions" |
                awk '/Requests\/sec/ {printf "%.0f", $2}')")
        done
        out+=("$(median "${rates[@]}")" "$(IFS=,; echo "${rates[*]}")")
    done
    PEAK="${out[*]} $(mib "$(status "$PID" VmHWM)")"
    stop "$PID"
}

if section peak; then
    echo
    echo "### Peak throughput by variant"
    echo
    echo "wrk, 1 thread, 16 keep-alive connections, ${PEAK_DURATION}s per run, median of $PEAK_RUNS runs (req/s), unpaced gpu-sim answering 16 tokens; each variant a fresh Tollgate."
    echo
    first=
    echo "| variant | plain | plain vs ${VARIANTS%% *} | stream | stream vs ${VARIANTS%% *} | runs plain | runs stream | VmHWM MiB |"
    echo "|---|---|---|---|---|---|---|---|"
    wait_listening 127.0.0.1 $FAST_SIM_PORT 30 || die "gpu-sim did not start"
    for variant in $VARIANTS; do
        peak "$variant"
        read -r plain plain_runs stream stream_runs hwm <<<"$PEAK"
        [ -z "$first" ] && first="$plain $stream"
        read -r p0 s0 <<<"$first"
        echo "| $variant | $plain | $(awk -v a="$plain" -v b="$p0" 'BEGIN {printf "%.2f", a / b}') | $stream | $(awk -v a="$stream" -v b="$s0" 'BEGIN {printf "%.2f", a / b}') | $plain_runs | $stream_runs | $hwm |"
    done
fi
