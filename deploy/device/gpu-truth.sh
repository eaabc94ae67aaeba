#!/usr/bin/env bash
# On the lent GPU machine, one call (issue 22 item 1 and item 3): profiles of the four reference
# pipelines' stages as replicas run them (CUDA graphs on) on this device, then the `limit`
# reference (loadgen.limit) for the four together. The archive $OUT/res.tgz is rewritten after
# each step, so a call cut short still returns what finished; merge the profiles here with
#   python -m scheduler.tools.profile_merge merge res/*.json --note "..."
# which writes scheduler/perfmodel/profiles_data/<device>.json.
# PIPES: which pipelines to profile (default the four); SHARES, BATCHES, REPEATS: the grid
# (PIPES= none; default the coarse one of dfb31d9: 10,30,50,100 x 1,8,32, 8 repeats, ~110 s a pipeline on
# the H100); STEP_S bounds each profile. LIMIT=0 skips the limit, LIMIT_S bounds it; FAULTS=1
# runs the GPU-fault benchmark (FAULTS_S bounds each mode's run); TESTS=1 runs the GPU tests after (TESTS_S
# bounds them); REFBENCH=1 the exclusive mesh's rate ladder (REFBENCH_S, REFBENCH_RATES);
# FRONTBENCH=1 the gateway and broker inside MPS against outside it (FRONT_S, FRONT_RATES). The
# fault run alone:  PIPES= LIMIT=0 FAULTS=1 bash deploy/device/gpu-truth.sh
set -u
source deploy/device/prelude.sh
export CAMELOT_CUDA_GRAPHS=${CAMELOT_CUDA_GRAPHS:-on}
# TRANSPORT=1: the transport bench first, host hops apart (issue 23's re-measure on this device)
[[ ${TRANSPORT:-0} == 1 ]] && step transport 100 python3 -m shmbroker.bench \
  --out "$R/transport.json" --repeats 10 --host-hops apart
# REFBENCH=1: the four full reference pipelines under exclusive through the mesh at rising rates
# (host-path-reference.md's command), whose rows now say per stage how large the batches grew;
# REFBENCH_PROFILE=RATE (one of the rates) samples the busiest processes' stacks at that rate
# (with REFBENCH_DUR_S=6: a 4 s trial leaves 1 s of samples after its warm-up and the search)
[[ ${REFBENCH:-0} == 1 ]] && step host-path-reference "${REFBENCH_S:-200}" python3 -m \
  loadgen.bench_host --reference --backend cuda --duration-s "${REFBENCH_DUR_S:-4}" --client-processes 4 \
  --gateway-workers 8 --connections 64 --rates "${REFBENCH_RATES:-300,450,600,800}" \
  --stage-calls forward --out-dir "$R" --name host-path-reference --run-dir /tmp/cam/hpr \
  ${REFBENCH_PROFILE:+--profile-at "$REFBENCH_PROFILE" --profile-s 2}
# FRONTBENCH=1: the gateway and the broker as clients of the MPS server (as compose and k8s run
# them) against in contexts of their own (a pipe directory with no daemon, as the fault benchmark
# runs them; the agent still hands the daemon's to the replicas), the four reference pipelines
# under even's MPS shares: what the gateway's copies cost when they take the GPU in turns
if [[ ${FRONTBENCH:-0} == 1 ]]; then
  mkdir -p /tmp/no-mps
  for where in mps own; do
    pipe=$CUDA_MPS_PIPE_DIRECTORY; [[ $where == own ]] && pipe=/tmp/no-mps
    step "front-$where" "${FRONT_S:-150}" env CUDA_MPS_PIPE_DIRECTORY="$pipe" python3 -m \
      loadgen.bench_host --reference --policy even --backend cuda --duration-s 4 \
      --client-processes 4 --gateway-workers 8 --connections 64 \
      --rates "${FRONT_RATES:-300,600,900}" --stage-calls forward --out-dir "$R" \
      --name "front-$where" --run-dir "/tmp/cam/front-$where"
  done
