#!/usr/bin/env bash
# On the lent GPU machine: CUDA graphs. In two calls (each fits the 600 s limit):
#   PART=tests: the graph GPU tests and the model GPU tests, and eager against graph replay for
#               every stage (graphs.json);
#   PART=e2e:   the whole mesh with graphs on, and the end-to-end ref/wire benchmark (e2e.json).
# Results go straight to $OUT (a run cut short still returns what finished).
set -u
source .devcarry/setup.sh
source deploy/device/reset.sh
OUT=${OUT:-/tmp/out}
PART=${PART:-tests}
mkdir -p "$OUT" /tmp/cam
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
mps_start
export CAMELOT_MPS=external CAMELOT_MPS_PIPE_DIR=$CUDA_MPS_PIPE_DIRECTORY CAMELOT_CUDA_GRAPHS=on
step() { local name=$1 t=$2; shift 2; echo "== $name"; local s=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - s))s" | tee -a "$OUT/steps.txt"; }
case $PART in
  tests)
    step gpu-tests 330 python3 -m pytest -m gpu tests/gpu/test_graphs_cuda.py tests/gpu/test_models_cuda.py tests/gpu/test_e2e_cuda.py \
      -q -p no:cacheprovider -o addopts="" --timeout 240 -rfE
    step graphs 240 python3 -m services.models.bench --out "$OUT" --batches 1,8,32 --repeats 10 \
      --pipelines img-to-text,text-to-img,speech-to-text,video-analytics
    tail -n 5 "$OUT/gpu-tests.log"
    ;;
  e2e)
    CAMELOT_GATEWAY_PORT=50052 python3 -m services.cli run --backend cuda --size full --queries 8 \
      --policy exclusive --serve --run-dir /tmp/cam > "$OUT/mesh.log" 2>&1 &
    mesh=$!
    for _ in $(seq 240); do grep -q "serving; Ctrl-C" "$OUT/mesh.log" && break; sleep 1; done
    step e2e 200 python3 -m loadgen.bench_e2e --target 127.0.0.1:50052 --out-dir "$OUT" --rate 5 --duration 6 --rounds 2
    kill -INT $mesh; wait $mesh
    grep -h "graph" /tmp/cam/logs/*.log 2>/dev/null | sort | uniq -c | sort -rn | head -20 > "$OUT/graph-lines.txt"
    python3 -c "import json; print(json.load(open('$OUT/e2e.json'))['summary'])"
    ;;
esac
mps_stop
cat "$OUT/steps.txt"
