#!/usr/bin/env bash
# What metering costs on the request path, against baselines measured in the
# same run. Sections (SECTIONS, default both):
#  overhead  open-loop load at RATE req/s, `loadgen --compare BASE CURRENT`,
#            ROUNDS alternating rounds: Tollgate built from BASE_REV (default
#            6edf85b, the last commit before metering: no counting, no usage
#            events) against this checkout, both in front of the same gpu-sim;
#  counting  this build with count_tokens on against the same build with
#            COUNT_TOKENS=false, for 2 KiB prompts at 500 req/s and 100 KiB
#            prompts at 50 req/s: the latency counting the prompt adds.
# Prints Markdown for BENCHMARKS.md; raw loadgen JSON goes to target/bench/.
#
#   scripts/bench-metering.sh
#   SECTIONS=counting ROUNDS=3 scripts/bench-metering.sh

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench-lib.sh"
provision
cd "$ROOT"
BASE_REV="${BASE_REV:-6edf85b}"
RATE="${RATE:-1000}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-10}"
SECTIONS="${SECTIONS:-overhead counting}"

field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

if section overhead; then
    bench_baseline "$BASE_REV"
fi
cargo build --release --locked --bins >&2

SIM_PORT=18401 BASE_PORT=18410 CUR_PORT=18420 NOCOUNT_PORT=18430
bench_sim $SIM_PORT
wait_listening 127.0.0.1 $SIM_PORT 30 || die "gpu-sim did not start"

# One database and key for every gateway: this build migrates it (the
# baseline's tables are a subset) and creates the key; each variant gets a
# copy of the config with its own ports.
bench_gateway $CUR_PORT $SIM_PORT
CONFIG="$OUT/tollgate-$CUR_PORT.toml"

# serve PORT BINARY VARIANT : runs a gateway on PORT; VARIANT is current,
# baseline (no [metering] section: it predates it) or nocount.
serve() {
    local port=$1 binary=$2 variant=$3 config="$OUT/tollgate-$1.toml"
    if [ "$port" != $CUR_PORT ]; then
        sed -e "s/:$CUR_PORT\"/:$port\"/" -e "s/:$((CUR_PORT + 1))\"/:$((port + 1))\"/" \
            -e "s/:$((CUR_PORT + 2))\"/:$((port + 2))\"/" -e "s/spool-$CUR_PORT/spool-$port/" \
            "$CONFIG" >"$config"
    fi
    case $variant in
        baseline) sed -i '/^\[metering\]/,/^spool_dir/d' "$config" ;;
        nocount) sed -i '/^spool_dir/a count_tokens = false' "$config" ;;
    esac
    bench_background "${TG_ENV[@]}" "$binary" --config "$config" serve 2>"$OUT/tollgate-$port.log"
    wait_listening 127.0.0.1 "$port" 30 || die "tollgate on $port did not start"
    "$BIN/loadgen" --url "http://127.0.0.1:$port" --key "$KEY" --rate 200 --duration 1 >/dev/null
}

# compare A B NAME FLAGS... : loadgen --compare into $OUT/NAME.json.
compare() {
    local a=$1 b=$2 name=$3; shift 3
    "$BIN/loadgen" --compare "http://127.0.0.1:$a" "http://127.0.0.1:$b" --key "$KEY" \
        --duration "$DURATION" --rounds "$ROUNDS" "$@" --json "$OUT/$name.json" >/dev/null
}
lat_a='"%.3f / %.3f" % (d["a"]["median"]["latency_ms"]["p50"], d["a"]["median"]["latency_ms"]["p99"])'
lat_b='"%.3f / %.3f" % (d["b"]["median"]["latency_ms"]["p50"], d["b"]["median"]["latency_ms"]["p99"])'
added='"%+.3f / %+.3f" % (d["added_latency_ms"]["p50"], d["added_latency_ms"]["p99"])'
p99_ratio='"%.3f" % (d["b"]["median"]["latency_ms"]["p99"] / d["a"]["median"]["latency_ms"]["p99"])'

if section overhead; then
    serve $BASE_PORT "$BASELINE" baseline
    serve $CUR_PORT "$BIN/tollgate" current
    echo "### Metering on the request path: before and after, at $RATE req/s"
    echo
    echo "Median of $ROUNDS alternating rounds of ${DURATION}s; latency in ms; baseline = Tollgate at $BASE_REV (no metering)."
    echo
    echo "| mode | baseline p50 / p99 | metering p50 / p99 | added p50 / p99 | p99 ratio |"
    echo "|---|---|---|---|---|"
    for mode in plain stream; do
        flags=(--rate "$RATE")
        [ $mode = stream ] && flags+=(--stream)
        compare $BASE_PORT $CUR_PORT "metering-$mode" "${flags[@]}"
        j="$OUT/metering-$mode.json"
        echo "| $mode | $(field "$j" "$lat_a") | $(field "$j" "$lat_b") | $(field "$j" "$added") | $(field "$j" "$p99_ratio") |"
    done
    echo
fi

if section counting; then
    listening 127.0.0.1 $CUR_PORT || serve $CUR_PORT "$BIN/tollgate" current
    serve $NOCOUNT_PORT "$BIN/tollgate" nocount
    echo "### Latency added by counting the prompt"
    echo
    echo "Same build, count_tokens off (A) and on (B); median of $ROUNDS alternating rounds of ${DURATION}s; latency in ms."
    echo
    echo "| prompt | rate | off p50 / p99 | on p50 / p99 | added p50 / p99 |"
    echo "|---|---|---|---|---|"
    for case in "2048 500" "102400 50"; do
        read -r bytes rate <<<"$case"
        compare $NOCOUNT_PORT $CUR_PORT "counting-$bytes" --rate "$rate" --prompt-bytes "$bytes"
        j="$OUT/counting-$bytes.json"
        echo "| $((bytes / 1024)) KiB | $rate | $(field "$j" "$lat_a") | $(field "$j" "$lat_b") | $(field "$j" "$added") |"
    done
fi
