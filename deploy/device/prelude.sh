# Sourced first by gpu-torch.sh and gpu-dataplane.sh: the carried wheels and redis-server
# (setup.sh), a machine cleared of what an earlier call left (reset.sh), the generated gRPC
# code, the device's name in $R/device.txt, MPS up for the mesh's replicas, and `step NAME
# SECONDS CMD...`, which runs one bounded step into $R/NAME.log and rewrites $OUT/res.tgz after
# it, so a call cut short still returns what finished.
#
# Run from a `git archive` of HEAD (no .git there), naming the commit, so results say where they
# come from:  git archive --format=tar.gz -o .devsrc/src.tgz HEAD; git rev-parse --short HEAD >
# .devsrc/HEAD; carry .devcarry and .devsrc, and on the device:
#   export CAMELOT_GIT_REV=$(cat .devsrc/HEAD); mkdir -p /tmp/src && tar xzf .devsrc/src.tgz \
#     -C /tmp/src && cp -r .devcarry /tmp/src/ && cd /tmp/src && bash deploy/device/gpu-torch.sh
source .devcarry/setup.sh
export PATH=$PATH:/tmp/devsite/bin  # the carried wheels' tools (py-spy for bench_host --profile-at)
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
