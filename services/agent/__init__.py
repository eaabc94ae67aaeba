"""The node agent: GPU inventory, the MPS daemon, and the node's stage replica processes.

settings.py     flags and CAMELOT_* variables
inventory.py    GPUs (NVML, plus a CUDA probe process: probe.py)
mps.py          the MPS control daemon
diff.py         checking an assignment, diffing it against what runs (pure)
replicas.py     one replica instance: process, socket, log, state
launch.py       what a replica is started with: command line, environment (its GPU share), log
supervisor.py   restarts crashed replicas
routes.py       the node's routes, versioned and watchable
apply.py        Agent: applies assignments (shadow replacement, resize, drain)
orphans.py      replicas a killed agent left serving: routed to, then stopped
heartbeat.py    heartbeats to the scheduler; applies the assignment it answers
servicer.py     the Agent gRPC service; create_server
"""
