# Sourced by the gpu-*.sh scripts after .devcarry/setup.sh: a warm device machine may still run a
# mesh from a call that hit its time limit (its processes, its redis-server, its MPS daemon). A
# new mesh beside them never came up (a 200 s wait, twice), so everything left over goes first.
for pid in $(pgrep -f "^python3? -m (services|shmbroker|scheduler|loadgen)"); do kill -9 "$pid"; done
pkill -9 -x redis-server 2>/dev/null
mps_stop >/dev/null 2>&1
sleep 1
rm -rf /tmp/cam
