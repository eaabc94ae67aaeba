#!/usr/bin/env bash
# On the lent GPU machine: the headline experiments for one pipeline mix. MIX is "label:p1=w1,p2=w2";
# EXP is the experiments to run ("peak-load low-load"). REFS: peak-load's references (issue 22:
# "plain,limit"), LOW_REFS low-load's (limit is peak-load only). Results come back in $OUT/res.tgz
# (a call cut short still returns what finished); the processes' logs land in $OUT/logs.tgz.
# CLIENTS, CONNS: the load generator's processes (4: one falls behind at a few hundred qps) and
# connections (64: the gateway's workers are dealt connections by the kernel's hash, and 8 over 8
# workers give some two or three and others none). DEADLINE_S is the call's own limit, less a margin:
# an experiment is cut to what is left of it.
set -u
source .devcarry/setup.sh
source deploy/device/reset.sh
OUT=${OUT:-/tmp/out}
MIX=${MIX:-va+t2i:video-analytics=1,text-to-img=1}
EXP=${EXP:-peak-load low-load}
R=/tmp/res; rm -rf "$R"; mkdir -p "$R" "$OUT"
# a call returns at most a few files: results and logs come back as two archives, rewritten as
# they grow
keep() { tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null; }
python3 -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto
mps_start
export CAMELOT_MPS=external CAMELOT_MPS_PIPE_DIR=$CUDA_MPS_PIPE_DIRECTORY
pipes=$(echo "${MIX#*:}" | tr ',' '\n' | cut -d= -f1 | sed 's/^/--pipeline /' | tr '\n' ' ')
# FROM: folders of configs to serve (the torch mixes: "services/pipelines services/pipelines/torch")
froms=""; for f in ${FROM:-}; do froms+=" --from $f"; done
CAMELOT_GATEWAY_PORT=50052 python3 -m services.cli run --backend cuda --size full --queries 8 --policy even $pipes $froms --serve --run-dir /tmp/cam > "$R/mesh.log" 2>&1 &
mesh=$!
# the processes' logs come back even from a call cut short: copied every 15 s while the mesh starts
# (one archive: a call returns a limited number of files, and a replica's every restart has a log)
snap() { nvidia-smi > /tmp/cam/logs/nvidia-smi.txt 2>&1; tar czf "$OUT/logs.tgz" -C /tmp/cam logs 2>/dev/null; }
up=0
for i in $(seq ${MESH_WAIT_S:-300}); do
  grep -q "serving; Ctrl-C" "$R/mesh.log" && { up=1; break; }
  kill -0 $mesh 2>/dev/null || break
  (( i % 15 == 0 )) && snap
  sleep 1
done
snap; keep
if (( ! up )); then
  echo "mesh not up after ${SECONDS}s" | tee -a "$R/steps.txt"
  source deploy/device/reset.sh
  exit 1
fi
echo "mesh up after ${SECONDS}s" | tee -a "$R/steps.txt"
SCHED=$(python3 -c 'import json; print(json.load(open("/tmp/cam/mesh.json"))["scheduler"])')  # the mesh's record
TOKEN=$(cat /tmp/cam/admin.token)
for e in $EXP; do
  case $e in
    peak-load) args="${REFS:+--references $REFS} --policies ${POLICIES:-max-load,even,exclusive,feedback} --trial-s ${TRIAL_S:-6} --max-trials ${TRIALS:-6} --start-qps ${START:-20} --rel-tol 0.1" ;;
    low-load) args="${LOW_REFS:+--references $LOW_REFS} --policies ${LOW_POLICIES:-min-resource,even,exclusive,feedback} --rate ${RATE:-10} --trial-s ${LOW_TRIAL_S:-15}" ;;
    diurnal) args="--policy min-resource --min-qps ${DMIN:-4} --max-qps ${DMAX:-40} --duration-s ${DUR:-150} --window-s 10" ;;
  esac
  echo "== $e"; s=$SECONDS
  left=$(( ${DEADLINE_S:-560} - SECONDS - 25 ))  # what the call has left, less the teardown
  (( left < 60 )) && { echo "skipped $e: ${left}s left" | tee -a "$R/steps.txt"; continue; }
  # SHM=1: the clients are on the node and send their inputs as refs into the mesh's broker
  # (`--shm mesh`, the record in /tmp/cam); plain still sends bytes
  CAMELOT_RUN_DIR=/tmp/cam timeout $(( left < ${EXP_TIMEOUT:-420} ? left : ${EXP_TIMEOUT:-420} )) python3 -m loadgen.experiments $e --target 127.0.0.1:50052 --admin "$SCHED" --token "$TOKEN" \
    --mix "$MIX" --settle-s 120 --backend cuda --out-dir "$R" $args ${SHM:+--shm mesh} \
    --client-processes "${CLIENTS:-4}" --connections "${CONNS:-64}" ${XARGS:-} > "$R/$e.log" 2>&1
  echo "rc=$? $e $((SECONDS - s))s" | tee -a "$R/steps.txt"
  keep
done
python3 -m scheduler.ctl --target "$SCHED" --token-file /tmp/cam/admin.token status > "$R/status.txt" 2>&1
# the stages' host part of a batch against their profiles, from the run's own rows (CPU, seconds):
# what the plans were priced with (`held_out_mape_as_priced`) and what the stages measured
[ -f "$R/peak-load.json" ] && python3 -m scheduler.tools.stage_host_fit "$R/peak-load.json" \
  --out "$R/stage-host-fit" > "$R/stage-host-fit.log" 2>&1
# a gateway worker that exited (and how often) served nothing meanwhile: every policy then ran on
# fewer workers than asked (at 9b918cc four of eight could not start: the broker's cap)
echo "gateway worker exits: $(grep -c '"msg": "gateway worker [0-9]* (pid [0-9]*) exited' /tmp/cam/logs/gateway.log)" | tee -a "$R/steps.txt"
kill -INT $mesh
for _ in $(seq 20); do kill -0 $mesh 2>/dev/null || break; sleep 1; done
snap; keep
source deploy/device/reset.sh  # whatever did not stop within 20 s
# every result written (XARGS may rename one with --name), then each experiment's trial log
cat "$R/steps.txt"; for f in "$R"/*.json; do python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(d['name'], d['summary'])" "$f" 2>&1 | tail -1; done
for e in $EXP; do grep -E "qps: p99|in force" "$R/$e.log" | tail -40; done
