"""`--stage-calls forward` on the host backend, in this process (null stages, a real broker, real
gRPC): the stages pass a chain's query on and the last answers the gateway; the answers are those
of `stream` mode, and deadlines, cancels, retries and buffers keep their meaning."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest

from common.dtypes import array_from_wire
from common.errors import CamelotError, Unavailable
from protos import gateway_pb2, stage_pb2, stage_pb2_grpc, tensor_pb2
from services.gateway.app import create_server as create_gateway
from services.gateway.app import pipeline_entry
from services.gateway.forwarding import RouteSender, is_chain, split_round_trip
from services.gateway.settings import GatewaySettings
from services.gateway.streams import ForwardAnswer, Forwarded, ReplicaStream
from services.stage.app import StageApp
from services.stage.forward import Forwarder
from shmbroker.arena import ArenaBuffers
from shmbroker.client import BrokerClient
from tests.test_broker_server import MiB, running_broker
from tests.test_gateway_inprocess import Mesh, close, query
from tests.test_stage_stream import NULL_DIR, stage


@pytest.fixture
async def broker():
    async with running_broker(slab_bytes=16 * MiB, max_bytes=128 * MiB) as r:
        yield r


async def mesh_of(broker, replicas=(("a", "a"), ("b", "b"), ("c", "c")), **gateway) -> Mesh:
    """null3 with the given (stage, replica id) replicas, the gateway forwarding."""
    stages = [
        await stage(broker, pipeline="null3", stage=name, replica_id=rid) for name, rid in replicas
    ]
    routes = tuple(
        ("null3", s.settings.stage, s.settings.name, f"127.0.0.1:{s.port}") for s in stages
    )
    fields = dict(
        backend="host", port=0, broker=broker.target, pipelines_dir=NULL_DIR,
        static_routes=routes, stage_calls="forward",
    )  # fmt: skip
    fields.update(gateway)
    app = await create_gateway(GatewaySettings(**fields))
    await app.server.start()
    return Mesh(app, stages, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}"))


def hold(app: StageApp) -> asyncio.Event:
    """Holds the replica's batches until the event is set (the test's stand-in for a slow
    model): a call stays in flight there, where a cancel must reach it."""
    gate = asyncio.Event()
    run_batch = app.replica.batcher.run_batch

    async def held(items):
        await gate.wait()
        await run_batch(items)

    app.replica.batcher.run_batch = held
    return gate


def in_flight(app: StageApp) -> int:
    """Calls queued or running on the replica for gateways' streams (forwarded ones included)."""
    return sum(calls.in_flight for calls in app.servicer.peers.values())


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 30.0) -> None:
    """Waits for a condition the system under test must reach (fails the test if it never does)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        got = condition()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        assert loop.time() < end, "condition never reached"
        await asyncio.sleep(0.02)


async def no_leases(m: Mesh, broker) -> bool:
    stats = await m.stub.Stats(gateway_pb2.GatewayStatsRequest(), timeout=10)
    return stats.live_leases == 0 and stats.inflight == 0 and broker.broker.stats().live_leases == 0


async def test_a_chain_forwarded_gives_the_answers_of_stream_mode(broker):
    m = await mesh_of(broker)
    try:
        replies = await asyncio.gather(*(m.stub.Submit(query(i), timeout=30) for i in range(40)))
        for i, reply in enumerate(replies):
            assert (array_from_wire(reply.output) == i % 256).all()
            assert [s.stage for s in reply.stages] == ["a", "b", "c"]
            assert [s.replica_id for s in reply.stages] == ["a", "b", "c"]
            # one round trip for the chain, shared out: the steps add up to no more than it
            assert sum(s.rpc_us for s in reply.stages) <= reply.e2e_us
            for s in reply.stages:
                assert s.rpc_us >= s.queue_us + s.batch_wait_us + s.compute_us
                assert s.batch_size >= 1
        # the stages passed the queries on: a and b opened streams to the next replica
        assert m.stages[0].servicer.forwarder.addresses == [f"127.0.0.1:{m.stages[1].port}"]
        assert m.stages[1].servicer.forwarder.addresses == [f"127.0.0.1:{m.stages[2].port}"]
        assert m.stages[2].servicer.forwarder.addresses == []
        await until(lambda: no_leases(m, broker))
    finally:
        await close(m)


@pytest.mark.parametrize("calls", ["forward", "stream"])
async def test_each_stage_says_how_large_the_batch_was_that_ran_the_query(broker, calls):
    m = await mesh_of(broker, stage_calls=calls)
    try:
        batcher = m.stages[0].replica.batcher
        gate, run_batch, held = asyncio.Event(), batcher.run_batch, []

        async def hold_first(items):
            held.extend(items)
            await gate.wait()
            await run_batch(items)

        batcher.run_batch = hold_first
        pending = [asyncio.ensure_future(m.stub.Submit(query(i), timeout=30)) for i in range(6)]
        # the first batch is held; the queries that arrive behind it queue for the next one
        await until(lambda: len(held) + batcher.depth == 6)
        gate.set()
        replies = await asyncio.gather(*pending)
        sizes = [r.stages[0].batch_size for r in replies]
        assert max(sizes) > 1
        # each batch of k answers k queries, each of which says k
        assert all(sizes.count(k) % k == 0 for k in set(sizes))
        assert sum(sizes.count(k) for k in set(sizes)) == 6
        assert all(s.batch_size >= 1 for r in replies for s in r.stages)
    finally:
        await close(m)


def test_an_attempts_round_trip_is_split_over_its_steps_by_their_time_inside():
    finished = [
        stage_pb2.InferResponse(timings=stage_pb2.StageTimings(queue_us=q, compute_us=c))
        for q, c in ((100, 400), (0, 200))
    ]
    # 2000 us, 700 inside: the 1300 of hops shared by the 2 steps routed
    assert split_round_trip(2000, finished, 2) == [500 + 650, 200 + 650]
    # the attempt failed at its third hop: that hop's share is nobody's
    assert split_round_trip(2000, finished, 3) == [500 + 433, 200 + 433]
    # clocks that disagree never make a step cost less than its time inside
    assert split_round_trip(500, finished, 2) == [500, 200]


def test_only_chains_are_forwarded():
    assert is_chain(pipeline_entry("null3", "tiny", NULL_DIR).route.steps)
    assert is_chain(pipeline_entry("null1", "tiny", NULL_DIR).route.steps)
    assert not is_chain(pipeline_entry("null-dag", "tiny", NULL_DIR).route.steps)


async def test_a_gone_middle_replica_is_retried_on_another(broker):
    m = await mesh_of(broker, (("a", "a"), ("b", "b1"), ("b", "b2"), ("c", "c")))
    b1, b2 = m.stages[1], m.stages[2]
    routes = m.gateway.routes
    try:
        # every replica up; then b1 goes away, the gateway preferring it (b2 suspect)
        assert (await m.stub.Submit(query(1), timeout=30)).stages[1].replica_id in ("b1", "b2")
        await b1.server.stop(0)
        for _ in range(3):
            for r in routes.replicas("null3", "b"):
                if r.replica_id == "b2":
                    routes.suspect(r)
            reply = await m.stub.Submit(query(2), timeout=30)
            assert (array_from_wire(reply.output) == 2).all()
            assert reply.stages[1].replica_id == "b2"
        assert in_flight(b2) == 0
        await until(lambda: no_leases(m, broker))
    finally:
        await close(m)


async def test_a_gone_middle_replica_with_no_other_fails_unavailable(broker):
    m = await mesh_of(broker)
    try:
        await m.stages[1].server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await m.stub.Submit(query(3), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await until(lambda: no_leases(m, broker))
    finally:
        await close(m)


async def test_a_deadline_passing_mid_route_is_deadline_exceeded_and_leaks_nothing(broker):
    m = await mesh_of(broker)
    gate = hold(m.stages[2])
    try:
        call = m.stub.SubmitStream()
        request = query(4)
        request.deadline_ms = 500
        await call.write(request)
        answer = await call.read()
        assert answer.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        # the gateway's cancel reached the last stage, where the query was held
        await until(lambda: in_flight(m.stages[2]) == 0)
        await until(lambda: no_leases(m, broker))
        await call.done_writing()
    finally:
        gate.set()
        await close(m)


async def test_a_cancelled_query_is_dropped_at_every_replica_on_its_route(broker):
    m = await mesh_of(broker)
    gate = hold(m.stages[1])
    try:
        call = m.stub.Submit(query(5), timeout=30)
        await until(lambda: in_flight(m.stages[1]) == 1)
        call.cancel()
        await until(lambda: in_flight(m.stages[1]) == 0)
        await until(lambda: no_leases(m, broker))
        gate.set()
        # nothing went on to c, and the mesh still serves
        reply = await m.stub.Submit(query(6), timeout=30)
        assert (array_from_wire(reply.output) == 6).all()
        assert in_flight(m.stages[2]) == 0
    finally:
        gate.set()
        await close(m)


async def test_a_stage_that_cannot_reach_the_next_answers_unavailable_with_its_step_done(broker):
    a = await stage(broker, pipeline="null3", stage="a")
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{a.port}")
    forwarded = Forwarded()
    stream = ReplicaStream(stage_pb2_grpc.StageStub(ch), "a", forwarded=forwarded)
    client = await BrokerClient.connect(broker.target)
    buffers = ArenaBuffers(client)
    await buffers.warm_pool("null3")
    try:
        lease, (inp, out_a, out_b) = await buffers.open_and_allocate(
            [(np.uint8, (4096,))] * 3, pool="null3"
        )
        (await buffers.view(inp))[...] = 9
        request = stage_pb2.InferRequest(
            query_id="q", pipeline="null3", lease_id=lease, transport=tensor_pb2.TRANSPORT_REF,
            inputs=[tensor_pb2.Tensor(name="x", ref=inp)],
            outputs=[tensor_pb2.Tensor(name="x", ref=out_a)],
        )  # fmt: skip
        await stream.wait_ready()
        call_id = next(forwarded.ids)
        request.forward.reply_stream = stream.stream_id
        request.forward.reply_call_id = call_id
        hop = request.forward.hops.add(address="127.0.0.1:1")  # nothing listens there
        hop.request.inputs.add(name="x").ref.CopyFrom(out_a)
        hop.request.outputs.add(name="x").ref.CopyFrom(out_b)
        future: asyncio.Future[ForwardAnswer] = asyncio.get_running_loop().create_future()
        forwarded.calls[call_id] = future
        stream.send_forward(call_id, request, 30.0)
        answer = await asyncio.wait_for(future, 30)
        assert answer.result.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert [d.replica_id for d in answer.result.done] == ["null3.a"]
        assert int((await buffers.view(out_a))[0]) == 9  # a's step did finish
        await buffers.release([lease])
    finally:
        await stream.close()
        await buffers.aclose()
        await client.close()
        await ch.close()
        await a.server.stop(0)
        await a.aclose()


async def test_a_stopping_replica_ends_the_streams_its_callers_keep_open(broker):
    # a's forwarder keeps its stream to b open while a lives: a b that is told to stop must end
    # it (and the gateway's) once drained, or its server waits out the whole grace period
    m = await mesh_of(broker, (("a", "a"), ("b", "b1"), ("b", "b2"), ("c", "c")))
    try:
        first = await m.stub.Submit(query(1), timeout=30)
        used = m.stages[1] if first.stages[1].replica_id == "b1" else m.stages[2]
        other = m.stages[2] if used is m.stages[1] else m.stages[1]
        assert f"127.0.0.1:{used.port}" in m.stages[0].servicer.forwarder.addresses
        assert len(used.servicer.streams) >= 2  # the gateway's and a's
        await used.drain()
        await until(lambda: not used.servicer.streams)
        # the mesh goes on through the other b; a stream opened on the stopping one ends at once
        for i in range(2, 6):
            reply = await m.stub.Submit(query(i), timeout=30)
            assert (array_from_wire(reply.output) == i).all()
            assert reply.stages[1].replica_id == other.settings.name
        assert not used.servicer.streams
        await until(lambda: no_leases(m, broker))
    finally:
        await close(m)


async def test_each_finished_step_comes_back_with_its_timings_and_replica_not_its_outputs(broker):
    # the gateway allocated every step's buffers: a step's entry in `done` carries what it reads
    # (timings, replica); the answering step's response still names its outputs
    stages = [await stage(broker, pipeline="null3", stage=name) for name in ("a", "b", "c")]
    addresses = [f"127.0.0.1:{s.port}" for s in stages]
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    forwarded = Forwarded()
    streams = {
        address: ReplicaStream(stage_pb2_grpc.StageStub(ch), address, forwarded=forwarded)
        for address, ch in zip(addresses, channels, strict=True)
    }
    client = await BrokerClient.connect(broker.target)
    buffers = ArenaBuffers(client)
    await buffers.warm_pool("null3")
    try:
        lease, refs = await buffers.open_and_allocate([(np.uint8, (4096,))] * 4, pool="null3")
        (await buffers.view(refs[0]))[...] = 5
        requests = [
            stage_pb2.InferRequest(
                query_id="q",
                pipeline="null3",
                lease_id=lease,
                transport=tensor_pb2.TRANSPORT_REF,
                inputs=[tensor_pb2.Tensor(name="x", ref=refs[k])],
                outputs=[tensor_pb2.Tensor(name="x", ref=refs[k + 1])],
            )  # fmt: skip
            for k in range(3)
        ]
        send = RouteSender(streams.__getitem__, forwarded)
        for _ in range(3):  # each on the streams and senders the first opened
            answer = await send(list(zip(addresses, requests, strict=True)), 30.0)
            assert answer.result.code == 0
            assert [d.replica_id for d in answer.result.done] == ["null3.a", "null3.b"]
            for d in answer.result.done:
                assert not d.outputs and d.timings.batch_size >= 1
            assert [t.ref for t in answer.result.response.outputs] == [refs[3]]
            assert answer.result.response.replica_id == "null3.c"
        assert int((await buffers.view(refs[3]))[0]) == 5
        await buffers.release([lease])
    finally:
        for stream in streams.values():
            await stream.close()
        await buffers.aclose()
        await client.close()
        for ch in channels:
            await ch.close()
        for app in stages:
            await app.server.stop(0)
            await app.aclose()


async def test_a_closed_forwarder_takes_no_request_and_tells_why():
    forwarder = Forwarder()
    await forwarder.close()
    with pytest.raises(Unavailable):
        forwarder.request("127.0.0.1:1", lambda e: None)
    errors: list[CamelotError] = []
    forwarder.send("127.0.0.1:1", stage_pb2.InferRequest(query_id="q"), errors.append)
    assert [type(e) for e in errors] == [Unavailable]
    assert forwarder.addresses == []
