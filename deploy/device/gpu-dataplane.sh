#!/usr/bin/env bash
# On the lent GPU machine, one call (issue 23): the null 3-stage chain with REPLICAS replicas per
# stage and GW gateway workers (host-path.json), then, as time allows, the transport bench
# (transport.json) and ref against wire end to end at low load (e2e.json). The archive
# $OUT/res.tgz is rewritten after each step, so a call cut short returns what finished.
set -u
source deploy/device/prelude.sh
step host-path "${HP_S:-240}" python3 -m loadgen.bench_host --pipelines "${PIPES:-null3}" \
  --backend cuda --duration-s 4 --client-processes "${CLIENTS:-4}" --gateway-workers "${GW:-10}" \
  --option "replicas=${REPLICAS:-3}" --rates "${RATES:-2000,3000,4000,5000}" --out-dir "$R" \
  --name host-path --run-dir /tmp/cam/hp
[[ ${ONLY_HP:-0} == 1 ]] && exit 0
step transport 90 python3 -m shmbroker.bench --out "$R/transport.json" --repeats 10
export CAMELOT_CUDA_GRAPHS=on
step e2e 200 python3 -m loadgen.bench_e2e --launch --backend cuda --size full --rate 5 \
  --duration 6 --rounds 2 --out-dir "$R"
