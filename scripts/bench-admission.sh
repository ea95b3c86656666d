#!/usr/bin/env bash
# Admission: what it costs on the request path, and how the priority queue
# holds each tier's wait target under overload. Sections (SECTIONS, default both):
#  overhead  open-loop load at RATE req/s, `loadgen --compare BASE CURRENT`,
#            ROUNDS alternating rounds: Tollgate built from BASE_REV (default
#            22a0b48, the last commit before admission) against this checkout
#            with a tier that has every limit (RPM and TPM per key and per
#            account, a monthly quota), decided in Redis and, separately, in
#            the in-process store;
#  queue     a tier mix of 10% Pro, 30% Premium, 60% Free at 1.5x and 3x the
#            pool's capacity: gpu-sim with SLOTS slots and a fixed 100 ms
#            service time (capacity SLOTS x 10 req/s), ROUNDS runs of
#            QUEUE_DURATION s per load. The tiers' waits are the design
#            brief's scaled by 1/10 with the service time (Pro 3 s, Premium
#            12 s, Free 30 s and shed past an expected 6 s, aging 6 s), so a
#            run takes a minute instead of ten. Per tier: p50/p99 queue wait,
#            share shed (503), goodput; and how busy the slots were while
#            requests queued (sampled from /admin/queues every 100 ms).
# Prints Markdown for BENCHMARKS.md; raw loadgen JSON goes to target/bench/.
#
#   scripts/bench-admission.sh
#   SECTIONS=queue ROUNDS=1 QUEUE_DURATION=30 scripts/bench-admission.sh

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench-lib.sh"
provision
cd "$ROOT"
BASE_REV="${BASE_REV:-22a0b48}"
RATE="${RATE:-1000}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
QUEUE_DURATION="${QUEUE_DURATION:-60}"
SLOTS="${SLOTS:-8}"
SECTIONS="${SECTIONS:-overhead queue}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
PREFIX="tgbench$$"
# The queue section reads /admin/queues.
export TOLLGATE_ADMIN_TOKEN="${TOLLGATE_ADMIN_TOKEN:-bench-admin-token-0123456789}"

field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }
# This run's Redis keys go with it.
trap 'redis-cli -u "$REDIS_URL" EVAL "for _, k in ipairs(redis.call(\"KEYS\", ARGV[1])) do redis.call(\"DEL\", k) end" 0 "$PREFIX:*" >/dev/null; bench_cleanup' EXIT

if section overhead; then
    bench_baseline "$BASE_REV"
fi
cargo build --release --locked --bins >&2

# serve PORT BINARY CONFIG : runs a gateway and warms it up.
serve() {
    bench_background "${TG_ENV[@]}" "$2" --config "$3" serve 2>"$OUT/tollgate-$1.log"
    wait_listening 127.0.0.1 "$1" 30 || die "tollgate on $1 did not start"
}

