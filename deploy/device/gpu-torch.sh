#!/usr/bin/env bash
# On the lent GPU machine, one call (issue 19): every pipeline (the four reference ones and the
# three torch ones) served together at low load ($R/torch-e2e.json, .md), then profiles of the
# torch pipelines' stages as stages run them (CUDA graphs on), then the bring-your-own-model
# example profiled as docs/MODELS.md says. The archive $OUT/res.tgz is rewritten after each step,
# so a call cut short still returns what finished; merge the profiles here with
# python -m scheduler.tools.profile_merge (CPU). STEP_S bounds each profile, E2E_S the e2e run.
set -u
source deploy/device/prelude.sh
export CAMELOT_CUDA_GRAPHS=${CAMELOT_CUDA_GRAPHS:-on}
step torch-e2e "${E2E_S:-200}" python3 -m loadgen.bench_served --backend cuda --size full \
  --per-pipeline-qps "${QPS:-5}" --duration-s "${DUR_S:-30}" --warmup-s 10 --out-dir "$R" \
  --name torch-e2e --run-dir /tmp/cam/served
tar czf "$OUT/logs.tgz" -C /tmp/cam served 2>/dev/null
[[ ${E2E_ONLY:-0} == 1 ]] && exit 0
for p in ${PIPES:-torch-video-analytics torch-captioning torch-speech-to-text}; do
  step "profile-$p" "${STEP_S:-60}" python3 -m services.profiler "services/pipelines/torch/$p.yaml" \
    --size full --shares "${SHARES:-30,100}" --batches "${BATCHES:-1,8}" --repeats 5 \
    --cuda-graphs on --out "$R/$p.json"
done
step byom 40 python3 -m services.cli profile examples/byom/my-classifier.yaml --size full \
  --shares 50,100 --batches 1,8 --out "$R/my-classifier.json"
