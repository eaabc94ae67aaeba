"""Child processes of the profiler, one per SM share (an MPS share is fixed at CUDA init).

    python -m services.profiler.worker stage <pipeline> <size> <stage> <max_batch> <seed>
    python -m services.profiler.worker corunner <mib>

The parent sets CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in the child's environment before it starts.
Both speak one JSON object per line: the child first prints {"ready": ...}, then answers each
command read from stdin. `stage` builds the pipeline's models, runs the query inputs through
the stages before the one profiled (so its inputs are real), frees everything else, and times
`infer` on request. `corunner` streams a large device-to-device copy (memory bandwidth, the
resource MPS does not partition) and reports the GB/s it achieved between "start" and "stop".
"""

from __future__ import annotations

import json
import select
import sys
import time
from typing import Any


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _commands() -> Any:
    for line in sys.stdin:
        if line.strip():
            yield json.loads(line)


def stage_main(
    pipeline: str, size: str, stage: str, max_batch: int, seed: int, graphs: bool = False
) -> None:
    import cupy as cp
    import numpy as np

    from common.backend import Backend
    from contract.pipeline_config import load_pipeline
    from services.pipelines import runner
    from services.stage.plugin import ModelContext, build_model

    pipe = load_pipeline(pipeline, size)
    ctx = ModelContext(Backend.CUDA, cp, size, seed, np.dtype(np.float16), graphs)
    # the stage's own kind of stream (a replica never runs on the legacy default stream)
    stream = cp.cuda.Stream(non_blocking=True)
    stream.use()
    items = np.stack([runner.make_input(pipe, seed + i) for i in range(max_batch)])
    target = next(s for s in pipe.stages if s.name == stage)
    feeds_host = {
        n: cp.asnumpy(v) for n, v in runner.stage_feeds(pipe, ctx, cp.asarray(items), stage).items()
    }
    # keep only the profiled stage: its weights are what the pool holds after a rebuild
    runner.clear_cache()
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    base = pool.used_bytes() + _torch_bytes()
    model = build_model(target.model, ctx, target.options)
    cp.cuda.Device().synchronize()
    weights = pool.used_bytes() + _torch_bytes() - base
    feeds = {n: cp.asarray(v) for n, v in feeds_host.items()}
    input_bytes = sum(int(v.nbytes) for v in feeds.values()) // max_batch
    out_bytes = 0
    _send(
        {
            "ready": True,
            "weights_bytes": int(weights),
            "input_bytes_per_item": input_bytes,
            # a replayed graph runs a batch padded to its power-of-two bucket
            "batch_buckets": "pow2" if getattr(model, "uses_graphs", False) else "",
        }
    )
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for cmd in _commands():
        if cmd["cmd"] == "exit":
            return
        b = int(cmd["batch"])
        batch = {n: v[:b] for n, v in feeds.items()}
        pool.free_all_blocks()
        _torch_reset_peak()
        before = pool.total_bytes() + _torch_bytes()
        for _ in range(int(cmd.get("warmup", 3))):
            out = model.infer(batch)
        cp.cuda.Device().synchronize()
        times: list[float] = []
        deadline = time.monotonic() + float(cmd.get("min_s", 0.0))
        while len(times) < int(cmd.get("repeats", 20)) or time.monotonic() < deadline:
            start.record()
            out = model.infer(batch)
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        out_bytes = sum(int(v.nbytes) for v in out.values()) // b
        _send(
            {
                "ms": float(np.median(times)),
                "runs": len(times),
                "working_bytes": int(max(0, pool.total_bytes() + _torch_bytes(peak=True) - before)),
                "output_bytes_per_item": out_bytes,
            }
        )


def _torch_bytes(peak: bool = False) -> int:
    """What torch's caching allocator holds for tensors (a torch stage's weights and activations
    live there, not in CuPy's pool); 0 where no torch stage was loaded."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated())


def _torch_reset_peak() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def corunner_main(mib: int) -> None:
    import cupy as cp

    n = mib * (1 << 20) // 4
    a = cp.ones(n, dtype=cp.float32)
    b = cp.empty_like(a)
    for _ in range(5):
        b[...] = a
    cp.cuda.Device().synchronize()
    _send({"ready": True})
    copied, t0, running = 0, time.perf_counter(), False
    while True:
        # between copies, look for a command without blocking the stream
        ready, _, _ = select.select([sys.stdin], [], [], 0 if running else None)
        if ready:
            line = sys.stdin.readline()
            if not line:
                return
            cmd = json.loads(line)["cmd"]
            if cmd == "exit":
                return
            if cmd == "start":
                cp.cuda.Device().synchronize()
                copied, t0, running = 0, time.perf_counter(), True
            elif cmd == "stop":
                cp.cuda.Device().synchronize()
                seconds = time.perf_counter() - t0
                _send({"gbs": 2 * copied * a.nbytes / seconds / 1e9, "seconds": seconds})
                running = False
        if running:
            for _ in range(4):
                b[...] = a
            copied += 4
            cp.cuda.Device().synchronize()


def main(argv: list[str]) -> None:
    if argv[0] == "stage":
        graphs = len(argv) > 6 and argv[6] == "on"
        stage_main(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), graphs)
    elif argv[0] == "corunner":
        corunner_main(int(argv[1]))
    else:
        raise SystemExit(f"unknown worker kind {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
