"""A stage replica in this process (null model, host backend, real broker and gRPC) driven over
InferStream by the gateway's ReplicaStream: many calls on one stream, each answered once with
its own status, and the unary Infer's semantics kept (errors, back-pressure, drain, death)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.dtypes import array_from_wire, wire_from_array
from common.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from protos import stage_pb2, stage_pb2_grpc, tensor_pb2
from services.gateway.streams import ReplicaStream
from services.stage.app import StageApp, create_server
from services.stage.settings import StageSettings
from shmbroker.arena import ArenaBuffers
from shmbroker.client import BrokerClient
from tests.test_broker_server import MiB, running_broker

NULL_DIR = str(Path(__file__).resolve().parents[1] / "services" / "pipelines" / "null")


@pytest.fixture
async def broker():
    async with running_broker(slab_bytes=4 * MiB, max_bytes=32 * MiB) as r:
        yield r


async def stage(broker, **overrides) -> StageApp:
    fields = dict(
        pipeline="null1", stage="forward", backend="host", broker=broker.target,
        pipelines_dir=NULL_DIR, port=0, max_wait_us=0,
    )  # fmt: skip
    fields.update(overrides)
    app = await create_server(StageSettings(**fields))
    await app.server.start()
    await app.warm_up()
    return app


@pytest.fixture
async def replica(broker) -> AsyncIterator[StageApp]:
    app = await stage(broker)
    yield app
    await app.server.stop(0)
    await app.aclose()


@pytest.fixture
async def channel(replica) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    yield ch
    await ch.close()


def wire_request(x: np.ndarray, query_id: str = "q") -> stage_pb2.InferRequest:
    return stage_pb2.InferRequest(
        query_id=query_id,
        pipeline="null1",
        transport=tensor_pb2.TRANSPORT_WIRE,
        inputs=[tensor_pb2.Tensor(name="x", wire=wire_from_array(x))],
    )


async def test_many_calls_in_flight_on_one_stream_each_get_their_own_answer(channel):
    stream = ReplicaStream(stage_pb2_grpc.StageStub(channel), "replica")
    items = [np.full(4096, i % 251, dtype=np.uint8) for i in range(200)]
    answers = await asyncio.gather(
        *(stream.infer(wire_request(x, f"q{i}"), 30.0) for i, x in enumerate(items))
    )
    for x, answer in zip(items, answers, strict=True):
        np.testing.assert_array_equal(array_from_wire(answer.outputs[0].wire), x)
        assert answer.replica_id and answer.timings.batch_size >= 1
    # calls made together shared batches
    assert max(a.timings.batch_size for a in answers) > 1
    assert stream.in_flight == 0
    await stream.close()


async def test_a_bad_call_fails_alone_with_its_status(channel):
    stream = ReplicaStream(stage_pb2_grpc.StageStub(channel), "replica")
    good = stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0)
    bad = stream.infer(wire_request(np.zeros(17, np.uint8)), 30.0)
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(results[0], stage_pb2.InferResponse)
    assert isinstance(results[1], InvalidArgument) and "shape" in results[1].message
    await stream.close()


async def test_refs_from_an_arena_flow_through_and_other_leases_are_refused(broker, channel):
    client = await BrokerClient.connect(broker.target)
    buffers = ArenaBuffers(client)
    await buffers.warm_pool("null1")
    stream = ReplicaStream(stage_pb2_grpc.StageStub(channel), "replica")
    try:
        lease, (inp, out) = await buffers.open_and_allocate(
            [(np.uint8, (4096,)), (np.uint8, (4096,))], pool="null1"
        )
        (await buffers.view(inp))[...] = 7
        request = stage_pb2.InferRequest(
            query_id="q",
            pipeline="null1",
            lease_id=lease,
            transport=tensor_pb2.TRANSPORT_REF,
            inputs=[tensor_pb2.Tensor(name="x", ref=inp)],
            outputs=[tensor_pb2.Tensor(name="x", ref=out)],
        )
        answer = await stream.infer(request, 30.0)
        assert answer.outputs[0].ref == out
        assert int((await buffers.view(out))[100]) == 7
        # the same input under another query's lease is refused, that call only
        other, _ = await buffers.open_and_allocate([(np.uint8, (8,))], pool="null1")
        request.lease_id = other
        with pytest.raises(PermissionDenied):
            await stream.infer(request, 30.0)
        # a node-local client's lease named by the request may hold inputs and outputs
        request.client_lease_id = lease
        answer = await stream.infer(request, 30.0)
        assert answer.outputs[0].ref == out
        await buffers.release([lease, other])
    finally:
        await stream.close()
        await buffers.aclose()
        await client.close()


async def test_a_full_queue_answers_resource_exhausted_with_a_retry_hint(broker):
    app = await stage(broker, max_queue=2)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stream = ReplicaStream(stage_pb2_grpc.StageStub(ch), "replica")
    try:
        # sent in one message: the replica queues them before its batcher runs
        results = await asyncio.gather(
            *(stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0) for _ in range(10)),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert refused and all(r.retry_after_ms for r in refused)
        assert any(isinstance(r, stage_pb2.InferResponse) for r in results)
    finally:
        await stream.close()
        await ch.close()
        await app.server.stop(0)
        await app.aclose()


async def test_a_draining_replica_answers_unavailable_per_call(replica, channel):
    stream = ReplicaStream(stage_pb2_grpc.StageStub(channel), "replica")
    await stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0)
    await stage_pb2_grpc.StageStub(channel).Drain(stage_pb2.DrainRequest(), timeout=30)
    with pytest.raises(Unavailable):
        await stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0)
    await stream.close()


async def test_a_replica_that_goes_away_fails_calls_unavailable_and_says_so(broker):
    app = await stage(broker)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    broken: list[str] = []
    stream = ReplicaStream(
        stage_pb2_grpc.StageStub(ch), "replica", lambda address, e: broken.append(address)
    )
    try:
        await stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0)
        await app.server.stop(0)
        with pytest.raises(Unavailable):
            await stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0)
        # told of the break (once per stream that broke: the call may have opened a new one)
        assert broken and set(broken) == {"replica"}
    finally:
        await stream.close()
        await ch.close()
        await app.aclose()


async def test_a_broken_stream_leaves_no_request_sender_behind(broker):
    # gRPC consumes a stream's requests in a task of its own; were the generator of a call that
    # ended left waiting, that task stayed pending ("Task was destroyed but it is pending" at
    # exit, seen in the fault runs) and would take the next call's requests at its next wake-up
    app = await stage(broker)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stream = ReplicaStream(stage_pb2_grpc.StageStub(ch), "replica", lambda address, e: None)

    def senders() -> list[asyncio.Task]:
        return [
            t for t in asyncio.all_tasks()
            if not t.done() and "_consume_request_iterator" in repr(t.get_coro())
        ]  # fmt: skip

    try:
        await stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0)
        assert senders()
        await app.server.stop(0)
        with pytest.raises(Unavailable):
            await stream.infer(wire_request(np.zeros(4096, np.uint8)), 30.0)
        for _ in range(1500):
            if not senders():
                break
            await asyncio.sleep(0.02)
        assert not senders()
    finally:
        await stream.close()
        await ch.close()
        await app.aclose()


async def test_unary_infer_still_serves(channel):
    answer = await stage_pb2_grpc.StageStub(channel).Infer(
        wire_request(np.full(4096, 3, np.uint8)), timeout=30
    )
    assert int(array_from_wire(answer.outputs[0].wire)[0]) == 3
