"""Sending arrivals on a timeline: each leaves at its intended time, whatever the gateway does.

`send` opens its connections (and, for inputs by reference, its broker client) first, then asks
`start` for the timeline's start: making them must not eat into the first arrivals' time. It
sleeps until each arrival's intended time and starts that request as its own task, so a slow
answer never holds back the next send; a client that falls behind sends at once, and the lag
stays in the latency, which counts from the intended time. One process sends all of a plan's
arrivals, or (`loadgen.clients`) each of several processes every n-th, on one shared timeline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from common.clock import mono_us
from common.errors import InvalidArgument
from common.lifecycle import TlsFiles, channel
from loadgen.records import OK, Record, StagePart
from loadgen.shm_inputs import SharedInputs
from loadgen.submitstream import StreamStatus, SubmitStreamClient
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)

# Time between building the schedule and its first arrival, so the first sends are not late.
LEAD_S = 0.05


class LeastOutstanding:
    """Which of `n` connections a request goes out on: the one with the fewest requests in
    flight, ties going round in turn (Envoy's and gRPC's least-request balancing, as an L7 load
    balancer in front of the gateway would spread queries). The kernel deals a gateway's
    connections out among its workers by a hash, so some workers hold more of them than others;
    a worker that falls behind holds more requests in flight on each of its connections, and the
    next ones go elsewhere. Before this, queries went round the connections by their index in
    the whole schedule, and a process sending every 4th of them used only 4 of its 16
    connections (16 of 64 on the H100: its busiest gateway worker at 106% of a core while the
    eight averaged 46%)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise InvalidArgument(f"need at least one connection, got {n}")
        self.in_flight = [0] * n
        self._next = 0

    def acquire(self) -> int:
        n = len(self.in_flight)
        start, self._next = self._next, (self._next + 1) % n
        best = start
        for k in range(1, n):
            j = (start + k) % n
            if self.in_flight[j] < self.in_flight[best]:
                best = j
        self.in_flight[best] += 1
        return best

    def release(self, k: int) -> None:
        self.in_flight[k] -= 1


@dataclass(frozen=True)
class Sends:
    """What to send and how: arrival i leaves at `t0 + offsets[i]` for pipeline `names[i]`."""

    target: str
    offsets: list[float]
    names: list[str]
    seed: int
    deadline_s: float
    transport: tensor_pb2.Transport.ValueType
    connections: int
    # how queries travel: one unary Submit each, or many on one SubmitStream per connection
    submit: str = "unary"
    # a broker to borrow input buffers from (inputs by reference, as a client on the node)
    shm_broker: str = ""
    # mutual TLS to a gateway that requires it
    tls: TlsFiles | None = None


async def send(
    plan: Sends,
    inputs: Mapping[str, Sequence[tensor_pb2.WireTensor]],
    indices: Sequence[int],
    start: Callable[[], Awaitable[int]],
) -> tuple[int, list[Record]]:
    """Sends the arrivals `indices` of `plan` over `plan.connections` connections, on the
    timeline that starts at the monotonic time (the same in every process of the host) `start`
    gives once the connections exist: making them must not eat into the first arrivals' time.
    The start and the records."""
    channels = [
        channel(plan.target, plan.tls, own_connection=True) for _ in range(plan.connections)
    ]
    stubs = [gateway_pb2_grpc.GatewayStub(ch) for ch in channels]
    streams = [SubmitStreamClient(stub) for stub in stubs] if plan.submit == "stream" else []
    shm = await SharedInputs.connect(plan.shm_broker, inputs) if plan.shm_broker else None
    spread = LeastOutstanding(plan.connections)
    records: list[Record] = []

    async def one(i: int, name: str, intended_us: int) -> None:
        request = gateway_pb2.SubmitRequest(
            pipeline=name, transport=plan.transport, query_id=f"ol-{plan.seed}-{i}"
        )
        lease = ""
        sent = mono_us()
        if shm is not None:
            lease, ref = await shm.place(name, i)
            request.input_ref.CopyFrom(ref)
        else:
            request.input.CopyFrom(inputs[name][i % len(inputs[name])])
        epoch = 0
        parts = (0, 0, 0, 0)
        stages: tuple[StagePart, ...] = ()
        k = spread.acquire()
        try:
            if streams:
                reply = await streams[k].submit(request, plan.deadline_s)
            else:
                reply = await stubs[k].Submit(request, timeout=plan.deadline_s)
            status, epoch = OK, reply.plan_epoch
            parts = (
                reply.e2e_us,
                sum(t.rpc_us for t in reply.stages),
                sum(t.queue_us + t.batch_wait_us + t.compute_us for t in reply.stages),
                sum(t.compute_us for t in reply.stages),
            )
            stages = tuple(
                (t.stage, t.batch_size, t.queue_us + t.batch_wait_us, t.compute_us, t.gpu_us)
                for t in reply.stages
            )
        except grpc.aio.AioRpcError as e:
            status = e.code().name
        except StreamStatus as e:
            status = e.code_name
        except Exception as e:  # a client-side failure is still a failed request, not a crash
            log.warning("request %d failed in the client: %r", i, e)
            status = f"CLIENT_{type(e).__name__}"
        finally:
            spread.release(k)
        records.append(Record(name, intended_us, sent, mono_us(), status, epoch, *parts, stages))
        if shm is not None:
            shm.done(lease, ok=status == OK)

    try:
        t0_us = await start()
        tasks = []
        for i in indices:
            intended = t0_us + int(plan.offsets[i] * 1e6)
            delay_s = (intended - mono_us()) / 1e6
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one(i, plan.names[i], intended)))
        await asyncio.gather(*tasks)
    finally:
        if shm is not None:
            await shm.aclose()
        for stream in streams:
            await stream.close()
        for ch in channels:
            await ch.close()
    return t0_us, records


async def lead_start() -> int:
    """A timeline that starts `LEAD_S` from now, so the first sends are not late."""
    return mono_us() + int(LEAD_S * 1e6)
