#!/bin/bash
# Two tokenrelay daemons side by side on one core, each under its own paced load, for a CPU-per-event A/B that
# the machine's noise cannot tilt (both see the same slow spells). Usage, from the repository root:
#
#   benches/pair.sh [ROUNDS]            # A: TOKENRELAY_DATA_PLANE=0 (in-loop pump), B: the data plane
#   A_ENV="X=1" B_ENV="X=2" benches/pair.sh 4
#   A_PY=/tmp/base/.venv/bin/python benches/pair.sh   # A: another build (e.g. a `git worktree` of an older commit)
#
# Each round: fastmock on core 0; both daemons on core 1; one loadgen each on core 0 with STREAMS (256) paced
# streams of 500 deltas at 20 ms; CPU of each daemon (all its threads, /proc/PID/task/*/schedstat) over the same
# 5 s of steady load, divided by the events of those 5 s. Needs the rig (cargo build --release in benches/rig).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}
STREAMS=${STREAMS:-256}
A_ENV=${A_ENV:-TOKENRELAY_DATA_PLANE=0}
B_ENV=${B_ENV:-TOKENRELAY_DATA_PLANE=1}
A_PY=${A_PY:-.venv/bin/python}
B_PY=${B_PY:-.venv/bin/python}
R=benches/rig/target/release
W=$(mktemp -d)
BODY='{"model":"bench","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"say something"}]}'
MOCK_PORT=23201
cat > "$W/bench.toml" <<TOML
log_level = "warning"
[routes.bench]
[[routes.bench.deployments]]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
model = "mock-gpt"
TOML

cpu_ns() { local t=0 a; for f in /proc/"$1"/task/*/schedstat; do read -r a _ < "$f"; t=$((t + a)); done; echo $t; }

for round in $(seq "$ROUNDS"); do
    taskset -c 0 $R/fastmock --port $MOCK_PORT > "$W/mock.log" 2>&1 & MOCK=$!
    env $A_ENV taskset -c 1 "$A_PY" -m tokenrelay serve --listen 127.0.0.1:23210 --config "$W/bench.toml" \
        --db "$W/a.sqlite" --log-level warning > "$W/a.log" 2>&1 & A=$!
    env $B_ENV taskset -c 1 "$B_PY" -m tokenrelay serve --listen 127.0.0.1:23211 --config "$W/bench.toml" \
        --db "$W/b.sqlite" --log-level warning > "$W/b.log" 2>&1 & B=$!
    sleep 3
    curl -s -XPOST http://127.0.0.1:$MOCK_PORT/_control -d '{"tokens":500,"delay_ms":20,"first_token_ms":0}' > /dev/null
    LOADS=()
    for side in a:23210 b:23211; do
        taskset -c 0 $R/loadgen --port "${side#*:}" --body "$BODY" --streams "$STREAMS" --ramp-ms 1300 --pace-ms 20 \
            --requests 1 --cut-s 60 --out "$W/${side%%:*}.json" > "$W/l${side%%:*}.log" 2>&1 &
        LOADS+=($!)
    done
    sleep 3  # past the ramp: every stream open
    a0=$(cpu_ns $A); b0=$(cpu_ns $B)
    sleep 5
    a1=$(cpu_ns $A); b1=$(cpu_ns $B)
    wait "${LOADS[@]}"
    python3 - "$W" "$STREAMS" "$round" $((a1 - a0)) $((b1 - b0)) <<'PY'
import json, sys
w, streams, rnd, a_ns, b_ns = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
events = streams * 50 * 5  # one event per 20 ms per stream over the 5 s measured
for side, ns in (("A", a_ns), ("B", b_ns)):
    r = json.load(open(f"{w}/{side.lower()}.json"))
    print(f"round {rnd} {side}: {ns / 1000 / events:.2f} us/event  errors {r['errors']}  ok {r['ok']}/{r['answers']}"
          f"  ttft p50 {r['ttft_ms']['p50']:.2f} ms  gap p99 {r['gap_ms']['p99']:.2f} ms")
PY
    kill $A $B $MOCK 2> /dev/null; wait 2> /dev/null || true
done
rm -rf "$W"
