#!/usr/bin/env bash
# On the lent GPU machine, in two calls (each fits the 600 s limit):
#   PART=profile: profiles of PIPES (default all four) as stages run them (non-blocking stream,
#                 CUDA graphs on for graph-safe models) ($OUT/g-profile.tgz); merge them here with
#                 python -m scheduler.tools.profile_merge merge <outputs> --note "..." (CPU);
#   PART=training: the co-locations the contention calibration is fitted on ($OUT/g-training.tgz);
#                 fit here with python -m loadgen.contention_fit (CPU), commit, then
#   PART=predictor: the predictor's held-out accuracy against the profiles in the tree (commit the
#                 merged set first) with graphs on ($OUT/g-predictor.tgz).
set -u
source .devcarry/setup.sh
source deploy/device/reset.sh
OUT=${OUT:-/tmp/out}
PART=${PART:-profile}
R=/tmp/res; rm -rf $R; mkdir -p "$R" "$OUT"
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
mps_start
step() { local name=$1 t=$2; shift 2; echo "== $name"; local s=$SECONDS
  timeout "$t" "$@" > "$R/$name.log" 2>&1; echo "rc=$? ${name} $((SECONDS - s))s" | tee -a "$R/steps.txt"; }
case $PART in
  profile)
    # PIPES entries are "pipeline" or "pipeline:stage,stage"; the archive is rewritten after
    # each one, so a call cut short still returns the pipelines that finished
    for p in ${PIPES:-img-to-text video-analytics speech-to-text text-to-img}; do
      name=${p%%:*}; only=""; [[ $p == *:* ]] && only="--stages ${p#*:}"
      step "profile-$name" ${STEP_S:-140} python3 -m services.profiler $name $only --size full \
        --shares ${SHARES:-10,30,50,100} --batches ${BATCHES:-1,8,32} --repeats 12 \
        --cuda-graphs on --out "$R/$name.json"
      tar czf "$OUT/g-$PART.tgz" -C /tmp res 2>/dev/null
    done
    ;;
  predictor)
    step predictor 520 python3 -m loadgen.bench_predictor --profiles scheduler/perfmodel/profiles_data/h100.json \
      --out "$R" --window-s 2 --solo-repeats 15 --cuda-graphs on
    ;;
  training)
    step training 520 python3 -m loadgen.bench_predictor --profiles scheduler/perfmodel/profiles_data/h100.json \
      --out "$R" --window-s 2 --solo-repeats 15 --cuda-graphs on --set training
    ;;
esac
mps_stop
tar czf "$OUT/g-$PART.tgz" -C /tmp res 2>/dev/null
cat "$R/steps.txt"
python3 -c "import json; print(json.load(open('$R/predictor.json'))['summary'])" 2>/dev/null
python3 -c "import json; print(json.load(open('$R/predictor-training.json'))['summary'])" 2>/dev/null
