"""A small real Gateway (and Admin) gRPC server for the load-generator tests.

It is the seam fake of the system under load: it implements protos/gateway.proto and
protos/admin.proto for real (port 0, grpc.aio), checks every input against its pipeline's spec,
and answers after a latency given by a model: a fixed sleep, an optional concurrency limit (so
requests queue), or an overload that depends on how much load a run of the open-loop client
brings under the active policy.

Its time scale sits far from a loaded machine's noise, so that a test's verdicts do not depend on
the machine: every pipeline's QoS target (2 s) is two orders of magnitude above the scheduling
delays a busy 2-core host adds to a query (tens of ms), and a slow query sleeps past it whatever
the host does. Which queries are slow never depends on when they arrive (a delayed or bunched
arrival on a loaded host must not read as a higher rate): it is decided by each query's place in
its run, read from the open-loop client's query id.
No tests live here; the other test_loadgen* modules import it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from common.dtypes import array_from_wire
from common.errors import InvalidArgument, NotFound, Unauthenticated, grpc_errors
from protos import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc, plan_pb2, tensor_pb2

TOKEN = "test-token"


def spec(name: str, dtype: int, shape: list[int]) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=name, dtype=dtype, shape=shape)


PIPELINES = {
    "img-to-text": spec("image", tensor_pb2.DTYPE_UINT8, [3, 8, 8]),
    "speech-to-text": spec("audio", tensor_pb2.DTYPE_FLOAT32, [160]),
    "bad-pipe": spec("x", tensor_pb2.DTYPE_FLOAT16, [4]),
}


def place_in_run(query_id: str) -> int | None:
    """The index of an open-loop query in its run's schedule ("ol-<seed>-<i>"); None for other
    queries (a probe)."""
    if not query_id.startswith("ol-"):
        return None
    return int(query_id.rsplit("-", 1)[1])


@dataclass
class State:
    """What the fake does, and what it saw."""

    sleep_s: float = 0.0
    concurrency: int = 0  # 0: unlimited
    fail: dict[str, grpc.StatusCode] = field(default_factory=dict)
    # every pipeline's QoS target, as ListPipelines gives it
    qos_p99_ms: float = 2000.0
    # Overload model: the active policy holds this many queries of one open-loop run; the run's
    # queries past that many (by their place in the run) take `slow_s`. A fixed-length trial at
    # rate r sends r * trial_s queries, so a capacity of c is a peak rate of c / trial_s.
    run_capacity: dict[str, int] = field(default_factory=dict)
    slow_s: float = 2.5
    transport_extra_s: dict[int, float] = field(default_factory=dict)
    # the next this many requests take `slow_s` whatever the rate (one slow event)
    spikes: int = 0
    policy: str = "initial"
    epoch: int = 1
    policy_sm: dict[str, list[float]] = field(default_factory=dict)
    # the agents apply a new plan over this many Status calls after SetPolicy; queries that
    # arrive before that are counted (an experiment must not measure the change)
    apply_polls: int = 0
    unapplied: int = 0
    submits_while_applying: int = 0
    received: Counter[str] = field(default_factory=Counter)
    # the clients' addresses ("ipv4:127.0.0.1:port"): one per connection
    peers: set[str] = field(default_factory=set)
    transports: Counter[int] = field(default_factory=Counter)
    sem: asyncio.Semaphore | None = None

    def latency_s(self, query_id: str) -> float:
        if self.spikes > 0:
            self.spikes -= 1
            return self.slow_s
        capacity = self.run_capacity.get(self.policy)
        place = place_in_run(query_id)
        if capacity is not None and place is not None and place >= capacity:
            return self.slow_s
        return self.sleep_s


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, state: State) -> None:
        self.state = state

    @grpc_errors
    async def ListPipelines(self, request, context):
        return gateway_pb2.ListPipelinesResponse(
            pipelines=[
                gateway_pb2.PipelineInfo(
                    name=n, input=s, output=s, stages=[f"{n}.a"], qos_p99_ms=self.state.qos_p99_ms
                )
                for n, s in PIPELINES.items()
            ]
        )

    @grpc_errors
    async def Submit(self, request, context):
        st = self.state
        if request.pipeline not in PIPELINES:
            raise NotFound(f"unknown pipeline {request.pipeline!r}")
        want = PIPELINES[request.pipeline]
        if request.input.dtype != want.dtype or list(request.input.shape) != list(want.shape):
            raise InvalidArgument("input does not match the spec")
        array_from_wire(request.input)  # checks the byte count
        st.received[request.pipeline] += 1
        st.peers.add(context.peer())
        st.submits_while_applying += st.unapplied > 0
        st.transports[request.transport] += 1
        delay = st.latency_s(request.query_id) + st.transport_extra_s.get(request.transport, 0.0)
        if request.pipeline in st.fail:
            await context.abort(st.fail[request.pipeline], "configured to fail")
        if st.sem is not None:
            async with st.sem:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(delay)
        e2e_us = int(delay * 1e6)
        # one stage: its round trip 80% of the query, inside it 10% batch wait and 50% compute;
        # a slow query ran alone, the others in batches of 4
        stage = gateway_pb2.StageTime(
            stage="only", rpc_us=e2e_us * 8 // 10, batch_wait_us=e2e_us // 10,
            compute_us=e2e_us // 2, batch_size=1 if delay >= st.slow_s else 4,
        )  # fmt: skip
        return gateway_pb2.SubmitResponse(
            output=request.input, query_id=request.query_id, e2e_us=e2e_us,
            stages=[stage], plan_epoch=st.epoch,
        )  # fmt: skip


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """SetPolicy makes a plan with the policy's replica shares and a new epoch."""

    def __init__(self, state: State) -> None:
        self.state = state

    def _check(self, context) -> None:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            raise Unauthenticated("bad token")

    def _plan(self) -> plan_pb2.Plan:
        st = self.state
        shares = st.policy_sm.get(st.policy, [100.0])
        return plan_pb2.Plan(
            epoch=st.epoch,
            policy=st.policy,
            stages=[
                plan_pb2.StagePlan(
                    pipeline=name, stage=f"{name}.a",
                    replicas=[
                        plan_pb2.ReplicaPlan(
                            replica_id=f"{name}.a.{i}", node="n0", gpu=i, sm_percent=share
                        )
                        for i, share in enumerate(shares)
                    ],
                )
                for name in PIPELINES
            ],
        )  # fmt: skip

    @grpc_errors
    async def SetPolicy(self, request, context):
        self._check(context)
        # the policy with its options, as the harness names it: "exclusive:sharing=mps"
        key = request.policy + "".join(f":{k}={v}" for k, v in sorted(request.options.items()))
        if key not in self.state.policy_sm:
            raise InvalidArgument(f"unknown policy {key!r}")
        self.state.policy = key
        self.state.epoch += 1
        self.state.unapplied = self.state.apply_polls
        return self._plan()

    @grpc_errors
    async def GetPlan(self, request, context):
        self._check(context)
        return self._plan()

    @grpc_errors
    async def Status(self, request, context):
        self._check(context)
        st = self.state
        applied = st.epoch - (st.unapplied > 0)
        st.unapplied = max(0, st.unapplied - 1)
        return admin_pb2.StatusResponse(plan=self._plan(), applied_epoch=applied)


@dataclass
class Served:
    target: str
    state: State


@contextlib.asynccontextmanager
async def serve_fake(state: State | None = None) -> AsyncIterator[Served]:
    """The fake gateway and admin on one port; tune `served.state` before loading it."""
    state = state or State()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(FakeGateway(state), server)
    admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(f"127.0.0.1:{port}", state)
    finally:
        await server.stop(0)


def limit(state: State, concurrency: int) -> None:
    state.concurrency = concurrency
    state.sem = asyncio.Semaphore(concurrency)
