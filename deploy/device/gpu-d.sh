#!/usr/bin/env bash
# On the lent GPU machine: gpu tests of the changed models, profiles of the two changed pipelines,
# and the end-to-end ref/wire benchmark at low load. Everything lands in $OUT/d.tgz.
set -u
source .devcarry/setup.sh
OUT=${OUT:-/tmp/out}
R=/tmp/res; rm -rf $R; mkdir -p "$R" "$OUT" /tmp/cam
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
mps_start
export CAMELOT_MPS=external CAMELOT_MPS_PIPE_DIR=$CUDA_MPS_PIPE_DIRECTORY
step() { local name=$1 t=$2; shift 2; echo "== $name"; local s=$SECONDS
  timeout "$t" "$@" > "$R/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - s))s" | tee -a "$R/steps.txt"; }
step gpu-tests 100 python3 -m pytest -m gpu tests/gpu/test_models_cuda.py tests/gpu/test_agent_cuda.py -q -p no:cacheprovider -o addopts="" --timeout 90 -rfE
for p in img-to-text video-analytics; do
  step "profile-$p" 125 python3 -m services.profiler $p --size full --shares 10,30,50,100 --batches 1,8,32 --repeats 8 --out "$R/$p.json"
done
CAMELOT_GATEWAY_PORT=50052 python3 -m services.cli run --backend cuda --size full --queries 16 --policy exclusive --serve --run-dir /tmp/cam > "$R/run-full.log" 2>&1 &
mesh=$!
for _ in $(seq 200); do grep -q "serving; Ctrl-C" "$R/run-full.log" && break; sleep 1; done
step e2e 130 python3 -m loadgen.bench_e2e --target 127.0.0.1:50052 --out-dir "$R" --rate 5 --duration 6 --rounds 2
kill -INT $mesh; wait $mesh
mps_stop
tar czf "$OUT/d.tgz" -C /tmp res cam/logs 2>/dev/null
grep -E "passed|failed" "$R/gpu-tests.log" | tail -2; cat "$R/steps.txt"
python3 -c "import json; print(json.load(open('$R/e2e.json'))['summary'])"
sed -n '/^pipeline/,/^$/p' "$R/run-full.log"
