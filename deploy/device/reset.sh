# Sourced by the gpu-*.sh scripts after .devcarry/setup.sh: a warm device machine may still run a
# mesh from a call that hit its time limit (its processes, its redis-server, its MPS daemon). A
# new mesh beside them never came up (150 s, then 200 s), so everything left over goes first;
# an MPS daemon that does not quit within 10 s is killed (mps_start then starts a fresh one).
for pid in $(pgrep -f "^python3? -m (services|shmbroker|scheduler|loadgen)"); do kill -9 "$pid"; done
pkill -9 -x redis-server 2>/dev/null
timeout 10 bash -c 'echo quit | nvidia-cuda-mps-control' >/dev/null 2>&1
pkill -9 -x nvidia-cuda-mps-control 2>/dev/null
pkill -9 -x nvidia-cuda-mps-server 2>/dev/null
sleep 1
# a daemon killed with -9 leaves its pid file and pipes: the next `nvidia-cuda-mps-control -d`
# then says "An instance of this daemon is already running" and starts none, and CUDA is unusable
rm -rf "${CUDA_MPS_PIPE_DIRECTORY:?}"/* "${CUDA_MPS_LOG_DIRECTORY:?}"/* 2>/dev/null
rm -rf /tmp/cam