# variant BASE_CONFIG PORT TIER_LINES REDIS : a copy of the config on PORT
# with the tier's extra lines and, with REDIS=redis, the shared Redis.
variant() {
    local from=$1 port=$2 lines=$3 redis=$4 config="$OUT/tollgate-$2.toml"
    local base=${from##*-}; base=${base%.toml}
    sed -e "s/:$base\"/:$port\"/" -e "s/:$((base + 1))\"/:$((port + 1))\"/" \
        -e "s/:$((base + 2))\"/:$((port + 2))\"/" -e "s/spool-$base/spool-$port/" "$from" >"$config"
    [ -n "$lines" ] && python3 - "$config" "$lines" <<'PY'
import sys
path, lines = sys.argv[1], sys.argv[2].replace("\\n", "\n")
text = open(path).read().replace('[[tiers]]\nname = "pro"\n', '[[tiers]]\nname = "pro"\n' + lines + "\n")
open(path, "w").write(text)
PY
    [ "$redis" = redis ] && printf '[redis]\nurl = "%s"\nkey_prefix = "%s"\n' "$REDIS_URL" "$PREFIX" >>"$config"
    echo "$config"
}

if section overhead; then
    SIM_PORT=18501 BASE_PORT=18510 REDIS_PORT=18520 LOCAL_PORT=18530
    bench_sim $SIM_PORT
    wait_listening 127.0.0.1 $SIM_PORT 30 || die "gpu-sim did not start"
    bench_gateway $BASE_PORT $SIM_PORT
    # Every limit a tier can have, set high enough that nothing is refused.
    limits='priority = 10\nmonthly_price = 49.0\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\nkey_requests_per_minute = 100000000\nkey_tokens_per_minute = 100000000000\nincluded_units = 100000000000\nhard_cap = false\noverage_price = 0.00001'
    serve $BASE_PORT "$BASELINE" "$OUT/tollgate-$BASE_PORT.toml"
    serve $REDIS_PORT "$BIN/tollgate" "$(variant "$OUT/tollgate-$BASE_PORT.toml" $REDIS_PORT "$limits" redis)"
    serve $LOCAL_PORT "$BIN/tollgate" "$(variant "$OUT/tollgate-$BASE_PORT.toml" $LOCAL_PORT "$limits" local)"
    echo "### Admission on the request path, at $RATE req/s"
    echo
    echo "Median of $ROUNDS alternating rounds of ${DURATION}s; latency in ms; baseline = Tollgate at $BASE_REV (no admission); admission = a tier with RPM and TPM per key and per account and a monthly quota, one reservation and one settlement per request."
    echo
    echo "| limits decided in | baseline p50 / p99 | admission p50 / p99 | added p50 / p99 | p99 ratio |"
    echo "|---|---|---|---|---|"
    for store in redis local; do
        port=$REDIS_PORT; [ $store = local ] && port=$LOCAL_PORT
        "$BIN/loadgen" --compare "http://127.0.0.1:$BASE_PORT" "http://127.0.0.1:$port" --key "$KEY" \
            --rate "$RATE" --duration "$DURATION" --rounds "$ROUNDS" --json "$OUT/admission-$store.json" >/dev/null
        j="$OUT/admission-$store.json"
        echo "| $store | $(field "$j" '"%.3f / %.3f" % (d["a"]["median"]["latency_ms"]["p50"], d["a"]["median"]["latency_ms"]["p99"])') | $(field "$j" '"%.3f / %.3f" % (d["b"]["median"]["latency_ms"]["p50"], d["b"]["median"]["latency_ms"]["p99"])') | $(field "$j" '"%+.3f / %+.3f" % (d["added_latency_ms"]["p50"], d["added_latency_ms"]["p99"])') | $(field "$j" '"%.3f" % (d["b"]["median"]["latency_ms"]["p99"] / d["a"]["median"]["latency_ms"]["p99"])') |"
    done
    echo
fi

if section queue; then
    SIM_PORT=18601 GW_PORT=18610
    bench_background "$BIN/gpu-sim" --listen "127.0.0.1:$SIM_PORT" --ttft-ms 100 --tokens-per-sec 0 \
        --output-tokens 4 --max-concurrency "$SLOTS" >/dev/null
    wait_listening 127.0.0.1 $SIM_PORT 30 || die "gpu-sim did not start"
    bench_gateway $GW_PORT $SIM_PORT
    config="$OUT/tollgate-$GW_PORT.toml"
    python3 - "$config" "$SLOTS" <<'PY'
import sys
path, slots = sys.argv[1], sys.argv[2]
text = open(path).read()
tiers = """[admission]
aging = "6s"
[[tiers]]
name = "free"
priority = 0
max_queue_wait = "30s"
max_expected_wait = "6s"
[[tiers]]
name = "premium"
priority = 20
monthly_price = 15.0
max_queue_wait = "12s"
[[tiers]]
name = "pro"
priority = 30
monthly_price = 49.0
max_queue_wait = "3s"
"""
text = text.replace('[[tiers]]\nname = "pro"\n', tiers)
text = text.replace("max_concurrency = 4096", f"max_concurrency = {slots}")
open(path, "w").write(text)
PY
    PRO="$KEY"
    PREMIUM="$("${TG_ENV[@]}" "${TG[@]}" keys create --account premium-co --tier premium | tail -1)"
    FREE="$("${TG_ENV[@]}" "${TG[@]}" keys create --account free-co --tier free | tail -1)"
    serve $GW_PORT "$BIN/tollgate" "$config"
    capacity=$((SLOTS * 10))
    echo "### Priority queue under overload"
    echo
    echo "gpu-sim with $SLOTS slots and a fixed 100 ms service time (capacity $capacity req/s); tier mix 10% Pro, 30% Premium, 60% Free; waits scaled 1/10 (targets: Pro ≤ 3 s, Premium ≤ 12 s; Free shed past an expected 6 s). Median of $ROUNDS runs of ${QUEUE_DURATION}s; waits in seconds."
    echo
    echo "| load | tier | queue wait p50 / p99 | shed | goodput req/s | slots busy while queued |"
    echo "|---|---|---|---|---|---|"
    for factor in 1.5 3; do
        rate=$(python3 -c "print($capacity * $factor)")
        for round in $(seq "$ROUNDS"); do
            samples="$OUT/queue-$factor-$round.samples"
            : >"$samples"
            (while :; do
                curl -s -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" \
                    "http://127.0.0.1:$((GW_PORT + 1))/admin/queues" >>"$samples" && echo >>"$samples"
                sleep 0.1
            done) &
            sampler=$!
            "$BIN/loadgen" --url "http://127.0.0.1:$GW_PORT" --key-mix "$PRO:1,$PREMIUM:3,$FREE:6" \
                --rate "$rate" --duration "$QUEUE_DURATION" --timeout 45 --concurrency 8000 \
                --max-tokens 4 --json "$OUT/queue-$factor-$round.json" >/dev/null
            kill $sampler; wait $sampler 2>/dev/null || true
        done
        python3 - "$OUT" "$factor" "$ROUNDS" "$QUEUE_DURATION" <<'PY'
import json, statistics, sys
out, factor, rounds, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
names = ["pro", "premium", "free"]
rows = {n: {"p50": [], "p99": [], "shed": [], "goodput": []} for n in names}
busy = []
for r in range(1, rounds + 1):
    report = json.load(open(f"{out}/queue-{factor}-{r}.json"))["report"]
    for name, key in zip(names, report["per_key"]):
        wait = key.get("queue_wait_ms") or {"p50": 0, "p99": 0}
        sent = key["requests"]["sent"]
        shed = key["errors"]["by_status"].get("503", 0)
        rows[name]["p50"].append(wait["p50"] / 1000)
        rows[name]["p99"].append(wait["p99"] / 1000)
        rows[name]["shed"].append(shed / sent if sent else 0)
        # Answers per second of offered load (the drain after it is not load).
        rows[name]["goodput"].append(key["requests"]["ok"] / duration)
    fractions = []
    for line in open(f"{out}/queue-{factor}-{r}.samples"):
        try:
            pool = json.loads(line)["data"][0]
        except (ValueError, KeyError, IndexError):
            continue
        if sum(t["depth"] for t in pool["tiers"]) > 0:
            fractions.append(pool["in_use"] / pool["slots"])
    if fractions:
        busy.append(statistics.mean(fractions))
m = statistics.median
busy_text = f"{100 * m(busy):.1f}%" if busy else "-"
for name in names:
    row = rows[name]
    print(f"| {factor}x | {name} | {m(row['p50']):.2f} / {m(row['p99']):.2f} | "
          f"{100 * m(row['shed']):.1f}% | {m(row['goodput']):.1f} | {busy_text} |")
PY
    done
    echo
fi
