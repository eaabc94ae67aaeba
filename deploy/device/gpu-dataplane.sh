#!/usr/bin/env bash
# On the lent GPU machine, one call (issue 23): the null 3-stage chain under each CONFIGS entry
# (host-path.json; MODES="stream forward" measures both stage-call modes), then, as time allows,
# the transport bench (transport.json) and, unless E2E=0, ref against wire end to end at low load
# (e2e.json) and, with TESTS=1, the GPU tests. The archive $OUT/res.tgz is rewritten after each
# step, so a call cut short returns what finished.
set -u
source deploy/device/prelude.sh
# MODES: the gateway's --stage-calls to measure; CONFIGS: "replicas:gateway-workers:connections"
# triples (default: REPLICAS, GW, CONNS), replicas "3" or "2,a=3" (stage a 3, the others 2).
# Each run is its own file (host-path-<mode>-r<R>g<G>c<C>.json) but the first, host-path.json
first=1
for mode in ${MODES-stream}; do  # MODES= (empty): none
  for config in ${CONFIGS:-${REPLICAS:-3}:${GW:-10}:${CONNS:-128}}; do
    IFS=: read -r reps gw conns <<<"$config"
    opts=(); IFS=, read -ra parts <<<"$reps"
    for part in "${parts[@]}"; do
      if [[ $part == *=* ]]; then opts+=(--option "replicas.$part"); else opts+=(--option "replicas=$part"); fi
    done
    reps=${reps//,/_}; reps=${reps//=/}
    name=host-path; [[ $first == 1 ]] || name=host-path-$mode-r${reps}g${gw}c${conns}; first=0
    step "$name" "${HP_S:-240}" python3 -m loadgen.bench_host --pipelines "${PIPES:-null3}" \
      --backend cuda --duration-s 4 --client-processes "${CLIENTS:-4}" --gateway-workers "$gw" \
      --connections "$conns" "${opts[@]}" --rates "${RATES:-2000,3000,4000,5000}" \
      --out-dir "$R" --stage-calls "$mode" --name "$name" --run-dir "/tmp/cam/$name"
  done
done
# REF_RATES: the four full reference pipelines under exclusive at these rates, where the slow
# queries' time went at the mesh's peak (host-path-reference.json)
if [[ -n ${REF_RATES:-} ]]; then
  step host-path-reference "${REF_S:-240}" python3 -m loadgen.bench_host --reference \
    --backend cuda --duration-s 4 --client-processes "${CLIENTS:-4}" \
    --gateway-workers "${REF_GW:-8}" --connections "${REF_CONNS:-64}" --rates "$REF_RATES" \
    --stage-calls "${REF_MODE:-forward}" --out-dir "$R" --name host-path-reference \
    --run-dir /tmp/cam/host-path-reference
fi
[[ ${ONLY_HP:-0} == 1 ]] && exit 0
# the ref hops measured apart from the host hops (transport.json) and interleaved with them, as
# before 2026-12-07 (transport-interleaved.json): a ref hop right after a large host hop through
# the same two processes pays for it (docs/results/transport-h100.md)
step transport 90 python3 -m shmbroker.bench --out "$R/transport.json" --repeats 10 \
  --host-hops apart
step transport-interleaved 90 python3 -m shmbroker.bench \
  --out "$R/transport-interleaved.json" --repeats 10 --host-hops interleaved
if [[ ${E2E:-1} == 1 ]]; then
  CAMELOT_CUDA_GRAPHS=on step e2e 200 python3 -m loadgen.bench_e2e --launch --backend cuda \
    --size full --rate 5 --duration 6 --rounds "${E2E_ROUNDS:-2}" --out-dir "$R"
fi
# TESTS=1: the GPU tests last (tests/gpu; the torch ones need the torch extra's wheels)
[[ ${TESTS:-0} == 1 ]] && step gpu-tests "${TESTS_S:-300}" python3 -m pytest -q -m gpu tests/gpu \
  -p no:cacheprovider -o addopts="" --timeout 200 -rfE
exit 0
