"""`--stage-calls forward`: the gateway sends a query to its first stage only; each stage sends the
next stage's request itself, and the last one answers the gateway.

The gateway stays the authority on the route: it picks the replica of every step (its routes,
least outstanding, suspects avoided), allocates every step's buffers before the first call (as in
`stream` mode), and puts the rest of the route in the first request (`Forward.hops`: per later
step its replica's address and its whole request: input refs, output refs, lease). Before
sending, it opens (or finds open) its own stream to every replica of the route and waits for
each to acknowledge the stream's id (once per stream, not per query); each step's request names
the gateway's stream to its replica, where that replica answers if the step fails, or if it is
the last step. So a query costs the gateway two messages (the request to the first replica, the
answer from the last) and each stage two (its request in, the next request or the answer out).

Semantics kept from `stream`: the query's deadline goes as a budget that each stage passes on
shrunk; a cancel (or the deadline passing) is sent under the attempt's call id on every stream of
the route, and each replica drops the call wherever it is queued there (a cancel that arrives
first is remembered); errors carry their status. An attempt that fails with UNAVAILABLE or
RESOURCE_EXHAUSTED, whether a replica answered it for its own step or for a next one it could
not reach (the answer lists the steps finished), or the gateway's stream to a replica of the
route broke, is retried from the first step not known finished, that step's replica suspected
and not tried again; each step has STAGE_ATTEMPTS as in `stream`, within the deadline.

Only chains are forwarded (every step reads only the step before it, the first only the query's
input), with transport `ref` and every step's output specs known; any other query (a DAG such
as null-dag, transport `wire`, a broker-lease fallback) runs as in `stream` mode.

A retried step may run twice (its first replica may still finish it); it writes the same values
into the same buffers, and the late answer is ignored: each attempt has a call id of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from common.clock import mono_us
from common.errors import (
    CamelotError,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    error_for_status,
)
from protos import gateway_pb2, stage_pb2, tensor_pb2
from services.gateway.routes import Replica, RouteTable
from services.gateway.streams import ForwardAnswer, Forwarded, ReplicaStream

log = logging.getLogger(__name__)


class Forwarding(Protocol):
    async def __call__(
        self, hops: Sequence[tuple[str, stage_pb2.InferRequest]], timeout_s: float
    ) -> ForwardAnswer: ...


class RouteSender:
    """Sends one attempt of a forwarded query over the gateway's streams (`stream_for(address)`
    gives the gateway's stream to a replica, opening none yet)."""

    def __init__(self, stream_for: Callable[[str], ReplicaStream], forwarded: Forwarded) -> None:
        self.stream_for = stream_for
        self.forwarded = forwarded

    async def __call__(
        self, hops: Sequence[tuple[str, stage_pb2.InferRequest]], timeout_s: float
    ) -> ForwardAnswer:
        """The attempt's answer; an error comes back as an answer too (never raised), so the
        caller sees which steps finished. Cancelling it cancels the call on the whole route."""
        streams = [self.stream_for(address) for address, _ in hops]
        for stream in streams:
            if not stream.ready:
                try:
                    await stream.wait_ready()
                except CamelotError as e:
                    result = stage_pb2.InferResult(code=e.code.value[0], message=e.message)
                    return ForwardAnswer(result, broken=stream.address)
        call_id = next(self.forwarded.ids)
        first = stage_pb2.InferRequest()
        first.CopyFrom(hops[0][1])
        forward = first.forward
        forward.reply_stream = streams[0].stream_id
        forward.reply_call_id = call_id
        for (address, request), stream in zip(hops[1:], streams[1:], strict=True):
            hop = forward.hops.add()
            hop.address = address
            hop.request.CopyFrom(request)
            hop.request.forward.reply_stream = stream.stream_id
            hop.request.forward.reply_call_id = call_id
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ForwardAnswer] = loop.create_future()
        self.forwarded.calls[call_id] = future
        for stream in streams:
            stream.route(call_id)
        streams[0].send_forward(call_id, first, timeout_s)
        timer = loop.call_later(timeout_s, _expire, future, streams[0].address)
        try:
            answer = await future
        except asyncio.CancelledError:
            for stream in streams:
                stream.cancel(call_id)
            raise
        finally:
            timer.cancel()
            self.forwarded.calls.pop(call_id, None)
            for stream in streams:
                stream.unroute(call_id)
        if answer.result.code == DeadlineExceeded.code.value[0] and not answer.result.done:
            for stream in streams:
                stream.cancel(call_id)  # the timer's: drop the query wherever it is
        return answer


def _expire(future: asyncio.Future[ForwardAnswer], address: str) -> None:
    if not future.done():
        result = stage_pb2.InferResult(
            code=DeadlineExceeded.code.value[0],
            message=f"forwarded query through {address} timed out",
        )
        future.set_result(ForwardAnswer(result))


