#!/usr/bin/env bash
# On the lent GPU machine, one call (issue 23): the null 3-stage chain with REPLICAS replicas per
# stage and GW gateway workers (host-path.json), then, as time allows, the transport bench
# (transport.json) and ref against wire end to end at low load (e2e.json). The archive
# $OUT/res.tgz is rewritten after each step, so a call cut short returns what finished.
set -u
source .devcarry/setup.sh
source deploy/device/reset.sh
OUT=${OUT:-/tmp/out}
R=/tmp/res; rm -rf "$R"; mkdir -p "$R" "$OUT"
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$R/device.txt"
mps_start
export CAMELOT_MPS=external CAMELOT_MPS_PIPE_DIR=$CUDA_MPS_PIPE_DIRECTORY
step() { local name=$1 t=$2; shift 2; echo "== $name"; local s=$SECONDS
  timeout "$t" "$@" > "$R/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - s))s" | tee -a "$R/steps.txt"
  tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null; }
step host-path "${HP_S:-240}" python3 -m loadgen.bench_host --pipelines "${PIPES:-null3}" \
  --backend cuda --duration-s 4 --client-processes "${CLIENTS:-4}" --gateway-workers "${GW:-10}" \
  --option "replicas=${REPLICAS:-3}" --rates "${RATES:-2000,3000,4000,5000}" --out-dir "$R" \
  --name host-path --run-dir /tmp/cam/hp
[[ ${ONLY_HP:-0} == 1 ]] && exit 0
step transport 90 python3 -m shmbroker.bench --out "$R/transport.json" --repeats 10
export CAMELOT_CUDA_GRAPHS=on
step e2e 200 python3 -m loadgen.bench_e2e --launch --backend cuda --size full --rate 5 \
  --duration 6 --rounds 2 --out-dir "$R"
