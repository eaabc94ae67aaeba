#!/usr/bin/env bash
# On the lent GPU machine: gpu tests, the transport and green-context benchmarks, and the local
# mesh at full size. Results land in $OUT. Run from the repo root after `source .devcarry/setup.sh`.
set -u
source .devcarry/setup.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
nvidia-smi -L | tee "$OUT/device.txt"
mps_start
step() { local name=$1 t=$2; shift 2; echo "== $name"; local s=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - s))s" | tee -a "$OUT/steps.txt"; }
step gpu-tests 220 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="" --timeout 200 -rA
step transport 100 python3 -m shmbroker.bench --out "$OUT/transport.json" --repeats 10
step green-probe 120 python3 -m services.green.bench --out "$OUT/green-probe.json"
step run-full 120 python3 -m services.cli run --backend cuda --size full --queries 64 --run-dir /tmp/cam
cp -r /tmp/cam/logs "$OUT/run-logs" 2>/dev/null
mps_stop
tail -n 25 "$OUT/gpu-tests.log"; cat "$OUT/steps.txt"; tail -n 8 "$OUT/run-full.log"
