#!/usr/bin/env bash
# Tollgate's added latency and sustainable rate, against two baselines measured
# in the same run: gpu-sim directly, and a bare Pingora passthrough with no
# features (proxy/examples/passthrough.rs: the stack's own limit).
#
# Every process runs one worker thread (Tollgate's default WORKERS=1); gpu-sim
# answers at once with 16 tokens. Sections (SECTIONS, default all four):
#  fixed   open-loop load at fixed rates, `loadgen --compare direct X` with
#          ROUNDS alternating rounds: added latency p50/p99 of the
#          passthrough and of Tollgate;
#  ladder  open-loop rate ladder: the highest rate each target sustains with
#          p99 < 10 ms and no errors or dropped requests, in most of
#          LADDER_RUNS runs;
#  work    images (two 256x256 PNGs, b64_json) and speech (a WAV of one
#          sentence) at WORK_RATE, `loadgen --compare direct Tollgate --body`:
#          added latency p50/p99 for GPU work beyond chat; then a
#          transcription upload of UPLOAD_MIB MiB at UPLOAD_RATE: added
#          latency, and each upload's throughput (its size over p50);
#  jobs    job submission (`Prefer: respond-async`) at each of JOB_RATES,
#          against the same chat request answered live, alternating in
#          ROUNDS rounds: submit latency p50/p99 (a 202 once the job is in
#          Postgres) and whether every submission was accepted; the runner
#          runs the jobs meanwhile, as in production;
#  peak    closed-loop peak throughput with wrk (1 thread, 16 connections),
#          median of PEAK_RUNS runs: the method of the passthrough ceiling
#          quoted in the project brief.
# Prints Markdown for BENCHMARKS.md; raw loadgen JSON goes to target/bench/.
#
#   scripts/bench-overhead.sh
#   SECTIONS="ladder peak" DURATION=5 scripts/bench-overhead.sh

source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench-lib.sh"
provision
cd "$ROOT"
RATES="${RATES:-500 1000 2000}"
ROUNDS="${ROUNDS:-3}"
WORK_RATE="${WORK_RATE:-100}"
UPLOAD_MIB="${UPLOAD_MIB:-8}"
UPLOAD_RATE="${UPLOAD_RATE:-10}"
DURATION="${DURATION:-5}"
LADDER="${LADDER:-1000 2000 4000 6000 8000 10000 12000 14000 16000 20000}"
LADDER_RUNS="${LADDER_RUNS:-3}"
PEAK_RUNS="${PEAK_RUNS:-3}"
JOB_RATES="${JOB_RATES:-100 250 500 1000}"
SECTIONS="${SECTIONS:-fixed ladder work jobs peak}"

apt_install wrk
cargo build --release --locked --bins --example passthrough >&2
SIM_PORT=18301 PASS_PORT=18302 TG_PORT=18303
bench_sim $SIM_PORT
bench_background "$BIN/examples/passthrough" "127.0.0.1:$PASS_PORT" "127.0.0.1:$SIM_PORT" 1 2>/dev/null
bench_gateway $TG_PORT $SIM_PORT
bench_background "${TG_ENV[@]}" "${TG[@]}" serve 2>"$OUT/tollgate.log"
for port in $SIM_PORT $PASS_PORT $TG_PORT; do
    wait_listening 127.0.0.1 "$port" 30 || die "nothing listening on $port"
done

DIRECT="http://127.0.0.1:$SIM_PORT" PASS="http://127.0.0.1:$PASS_PORT" TOLLGATE="http://127.0.0.1:$TG_PORT"
# Warm up each target (connections, Tollgate's key cache).
for url in $DIRECT $PASS $TOLLGATE; do
    "$BIN/loadgen" --url "$url" --key "$KEY" --rate 200 --duration 1 >/dev/null
done

# field FILE EXPR : a value from a loadgen JSON report.
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }


if section fixed; then
echo "### Added latency at fixed rates"
echo
echo "Median of $ROUNDS alternating rounds of ${DURATION}s; latency in ms; added = target − direct."
echo
echo "| mode | rate | direct p50 / p99 | passthrough p50 / p99 | Tollgate p50 / p99 | passthrough adds p50 / p99 | Tollgate adds p50 / p99 |"
echo "|---|---|---|---|---|---|---|"
for mode in plain stream; do
    flags=()
    [ "$mode" = stream ] && flags=(--stream)
    for rate in $RATES; do
        for target in pass tollgate; do
            url=$PASS; [ $target = tollgate ] && url=$TOLLGATE
            "$BIN/loadgen" --compare "$DIRECT" "$url" --key "$KEY" --rate "$rate" \
                --duration "$DURATION" --rounds "$ROUNDS" "${flags[@]}" \
                --json "$OUT/compare-$mode-$rate-$target.json" >/dev/null
        done
        p=$OUT/compare-$mode-$rate-pass.json t=$OUT/compare-$mode-$rate-tollgate.json
        lat='"%.3f / %.3f" % (d["a"]["median"]["latency_ms"]["p50"], d["a"]["median"]["latency_ms"]["p99"])'
        latb='"%.3f / %.3f" % (d["b"]["median"]["latency_ms"]["p50"], d["b"]["median"]["latency_ms"]["p99"])'
        add='"%+.3f / %+.3f" % (d["added_latency_ms"]["p50"], d["added_latency_ms"]["p99"])'
        echo "| $mode | $rate | $(field "$t" "$lat") | $(field "$p" "$latb") | $(field "$t" "$latb") | $(field "$p" "$add") | $(field "$t" "$add") |"
    done