def is_chain(steps: Sequence[Any]) -> bool:
    """Every step reads only the step before it (the first only the query's input)."""
    previous = "input"
    for step in steps:
        if {src.partition(".")[0] for _, src in step.inputs} != {previous}:
            return False
        previous = step.name
    return True


def step_requests(
    steps: Sequence[Any],
    values: dict[str, tensor_pb2.TensorRef],
    outputs: dict[str, list[tensor_pb2.Tensor]],
    pipeline: str,
    lease: str,
    query_id: str,
    client_lease: str,
) -> list[stage_pb2.InferRequest]:
    """Every step's request, from refs all allocated before the first call."""
    requests = []
    for step in steps:
        request = stage_pb2.InferRequest(
            query_id=query_id,
            pipeline=pipeline,
            lease_id=lease,
            transport=tensor_pb2.TRANSPORT_REF,
            outputs=outputs[step.name],
            client_lease_id=client_lease,
        )
        for name, src in step.inputs:
            request.inputs.add(name=name).ref.CopyFrom(values[src])
        requests.append(request)
    return requests


def split_round_trip(
    round_trip_us: int, finished: Sequence[stage_pb2.InferResponse], hops: int
) -> list[int]:
    """One forwarded attempt's round trip split over the steps it finished: each step gets its
    own time inside its replica (queue, batch wait, compute) and an equal share of what is left
    (the attempt's hops: `hops` of them, one per step it was routed through), so that the
    steps' rpc_us add up to at most the attempt, as unary stage calls' do."""
    inside = [r.timings.queue_us + r.timings.batch_wait_us + r.timings.compute_us for r in finished]
    hop_us = max(0, round_trip_us - sum(inside)) // max(1, hops)
    return [us + hop_us for us in inside]


async def drive_chain(
    routes: RouteTable,
    send: Forwarding,
    pipeline: str,
    step_names: Sequence[str],
    requests: Sequence[stage_pb2.InferRequest],
    query_id: str,
    deadline_us: int,
    attempts: int,
) -> list[gateway_pb2.StageTime]:
    """Runs a chain's steps by forwarding, retrying from the first unfinished step (`attempts`
    per step, as a stage call in stream mode); the steps' timings (rpc_us: the step's share of
    the round trip of the attempt that finished it, see `split_round_trip`)."""
    n = len(step_names)
    start = 0
    tried: list[set[str]] = [set() for _ in range(n)]
    failures = [0] * n
    times: list[gateway_pb2.StageTime | None] = [None] * n
    last: CamelotError | None = None
    while True:
        remaining_s = (deadline_us - mono_us()) / 1e6
        if remaining_s <= 0:
            raise DeadlineExceeded(f"deadline passed before stage {step_names[start]}")
        route: list[Replica] = []
        for i in range(start, n):
            try:
                route.append(routes.pick(pipeline, step_names[i], tried[i]))
            except Unavailable:
                if last is not None:
                    raise last from None
                raise
        for replica in route:
            replica.outstanding += 1
        t0 = mono_us()
        try:
            answer = await send(
                [(r.address, requests[start + k]) for k, r in enumerate(route)], remaining_s
            )
        finally:
            for replica in route:
                replica.outstanding -= 1
        result = answer.result
        finished = list(result.done)
        if result.code == 0:
            finished.append(result.response)
        for k, (response, rpc_us) in enumerate(
            zip(finished, split_round_trip(mono_us() - t0, finished, len(route)), strict=True)
        ):
            t = response.timings
            times[start + k] = gateway_pb2.StageTime(
                stage=step_names[start + k],
                rpc_us=rpc_us,
                queue_us=t.queue_us,
                batch_wait_us=t.batch_wait_us,
                compute_us=t.compute_us,
                replica_id=response.replica_id,
                batch_size=t.batch_size,
                gpu_us=t.gpu_us,
            )
        if result.code == 0:
            return [t for t in times if t is not None]
        error = error_for_status(result.code, result.message, result.retry_after_ms or None)
        if not isinstance(error, (Unavailable, ResourceExhausted)):
            raise error
        first = start
        if answer.broken:
            # how far it got is unknown: again from this attempt's first step
            k = next((k for k, r in enumerate(route) if r.address == answer.broken), 0)
        else:
            k = min(len(result.done), len(route) - 1)
            start += k
        failed = first + k
        replica = route[k]
        routes.suspect(replica)
        tried[failed].add(replica.address)
        failures[failed] += 1
        log.warning(
            "forwarded stage %s on %s failed (%s); retrying from stage %s",
            step_names[failed],
            replica.replica_id,
            error.code.name,
            step_names[start],
            extra={"request_id": query_id},
        )
        last = error
        if failures[failed] >= attempts:
            raise error
