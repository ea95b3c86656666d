#!/usr/bin/env bash
# Routing policies when one backend is 3x slower than the other: two gpu-sims
# with 8 batch slots each, one answering in 20 ms and one in 60 ms (listed
# first, so ties do not favour the fast one), behind two Tollgates that differ
# only in [routing] policy: round_robin (A) and least_outstanding (B).
# `loadgen --compare` at RATE req/s (default 300: under the pair's capacity of
# ~530 req/s, over what round-robin's half share lets the slow one take),
# ROUNDS alternating rounds of DURATION s. Prints Markdown for BENCHMARKS.md.
#
#   scripts/bench-routing.sh
#   RATE=200 ROUNDS=3 scripts/bench-routing.sh

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench-lib.sh"
provision
cd "$ROOT"
RATE="${RATE:-300}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-10}"
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

cargo build --release --locked --bins >&2
SLOW_PORT=18701 FAST_PORT=18702 RR_PORT=18710 LO_PORT=18720
for backend in "$SLOW_PORT 60" "$FAST_PORT 20"; do
    read -r port ttft <<<"$backend"
    bench_background "$BIN/gpu-sim" --listen "127.0.0.1:$port" --ttft-ms "$ttft" \
        --tokens-per-sec 0 --output-tokens 16 --max-concurrency 8 >/dev/null
    wait_listening 127.0.0.1 "$port" 30 || die "gpu-sim on $port did not start"
done
bench_gateway $RR_PORT $SLOW_PORT
BASE_CONFIG="$OUT/tollgate-routing-base.toml"
cp "$OUT/tollgate-$RR_PORT.toml" "$BASE_CONFIG"

# policy PORT NAME : a copy of the config on PORT with both backends and NAME.
policy() {
    local config="$OUT/tollgate-$1.toml"
    python3 - "$BASE_CONFIG" "$config" "$RR_PORT" "$1" "$2" "$FAST_PORT" <<'PY'
import sys
src, dst, base, port, name, fast = sys.argv[1:]
base, port = int(base), int(port)
text = open(src).read()
for offset in range(3):
    text = text.replace(f":{base + offset}\"", f":{port + offset}\"")
text = text.replace(f"spool-{base}", f"spool-{port}")
text = text.replace("max_concurrency = 4096", "max_concurrency = 8")
text += f'[[backends]]\nname = "fast"\nurl = "http://127.0.0.1:{fast}"\nmodels = ["sim-model"]\nmax_concurrency = 8\n'
text += f'[routing]\npolicy = "{name}"\n'
open(dst, "w").write(text)
PY
    bench_background "${TG_ENV[@]}" "$BIN/tollgate" --config "$config" serve 2>"$OUT/tollgate-$1.log"
    wait_listening 127.0.0.1 "$1" 30 || die "tollgate on $1 did not start"
}
policy $RR_PORT round_robin
policy $LO_PORT least_outstanding

"$BIN/loadgen" --compare "http://127.0.0.1:$RR_PORT" "http://127.0.0.1:$LO_PORT" --key "$KEY" \
    --rate "$RATE" --duration "$DURATION" --rounds "$ROUNDS" --json "$OUT/routing.json" >/dev/null
j="$OUT/routing.json"
lat() { field "$j" "\"%.1f / %.1f / %.1f\" % tuple(d[\"$1\"][\"median\"][\"latency_ms\"][p] for p in (\"p50\", \"p90\", \"p99\"))"; }
echo "### Least outstanding against round-robin, one backend 3x slower, at $RATE req/s"
echo
echo "Median of $ROUNDS alternating rounds of ${DURATION}s; latency in ms."
echo
echo "| policy | p50 / p90 / p99 | p99 vs round-robin |"
echo "|---|---|---|"
echo "| round_robin (A) | $(lat a) | 1.00 |"
echo "| least_outstanding (B) | $(lat b) | $(field "$j" '"%.2f" % (d["b"]["median"]["latency_ms"]["p99"] / d["a"]["median"]["latency_ms"]["p99"])') |"