done
fi

if section work; then
echo
echo "### GPU work beyond chat: images, speech and transcription uploads"
echo
echo "loadgen --compare direct Tollgate --body: one request shape each, $WORK_RATE req/s, median of $ROUNDS alternating rounds of ${DURATION}s; latency in ms."
echo
echo "| request | direct p50 / p99 | Tollgate p50 / p99 | Tollgate adds p50 / p99 |"
echo "|---|---|---|---|"
printf '%s' '{"model":"sim-model","prompt":"a lighthouse at dusk","n":2,"size":"256x256","response_format":"b64_json"}' >"$OUT/images.json"
printf '%s' '{"model":"sim-model","voice":"alloy","input":"Welcome back. Your order has shipped and will arrive on Tuesday.","response_format":"wav"}' >"$OUT/speech.json"
for work in images:/v1/images/generations speech:/v1/audio/speech; do
    name=${work%%:*} path=${work#*:}
    "$BIN/loadgen" --compare "$DIRECT$path" "$TOLLGATE$path" --key "$KEY" --body "$OUT/$name.json" \
        --rate "$WORK_RATE" --duration "$DURATION" --rounds "$ROUNDS" \
        --json "$OUT/work-$name.json" >/dev/null
    w=$OUT/work-$name.json
    lat='"%.3f / %.3f" % (d["a"]["median"]["latency_ms"]["p50"], d["a"]["median"]["latency_ms"]["p99"])'
    latb='"%.3f / %.3f" % (d["b"]["median"]["latency_ms"]["p50"], d["b"]["median"]["latency_ms"]["p99"])'
    add='"%+.3f / %+.3f" % (d["added_latency_ms"]["p50"], d["added_latency_ms"]["p99"])'
    echo "| $name ($(wc -c <"$OUT/$name.json") B) | $(field "$w" "$lat") | $(field "$w" "$latb") | $(field "$w" "$add") |"
done
# A transcription upload: a form holding a silent WAV of UPLOAD_MIB MiB.
python3 - "$OUT/upload.form" "$UPLOAD_MIB" <<'PY'
import struct, sys
data = int(sys.argv[2]) * 1024 * 1024 - 44
wav = b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", data)
with open(sys.argv[1], "wb") as f:
    f.write(b'--XB\r\nContent-Disposition: form-data; name="model"\r\n\r\nsim-model\r\n')
    f.write(b'--XB\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + wav)
    f.write(bytes(data) + b"\r\n--XB--\r\n")
PY
path=/v1/audio/transcriptions
"$BIN/loadgen" --compare "$DIRECT$path" "$TOLLGATE$path" --key "$KEY" --body "$OUT/upload.form" \
    --content-type "multipart/form-data; boundary=XB" \
    --rate "$UPLOAD_RATE" --duration "$DURATION" --rounds "$ROUNDS" \
    --json "$OUT/work-upload.json" >/dev/null
w=$OUT/work-upload.json
echo "| transcription upload ($UPLOAD_MIB MiB, $UPLOAD_RATE/s) | $(field "$w" "$lat") | $(field "$w" "$latb") | $(field "$w" "$add") |"
echo
mib='"%.0f MiB/s direct, %.0f MiB/s through Tollgate (%.2f of direct)" % ('"$UPLOAD_MIB"' * 1000 / d["a"]["median"]["latency_ms"]["p50"], '"$UPLOAD_MIB"' * 1000 / d["b"]["median"]["latency_ms"]["p50"], d["a"]["median"]["latency_ms"]["p50"] / d["b"]["median"]["latency_ms"]["p50"])'
echo "Upload throughput (size over p50 latency): $(field "$w" "$mib")."
fi

# sustains URL RATE FLAGS... : true when most of LADDER_RUNS runs at RATE had
# no errors, no dropped requests and p99 < 10 ms.
sustains() {
    local url=$1 rate=$2; shift 2
    local passed=0
    for run in $(seq "$LADDER_RUNS"); do
        local json="$OUT/ladder-$(basename "$url")-$rate-$run.json"
        "$BIN/loadgen" --url "$url" --key "$KEY" --rate "$rate" --duration "$DURATION" "$@" \
            --json "$json" >/dev/null || true
        local ok
        ok=$(field "$json" 'int(d["report"]["requests"]["errors"] + d["report"]["requests"]["dropped"] == 0 and (d["report"]["latency_ms"] or {}).get("p99", 1e9) < 10)')
        passed=$((passed + ok))
    done
    [ $((passed * 2)) -gt "$LADDER_RUNS" ]
}

if section ladder; then
echo
echo "### Highest rate sustained with p99 < 10 ms"
echo
echo "Open loop. Ladder: $LADDER req/s, ${DURATION}s per run; a step passes when most of $LADDER_RUNS runs have p99 < 10 ms and no error or dropped request."
echo
echo "| mode | direct | passthrough | Tollgate | Tollgate / passthrough |"
echo "|---|---|---|---|---|"
for mode in plain stream; do
    flags=()
    [ "$mode" = stream ] && flags=(--stream)
    best=()
    for url in $DIRECT $PASS $TOLLGATE; do
        top=0
        for rate in $LADDER; do
            if sustains "$url" "$rate" "${flags[@]}"; then top=$rate; else break; fi
        done
        best+=("$top")
    done
    ratio=$(awk -v t="${best[2]}" -v p="${best[1]}" 'BEGIN {if (p > 0) printf "%.2f", t / p; else print "n/a"}')
    highest=${LADDER##* }
    shown=()
    for top in "${best[@]}"; do
        if [ "$top" = "$highest" ]; then shown+=("≥ $top"); else shown+=("$top"); fi
    done
    echo "| $mode | ${shown[0]} | ${shown[1]} | ${shown[2]} | $ratio |"
done
fi

# peak URL STREAM : median requests/s of PEAK_RUNS closed-loop wrk runs.
peak() {
    local rates=()
    for _ in $(seq "$PEAK_RUNS"); do
        rates+=("$(STREAM="$2" wrk -t1 -c16 -d"${DURATION}s" -H "Authorization: Bearer $KEY" \
            -s load-tests/wrk/chat.lua "$1/v1/chat/completions" | awk '/Requests\/sec/ {printf "%.0f", $2}')")
    done
    printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

if section jobs; then
echo
echo "### Job submission"
echo
echo "The same chat request (16 tokens) answered live and submitted as a job (\`Prefer: respond-async\`: 202 once the job is in Postgres), open loop, ${DURATION}s runs alternating live and job, median of $ROUNDS rounds; latency in ms. The runner runs the submitted jobs meanwhile."
echo
echo "| rate (req/s) | live p50 / p99 | submit p50 / p99 | submit / live p50 | jobs refused or dropped |"
echo "|---|---|---|---|---|"
printf '%s' '{"model":"sim-model","messages":[{"role":"user","content":"Summarise the meeting notes."}],"max_tokens":16}' >"$OUT/job.json"
for rate in $JOB_RATES; do
    for round in $(seq "$ROUNDS"); do
        "$BIN/loadgen" --url "$TOLLGATE/v1/chat/completions" --key "$KEY" --body "$OUT/job.json" \
            --rate "$rate" --duration "$DURATION" --json "$OUT/jobs-live-$rate-$round.json" >/dev/null
        "$BIN/loadgen" --url "$TOLLGATE/v1/chat/completions" --key "$KEY" --body "$OUT/job.json" \
            --header "Prefer: respond-async" \
            --rate "$rate" --duration "$DURATION" --json "$OUT/jobs-submit-$rate-$round.json" >/dev/null
    done
    python3 - "$OUT" "$rate" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rate, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def runs(kind):
    return [json.load(open(f"{out}/jobs-{kind}-{rate}-{r}.json"))["report"] for r in range(1, rounds + 1)]
def median(reports, p):
    return statistics.median(r["latency_ms"][p] for r in reports)
live, submit = runs("live"), runs("submit")
lost = sum(r["requests"]["errors"] + r["requests"]["dropped"] for r in submit)
print(f"| {rate} | {median(live, 'p50'):.3f} / {median(live, 'p99'):.3f} "
      f"| {median(submit, 'p50'):.3f} / {median(submit, 'p99'):.3f} "
      f"| {median(submit, 'p50') / median(live, 'p50'):.2f} | {lost} |")
PY
done
fi

if section peak; then
echo
echo "### Peak throughput, closed loop"
echo
echo "wrk, 1 thread, 16 keep-alive connections, ${DURATION}s per run, median of $PEAK_RUNS runs (req/s)."
echo
echo "| mode | direct | passthrough | Tollgate | Tollgate / passthrough | Tollgate / direct |"
echo "|---|---|---|---|---|---|"
for stream in 0 1; do
    mode=plain; [ $stream = 1 ] && mode=stream
    d=$(peak "$DIRECT" $stream) p=$(peak "$PASS" $stream) t=$(peak "$TOLLGATE" $stream)
    echo "| $mode | $d | $p | $t | $(awk -v a="$t" -v b="$p" 'BEGIN {printf "%.2f", a / b}') | $(awk -v a="$t" -v b="$d" 'BEGIN {printf "%.2f", a / b}') |"
done
fi
