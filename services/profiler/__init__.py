"""The GPU stage profiler: solo latency over SM shares and batches, and bandwidth contention."""
