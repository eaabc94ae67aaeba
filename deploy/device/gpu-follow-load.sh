#!/usr/bin/env bash
# On the lent GPU machine: follow-load (#17), one sharing mode per call (each fits the call's
# limit): MODE=mps, then, with that result in docs/results, MODE=green, which merges it in.
# MIX picks the pipelines (default all four; on an H100 their peak is the host's and the
# trough plan carries it, docs/results/follow-load-h100.md; MIX="t2i:text-to-img=1" is a day the
# GPU share decides, docs/results/follow-load.md).
# The experiment starts its own mesh (one per mode); the result (follow-load.json, .md, PNGs)
# comes back in $OUT/res.tgz, the mesh's logs in $OUT/logs.tgz. Durations come from the
# environment: STEP_S (each level of the day), RUNGS (steps from trough to peak), TRIAL_S and
# TRIALS (the peak search), LIMIT_S (the experiment's own limit), POLICIES and BASELINES.
# The defaults hold each level 40 s, longer than the loop needs to answer a step under MPS
# (loadgen/experiments/day.py: 2 x the 5 s loop window + 5 s + the 3.4 s apply): a 6 s level (the
# first H100 run, docs/results/follow-load-h100-short.md) tested the triggers, not the day. Three
# days fit one call: min-resource and two baselines; max-load in a call and a result of its own
# (POLICIES=max-load BASELINES=even XARGS="--name follow-load-max-load").
set -u
source .devcarry/setup.sh
source deploy/device/reset.sh
OUT=${OUT:-/tmp/out}
MODE=${MODE:-mps}
MIX=${MIX:-all4:img-to-text=1,speech-to-text=1,text-to-img=1,video-analytics=1}
R=/tmp/res; rm -rf "$R" /tmp/fl; mkdir -p "$R" "$OUT"
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
mps_start
export CAMELOT_MPS=external CAMELOT_MPS_PIPE_DIR=$CUDA_MPS_PIPE_DIRECTORY
export CAMELOT_CUDA_GRAPHS=${CAMELOT_CUDA_GRAPHS:-on}
merge=()
[[ -f docs/results/follow-load.json ]] && merge=(--merge docs/results/follow-load.json)
s=$SECONDS
timeout "${LIMIT_S:-540}" python3 -m loadgen.experiments follow-load --backend cuda --size full \
  --modes "$MODE" --mix "$MIX" --gateway-workers 3 --client-processes 4 --settle-s 120 \
  --start-qps "${START:-60}" --max-trials "${TRIALS:-5}" --trial-s "${TRIAL_S:-5}" --rel-tol 0.15 \
  --warmup-s 1 --gap-s 0.5 --prime-s 2 --rungs "${RUNGS:-1}" --step-s "${STEP_S:-40}" --window-s "${WINDOW_S:-5}" \
  --loop-window-s "${LOOP_WINDOW_S:-5}" --policies "${POLICIES:-min-resource}" \
  --baselines "${BASELINES:-even,exclusive}" --out-dir "$R" --run-dir /tmp/fl "${merge[@]}" ${XARGS:-} \
  > "$R/follow-load.log" 2>&1
echo "rc=$? follow-load $MODE $((SECONDS - s))s" | tee "$R/steps.txt"
tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null
tar czf "$OUT/logs.tgz" -C /tmp fl 2>/dev/null
source deploy/device/reset.sh
grep -E "peak|load changes|in force|ERROR" "$R/follow-load.log" | tail -30
python3 -c "import json; d = json.load(open('$R/follow-load.json')); print(json.dumps(d['summary'], indent=1))"
