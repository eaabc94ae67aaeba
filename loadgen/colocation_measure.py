"""Measuring a co-location on the GPU: its stages side by side, and each alone just before.

Each member is its own spawned process that builds its stage as the profiler's worker does
(services/profiler/worker.py): the query inputs run through the stages before it, so its inputs
are real; CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is set before CUDA starts. Each member first runs
alone at its share while the others idle (so a miss can be put on the profile or on the
contention model), then all run batches back to back for a window. Only batches from the
interval in which every process was running count (each stamps its batches with the host's
monotonic clock), so a process that starts or stops early never makes the others look faster.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from common.errors import InvalidArgument, Unavailable
from loadgen import children
from loadgen.colocations import Colocation, Member

SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
READY_TIMEOUT_S = 180.0
MIN_SAMPLES = 3

Sample = tuple[float, float, float]  # (host start s, host end s, CUDA-event ms)


def overlap(samples: Sequence[Sequence[Sample]]) -> list[list[Sample]]:
    """Each member's batches that started and ended while every member was running."""
    if any(not s for s in samples):
        raise Unavailable("a co-located process recorded no batch")
    lo = max(s[0][0] for s in samples)
    hi = min(s[-1][1] for s in samples)
    return [[x for x in s if x[0] >= lo and x[1] <= hi] for s in samples]


def summarize(kept: Sequence[Sample], batch: int) -> tuple[float, float]:
    """(median batch ms by CUDA events, items/s over the host time the batches spanned)."""
    if len(kept) < MIN_SAMPLES:
        return math.nan, math.nan
    ms = statistics.median(x[2] for x in kept)
    span = kept[-1][1] - kept[0][0]
    return ms, batch * len(kept) / span if span > 0 else math.nan


def _member_main(
    conn: Connection, stop: Any, m: Member, size: str, seed: int, graphs: bool = False
) -> None:
    """Child process: build the stage at its share, then answer "solo" and "together"."""
    os.environ[SHARE_ENV] = f"{m.share:g}"  # before CUDA starts in this process
    try:
        model, batch, cp = _build(m, size, seed, graphs)
        stream = cp.cuda.Stream(non_blocking=True)  # a replica's kind of stream
        stream.use()
        start, end = cp.cuda.Event(), cp.cuda.Event()

        def one() -> Sample:
            t0 = time.monotonic()
            start.record()
            model.infer(batch)
            end.record()
            end.synchronize()
            return t0, time.monotonic(), float(cp.cuda.get_elapsed_time(start, end))

        for _ in range(3):
            one()
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "solo":
                conn.send(("solo", [one()[2] for _ in range(int(arg))]))
            elif cmd == "together":
                samples = []
                while not stop.is_set():
                    samples.append(one())
                conn.send(("together", samples))
            else:
                return
    except Exception as e:  # the parent names the member that failed, and why
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _build(
    m: Member, size: str, seed: int, graphs: bool = False
) -> tuple[Any, dict[str, Any], Any]:
    import cupy as cp
    import numpy as np

    from common.backend import Backend
    from contract.pipeline_config import load_pipeline
    from services.pipelines import runner
    from services.stage.plugin import ModelContext, build_model

    pipe = load_pipeline(m.pipeline, size)
    ctx = ModelContext(Backend.CUDA, cp, size, seed, np.dtype(np.float16), graphs)
    items = np.stack([runner.make_input(pipe, seed + i) for i in range(m.batch)])
    target = next((s for s in pipe.stages if s.name == m.stage), None)
    if target is None:
        raise InvalidArgument(f"pipeline {m.pipeline} has no stage {m.stage}")
    feeds = runner.stage_feeds(pipe, ctx, cp.asarray(items), m.stage)
    model = build_model(target.model, ctx, target.options)
    runner.clear_cache()
    cp.get_default_memory_pool().free_all_blocks()
    return model, feeds, cp


def measure(
    c: Colocation,
    size: str,
    seed: int,
    window_s: float,
    solo_repeats: int,
    graphs: bool = False,
) -> tuple[list[tuple[float, float, int]], list[float]]:
    """Runs on the GPU: (per member median ms, items/s, samples side by side), solo medians."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    conns, procs = [], []
    try:
        for m in c.members:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_member_main, args=(child, stop, m, size, seed, graphs))
            proc.start()
            child.close()  # the parent keeps only its end: a dead child reads as EOF
            conns.append(parent)
            procs.append(proc)
        members = list(zip(c.members, conns, procs, strict=True))
        for m, conn, proc in members:
            _expect(conn, "ready", m, READY_TIMEOUT_S, proc)
        solo = []
        for m, conn, proc in members:  # one at a time: the others idle
            conn.send(("solo", solo_repeats))
            solo.append(statistics.median(_expect(conn, "solo", m, 120.0, proc)))
        for conn in conns:  # all start within microseconds of each other
            conn.send(("together", None))
        time.sleep(window_s)
        stop.set()
        samples = [_expect(conn, "together", m, 120.0, proc) for m, conn, proc in members]
        kept = overlap(samples)
        together = [(*summarize(k, m.batch), len(k)) for m, k in zip(c.members, kept, strict=True)]
        return together, solo
    finally:
        for conn in conns:
            try:
                conn.send(("exit", None))
            except OSError:
                pass
        children.reap(procs, 30.0)
        for conn in conns:
            conn.close()


def _expect(conn: Connection, what: str, m: Member, timeout_s: float, proc: Any) -> Any:
    try:
        return children.expect(conn, what, timeout_s, proc)
    except children.ChildFailed as e:
        raise Unavailable(f"{m.key}@{m.share:g}%: {e}") from None
