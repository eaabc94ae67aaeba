"""Open-loop load from several processes on one timeline.

One asyncio process that serialises megabyte inputs and parses megabyte answers falls behind its own
schedule at a few hundred queries per second (docs/results/peak-load-one-client.md: 58-67% of a core
and 5-11 ms of lag in the slow queries at 280-320 qps), and that lag lands in the measured latency
as if the server were slow. Here arrival i of a schedule goes to process i mod n: each process thins
the Poisson stream into an independent one of 1/n the rate, together the same arrivals as one
process would send. Every process makes its inputs and opens its connections first, says it is
ready, and only then does the parent fix the timeline's start: CLOCK_MONOTONIC is the same in every
process of a host, so intended send times, and latencies from them, mean the same in all.

Processes are spawned, not forked: a process that holds gRPC channels must not fork.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

from loadgen import children
from loadgen.inputs import make_inputs
from loadgen.records import Record
from loadgen.sending import Sends, lead_start, send
from protos import tensor_pb2

log = logging.getLogger(__name__)

# How long a process may take to start, import and make its inputs before the run gives up.
READY_TIMEOUT_S = 60.0


def _serve(conn: Connection, plan: Sends, specs: dict[str, bytes], part: int, parts: int) -> None:
    """A sending process: inputs, "ready", the start time, then its records (or its error)."""
    try:
        spec_msgs = {n: tensor_pb2.TensorSpec.FromString(b) for n, b in specs.items()}
        inputs = make_inputs(spec_msgs, plan.seed)  # the same inputs as one process would send
        indices = range(part, len(plan.offsets), parts)

        async def start() -> int:
            # ready once the inputs and the connections exist; the parent then fixes the start
            conn.send(("ready", None))
            t0_us: int = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            return t0_us

        _, records = asyncio.run(send(plan, inputs, indices, start))
        conn.send(("records", records))
    except BaseException as e:  # the parent must hear why, not wait for a pipe that never speaks
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


async def send_split(
    plan: Sends, specs: Mapping[str, tensor_pb2.TensorSpec], processes: int
) -> tuple[int, list[Record]]:
    """`plan` sent from `processes` processes, its connections split among them (at least one
    each); the timeline's start and every record."""
    parts = min(processes, max(1, len(plan.offsets)))
    each = max(1, plan.connections // parts)
    share = Sends(plan.target, plan.offsets, plan.names, plan.seed, plan.deadline_s,
                  plan.transport, each, plan.submit, plan.shm_broker, plan.tls)  # fmt: skip
    raw = {n: s.SerializeToString() for n, s in specs.items()}
    ctx = mp.get_context("spawn")
    loop = asyncio.get_running_loop()
    pipes: list[Connection] = []
    procs: list[Any] = []
    try:
        for k in range(parts):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(theirs, share, raw, k, parts), name=f"openloop-{k}",
                daemon=True,
            )  # fmt: skip
            proc.start()
            theirs.close()
            pipes.append(mine)
            procs.append(proc)
        for k, (pipe, proc) in enumerate(zip(pipes, procs, strict=True)):
            await _expect(loop, pipe, "ready", k, READY_TIMEOUT_S, proc)
        t0_us = await lead_start()
        for pipe in pipes:
            pipe.send(t0_us)
        horizon_s = (plan.offsets[-1] if plan.offsets else 0.0) + plan.deadline_s + 30.0
        records: list[Record] = []
        for k, (pipe, proc) in enumerate(zip(pipes, procs, strict=True)):
            records += await _expect(loop, pipe, "records", k, horizon_s, proc)
        return t0_us, records
    finally:
        for pipe in pipes:
            pipe.close()
        children.reap(procs, 5.0)


async def _expect(
    loop: asyncio.AbstractEventLoop,
    pipe: Connection,
    kind: str,
    part: int,
    timeout_s: float,
    proc: Any,
) -> Any:
    """The next message of a sending process, which must be `kind` (off the event loop)."""
    try:
        return await loop.run_in_executor(None, children.expect, pipe, kind, timeout_s, proc)
    except children.ChildReported as e:
        raise RuntimeError(f"sending process {part} failed: {e}") from None
    except children.ChildFailed as e:
        raise RuntimeError(f"sending process {part}: {e}") from None
