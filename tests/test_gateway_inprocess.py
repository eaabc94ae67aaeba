"""The gateway in this process, with a null stage and a broker beside it (host backend, real gRPC):
Submit and SubmitStream, stage calls on streams, buffers from arenas, and nothing left held."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from common.dtypes import array_from_wire, wire_from_array
from loadgen.submitstream import StreamStatus, SubmitStreamClient
from protos import gateway_pb2, gateway_pb2_grpc
from services.gateway.app import GatewayApp
from services.gateway.app import create_server as create_gateway
from services.gateway.settings import GatewaySettings
from services.stage.app import StageApp
from shmbroker.arena import ArenaBuffers
from shmbroker.client import BrokerClient
from tests.test_broker_server import MiB, running_broker
from tests.test_stage_stream import NULL_DIR, stage


@dataclass
class Mesh:
    gateway: GatewayApp
    stages: list[StageApp]
    channel: grpc.aio.Channel

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channel)


async def mesh_of(broker, **gateway) -> Mesh:
    stages = [await stage(broker, pipeline="null3", stage=name) for name in ("a", "b", "c")]
    routes = tuple(
        ("null3", s.settings.stage, s.settings.stage, f"127.0.0.1:{s.port}") for s in stages
    )
    fields = dict(
        backend="host", port=0, broker=broker.target, pipelines_dir=NULL_DIR,
        static_routes=routes,
    )  # fmt: skip
    fields.update(gateway)
    app = await create_gateway(GatewaySettings(**fields))
    await app.server.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return Mesh(app, stages, ch)


async def close(m: Mesh) -> None:
    await m.channel.close()
    await m.gateway.server.stop(0)
    await m.gateway.aclose()
    for s in m.stages:
        await s.server.stop(0)
        await s.aclose()


@pytest.fixture
async def broker():
    async with running_broker(slab_bytes=16 * MiB, max_bytes=128 * MiB) as r:
        yield r


@pytest.fixture
async def mesh(broker) -> AsyncIterator[Mesh]:
    m = await mesh_of(broker)
    yield m
    await close(m)


def query(i: int, size: int = 4096) -> gateway_pb2.SubmitRequest:
    x = np.full(size, i % 256, dtype=np.uint8)
    return gateway_pb2.SubmitRequest(pipeline="null3", input=wire_from_array(x), query_id=f"q{i}")


async def test_submit_runs_the_chain_and_gives_the_bytes_back(mesh):
    reply = await mesh.stub.Submit(query(7), timeout=30)
    assert [s.stage for s in reply.stages] == ["a", "b", "c"]
    assert (array_from_wire(reply.output) == 7).all()


async def test_queries_on_one_submit_stream_come_back_each_with_its_own_answer(mesh, broker):
    client = SubmitStreamClient(mesh.stub)
    try:
        replies = await asyncio.gather(*(client.submit(query(i), 30.0) for i in range(120)))
        for i, reply in enumerate(replies):
            assert reply.query_id == f"q{i}" and (array_from_wire(reply.output) == i % 256).all()
        # a bad query fails alone, with its status
        bad = query(1, size=10)
        results = await asyncio.gather(
            client.submit(bad, 30.0), client.submit(query(2), 30.0), return_exceptions=True
        )
        assert isinstance(results[0], StreamStatus) and results[0].code_name == "INVALID_ARGUMENT"
        assert isinstance(results[1], gateway_pb2.SubmitResponse)
    finally:
        await client.close()
    stats = await mesh.stub.Stats(gateway_pb2.GatewayStatsRequest(), timeout=10)
    assert stats.live_leases == 0 and stats.inflight == 0 and stats.arenas >= 1
    assert stats.broker_fallbacks == 0
    broker_stats = broker.broker.stats()
    assert broker_stats.live_leases == 0 and broker_stats.live_arenas >= 1


async def test_a_submit_stream_query_needs_a_unique_id(mesh):
    async def requests():
        yield gateway_pb2.SubmitRequest(pipeline="null3", input=query(0).input)

    answers = [a async for a in mesh.stub.SubmitStream(requests(), timeout=30)]
    assert len(answers) == 1 and answers[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_an_unknown_pipeline_is_not_found_on_both_paths(mesh):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await mesh.stub.Submit(gateway_pb2.SubmitRequest(pipeline="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    client = SubmitStreamClient(mesh.stub)
    try:
        with pytest.raises(StreamStatus) as s:
            await client.submit(gateway_pb2.SubmitRequest(pipeline="nope", query_id="x"), 10.0)
        assert s.value.code_name == "NOT_FOUND"
    finally:
        await client.close()


@pytest.mark.parametrize(
    "settings",
    [{"stage_calls": "unary"}, {"arenas": False}, {"transport": "wire"}],
    ids=["unary-stage-calls", "broker-leases", "wire"],
)
async def test_the_paths_kept_for_comparison_give_the_same_answers(broker, settings):
    m = await mesh_of(broker, **settings)
    try:
        replies = await asyncio.gather(*(m.stub.Submit(query(i), timeout=30) for i in range(20)))
        assert all((array_from_wire(r.output) == i).all() for i, r in enumerate(replies))
    finally:
        await close(m)
    assert broker.broker.stats().live_leases == 0


async def test_a_local_client_passes_its_input_and_gets_its_answer_by_shared_memory(mesh, broker):
    client = await BrokerClient.connect(broker.target)
    mine = ArenaBuffers(client)
    await mine.warm_pool("null3")
    try:
        lease, (inp, out) = await mine.open_and_allocate(
            [(np.uint8, (4096,)), (np.uint8, (4096,))], pool="null3"
        )
        (await mine.view(inp))[...] = 42
        reply = await mesh.stub.Submit(
            gateway_pb2.SubmitRequest(pipeline="null3", query_id="shm", input_ref=inp),
            timeout=30,
        )
        assert (array_from_wire(reply.output) == 42).all()  # the answer as bytes
        reply = await mesh.stub.Submit(
            gateway_pb2.SubmitRequest(
                pipeline="null3", query_id="shm2", input_ref=inp, output_ref=out
            ),
            timeout=30,
        )
        assert reply.output_ref == out and not reply.output.data
        assert ((await mine.view(out)) == 42).all()  # the answer in the client's own buffer
        await mine.release([lease])
    finally:
        await mine.aclose()
        await client.close()


async def test_refs_a_client_did_not_get_from_the_broker_are_refused(mesh, broker):
    client = await BrokerClient.connect(broker.target)
    mine = ArenaBuffers(client)
    await mine.warm_pool("null3")
    await mine.warm_pool("other")
    try:
        _, (inp,) = await mine.open_and_allocate([(np.uint8, (4096,))], pool="null3")
        forged = type(inp)()
        forged.CopyFrom(inp)
        forged.offset += 256
        _, (elsewhere,) = await mine.open_and_allocate([(np.uint8, (4096,))], pool="other")
        _, (small,) = await mine.open_and_allocate([(np.uint8, (16,))], pool="null3")
        for ref, code in (
            (forged, grpc.StatusCode.INVALID_ARGUMENT),
            (elsewhere, grpc.StatusCode.PERMISSION_DENIED),
            (small, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await mesh.stub.Submit(
                    gateway_pb2.SubmitRequest(pipeline="null3", input_ref=ref), timeout=30
                )
            assert e.value.code() == code
    finally:
        await mine.aclose()
        await client.close()


def test_gateway_workers_default_to_what_the_cores_carry():
    from services.gateway.settings import auto_workers, parse

    assert auto_workers(16, shared_port=True) == 5
    assert auto_workers(2, shared_port=True) == 1
    assert auto_workers(128, shared_port=True) == 8
    assert auto_workers(16, shared_port=False) == 1
    assert parse(["--port", "0"], {}).workers == 1
    assert parse(["--port", "50052", "--workers", "3"], {}).workers == 3