fi
# (a config path names a pipeline outside the bundled folder: services/pipelines/torch/*.yaml)
for p in ${PIPES-img-to-text video-analytics text-to-img speech-to-text}; do
  n=$(basename "$p" .yaml)
  step "profile-$n" "${STEP_S:-140}" python3 -m services.profiler "$p" --size full \
    --shares "${SHARES:-10,30,50,100}" --batches "${BATCHES:-1,8,32}" \
    --repeats "${REPEATS:-8}" --cuda-graphs on --out "$R/$n.json"
done
# MERGE=1: the profiles just measured go into this tree's set for the device (the bundled set given
# again keeps the stages measured before), so a later call on the still-warm machine that runs
# gpu-e.sh from this same tree (not extracted afresh) plans with them; the merged set comes back as
# $R/profiles-<slug>.json
if [[ ${MERGE:-0} == 1 ]]; then
  slug=$(python3 -c 'import sys; from scheduler.perfmodel.profilestore import device_slug; print(device_slug(sys.argv[1]))' "$(cut -d, -f1 "$R/device.txt")")
  outs=(); for p in ${PIPES-img-to-text video-analytics text-to-img speech-to-text}; do
    f="$R/$(basename "$p" .yaml).json"; [[ -f $f ]] && outs+=("$f"); done
  base=scheduler/perfmodel/profiles_data/$slug.json; [[ -f $base ]] || base=""
  (( ${#outs[@]} )) && step merge 60 python3 -m scheduler.tools.profile_merge merge $base "${outs[@]}" \
    --note "${MERGE_NOTE:-services.profiler on this device at ${CAMELOT_GIT_REV:-?} (gpu-truth.sh), shares ${SHARES:-10,30,50,100}, batches ${BATCHES:-1,8,32}, CUDA graphs on}"
  grep -q "^rc=0 merge" "$R/steps.txt" && cp "scheduler/perfmodel/profiles_data/$slug.json" "$R/profiles-$slug.json"
  tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null
fi
[[ ${LIMIT:-1} == 1 ]] && step limit-ref4 "${LIMIT_S:-150}" python3 -m loadgen.limit \
  --mix ref4:img-to-text=1,video-analytics=1,text-to-img=1,speech-to-text=1 --backend cuda \
  --size full --trial-s 4 --warmup-s 1 --start-qps "${LIMIT_START:-500}" --max-trials 8 \
  --out-dir "$R" --name limit-ref4
# FAULTS=1: a fatal GPU fault (a kernel writing through an invalid pointer) under load, under
# MPS then green contexts (issue 21 item 1) -> gpu-faults.json/.md; after the rest, since a
# fault under MPS takes the GPU's whole MPS server down until its clients have exited
# (FAULTS_SHARING: one result per mode, gpu-faults-<mode>.json, so a cut step keeps the first)
if [[ ${FAULTS:-0} == 1 ]]; then
  for mode in ${FAULTS_SHARING:-mps green green-mps}; do
    step "gpu-faults-$mode" "${FAULTS_S:-180}" python3 -m loadgen.gpu_faults --backend cuda \
      --sharing "$mode" --rate "${FAULTS_RATE:-100}" --duration-s "${FAULTS_DUR_S:-20}" \
      --out-dir "$R" --name "gpu-faults-$mode" --run-dir /tmp/cam-faults
    # the processes' logs (which replica saw what, when the agent restarted what) come back too
    [[ -d /tmp/cam-faults/$mode/logs ]] && cp -r "/tmp/cam-faults/$mode/logs" "$R/faults-$mode-logs"
    tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null
  done
fi
# TESTS=1: the GPU tests last (TESTS_ONLY: these files only)
[[ ${TESTS:-0} == 1 ]] && step gpu-tests "${TESTS_S:-300}" python3 -m pytest -q -m gpu \
  ${TESTS_ONLY:-tests/gpu} -p no:cacheprovider -o addopts="" --timeout 200 -rfE
exit 0
