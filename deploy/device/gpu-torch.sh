#!/usr/bin/env bash
# On the lent GPU machine, one call (issue 19): every pipeline (the four reference ones and the
# three torch ones) served together at low load ($R/torch-e2e.json, .md), then profiles of the
# torch pipelines' stages as stages run them (CUDA graphs on), then the bring-your-own-model
# example profiled as docs/MODELS.md says. The archive $OUT/res.tgz is rewritten after each step,
# so a call cut short still returns what finished; merge the profiles here with
# python -m scheduler.tools.profile_merge (CPU). STEP_S bounds each profile, E2E_S the e2e run.
# A torch pipeline's profile takes ~200 s or more (every share and co-runner level is a process
# that builds the model and captures its graphs; on the H100 none of the three finished in 165 s),
# so the whole set takes two calls:
#   call 1:  PIPES="torch-video-analytics torch-speech-to-text" bash deploy/device/gpu-torch.sh
#   call 2:  E2E=0 PIPES=torch-captioning BYOM=1 TESTS=1 bash deploy/device/gpu-torch.sh
# TESTS=1 runs the torch GPU tests last (stage against module, graphs on and off, every torch
# pipeline through the mesh on both transports, the BYOM example): tests/gpu/test_torchmodels_cuda.py.
# The profiler writes its file after every stage, so a step cut short keeps what it finished.
# Shares 50,100: the contention levels run in the 50% child (two model builds per stage, not
# three), and the co-runners are started once per run.
set -u
source deploy/device/prelude.sh
export CAMELOT_CUDA_GRAPHS=${CAMELOT_CUDA_GRAPHS:-on}
[[ ${E2E:-1} == 1 ]] && step torch-e2e "${E2E_S:-150}" python3 -m loadgen.bench_served --backend cuda --size full \
  --per-pipeline-qps "${QPS:-5}" --duration-s "${DUR_S:-30}" --warmup-s 10 --out-dir "$R" \
  --name torch-e2e --run-dir /tmp/cam/served
tar czf "$OUT/logs.tgz" -C /tmp/cam served 2>/dev/null
[[ ${E2E_ONLY:-0} == 1 ]] && exit 0
# a PIPES entry "pipeline:stage,stage" profiles only those stages (into <pipeline>-rest.json)
for entry in ${PIPES:-torch-video-analytics torch-captioning torch-speech-to-text}; do
  p=${entry%%:*}; stages=""; out=$p
  [[ $entry == *:* ]] && { stages=${entry#*:}; out=$p-rest; }
  step "profile-$out" "${STEP_S:-200}" python3 -m services.profiler "services/pipelines/torch/$p.yaml" \
    --size full --shares "${SHARES:-50,100}" --batches "${BATCHES:-1,8}" --repeats 5 \
    --cuda-graphs on --stages "$stages" --out "$R/$out.json"
done
[[ ${BYOM:-0} == 1 ]] && step byom "${BYOM_S:-150}" python3 -m services.cli profile examples/byom/my-classifier.yaml --size full \
  --shares 50,100 --batches 1,8 --out "$R/my-classifier.json"
[[ ${TESTS:-0} == 1 ]] && step gpu-tests "${TESTS_S:-240}" python3 -m pytest -q -m gpu \
  tests/gpu/test_torchmodels_cuda.py ${TESTS_EXTRA:-} -p no:cacheprovider
exit 0
