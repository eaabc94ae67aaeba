#!/usr/bin/env bash
# On the lent GPU machine: gpu tests under MPS, the green-context probe, the reconfiguration
# benchmark (MPS shadow replacement against green resize) and the predictor's held-out accuracy.
# Everything lands in $OUT/c.tgz (the device tool returns only a few files).
set -u
source .devcarry/setup.sh
OUT=${OUT:-/tmp/out}
R=/tmp/res; rm -rf $R; mkdir -p "$R" "$OUT"
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
nvidia-smi -L > "$R/device.txt"
mps_start
export CAMELOT_MPS=external CAMELOT_MPS_PIPE_DIR=$CUDA_MPS_PIPE_DIRECTORY
step() { local name=$1 t=$2; shift 2; echo "== $name"; local s=$SECONDS
  timeout "$t" "$@" > "$R/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - s))s" | tee -a "$R/steps.txt"; }
step gpu-tests 140 python3 -m pytest -m gpu tests/gpu tests/test_bench_predictor.py -q -p no:cacheprovider -o addopts="" --timeout 120 -rfE
step green-probe 130 python3 -m services.green.bench --out "$R/green-probe.json" --repeats 2
step reconfigure 150 python3 -m loadgen.bench_reconfigure --backend cuda --size full --rate 60 --duration-s 24 --settle-s 4 --out "$R" --run-dir /tmp/rec
step predictor 200 python3 -m loadgen.bench_predictor --profiles scheduler/perfmodel/profiles_data/h100.json --out "$R" --window-s 2 --solo-repeats 10
mps_stop
tar czf "$OUT/c.tgz" -C /tmp res rec 2>/dev/null
grep -E "passed|failed" "$R/gpu-tests.log" | tail -2; cat "$R/steps.txt"
for f in green-probe reconfigure predictor; do python3 -c "import json,sys; print('$f', json.load(open('$R/$f.json'))['summary'])" 2>&1 | tail -1; done
