#!/usr/bin/env bash
# On the lent GPU machine: gpu tests under MPS, the green-context probe, the whole mesh at full
# size, the end-to-end ref/wire benchmark and the reconfiguration benchmark. Results in $OUT.
set -u
source .devcarry/setup.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/cam
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
nvidia-smi -L > "$OUT/device.txt"
mps_start
export CAMELOT_MPS=external CAMELOT_MPS_PIPE_DIR=$CUDA_MPS_PIPE_DIRECTORY
step() { local name=$1 t=$2; shift 2; echo "== $name"; local s=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - s))s" | tee -a "$OUT/steps.txt"; }
step gpu-tests 150 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="" --timeout 120 -rfE
step green-probe 100 python3 -m services.green.bench --out "$OUT/green-probe.json"
# the whole mesh in the background, then ref against wire through its gateway
CAMELOT_GATEWAY_PORT=50052 python3 -m services.cli run --backend cuda --size full --queries 64 --serve --run-dir /tmp/cam > "$OUT/run-full.log" 2>&1 &
mesh=$!
for _ in $(seq 240); do grep -q "serving; Ctrl-C" "$OUT/run-full.log" && break; sleep 1; done
step e2e 150 python3 -m loadgen.bench_e2e --target 127.0.0.1:50052 --out-dir "$OUT" --rate 20 --duration 6 --rounds 2
kill -INT $mesh; wait $mesh
step reconfigure 170 python3 -m loadgen.bench_reconfigure --backend cuda --size full --rate 60 --duration-s 24 --settle-s 4 --out "$OUT" --run-dir /tmp/rec
tar czf "$OUT/logs.tgz" -C /tmp cam/logs rec 2>/dev/null
mps_stop
grep -E "passed|failed" "$OUT/gpu-tests.log" | tail -3; cat "$OUT/steps.txt"; sed -n '/pipeline/,$p' "$OUT/run-full.log" | head -60
