"""End to end on the host backend, real processes: broker, stage replicas, gateway."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import numpy as np
import pytest

from common import lifecycle
from common.backend import Backend
from common.dtypes import array_from_wire, wire_from_array
from contract.pipeline_config import list_pipelines, load_pipeline
from protos import broker_pb2, broker_pb2_grpc, gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.pipelines.runner import make_input, run_direct
from services.stage.plugin import ModelContext
from tests import mesh as testmesh

pytestmark = pytest.mark.slow


@pytest.fixture
async def one_each(tmp_path):
    tm = await testmesh.start(tmp_path, {name: 1 for name in list_pipelines()})
    yield tm
    await tm.mesh.stop_all()


async def live_leases(tm: testmesh.TestMesh) -> int:
    async with lifecycle.channel(tm.broker_tcp) as ch:
        stats = await broker_pb2_grpc.BrokerStub(ch).Stats(broker_pb2.StatsRequest(), timeout=5)
    return stats.live_leases


async def wait_leases_zero(tm: testmesh.TestMesh, timeout_s: float = 20.0) -> int:
    n = -1
    for _ in range(int(timeout_s / 0.1)):
        n = await live_leases(tm)
        if n == 0:
            return 0
        await asyncio.sleep(0.1)
    return n


async def test_every_pipeline_matches_a_direct_run_bit_for_bit(one_each):
    ctx = ModelContext(backend=Backend.HOST, xp=np, size="tiny", seed=0)
    async with lifecycle.channel(one_each.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for name in list_pipelines():
            cfg = load_pipeline(name, "tiny")
            for seed in (1, 2):
                item = make_input(cfg, seed)
                want = run_direct(cfg, ctx, item)
                for transport in (tensor_pb2.TRANSPORT_REF, tensor_pb2.TRANSPORT_WIRE):
                    r = await stub.Submit(
                        gateway_pb2.SubmitRequest(
                            pipeline=name, input=wire_from_array(item), transport=transport
                        ),
                        timeout=30,
                    )
                    got = array_from_wire(r.output)
                    assert got.dtype == want.dtype and got.shape == want.shape
                    assert np.array_equal(got, want), (name, seed, transport)
                    assert [s.stage for s in r.stages] == [s.name for s in cfg.stages]
    assert await wait_leases_zero(one_each) == 0


async def test_bad_input_gets_precise_codes_and_spares_other_queries(one_each):
    cfg = load_pipeline("img-to-text", "tiny")
    good = wire_from_array(make_input(cfg, 0))
    wrong_dtype = wire_from_array(make_input(cfg, 0).astype(np.float32))
    wrong_shape = wire_from_array(np.zeros((3, 3), dtype=np.uint8))
    short = tensor_pb2.WireTensor(dtype=good.dtype, shape=good.shape, data=good.data[:-1])
    huge = tensor_pb2.WireTensor(dtype=good.dtype, shape=[1 << 27], data=bytes(1 << 27))
    itt = "img-to-text"
    code = grpc.StatusCode
    cases = [
        (gateway_pb2.SubmitRequest(pipeline="nope", input=good), code.NOT_FOUND),
        (gateway_pb2.SubmitRequest(pipeline=itt, input=wrong_dtype), code.INVALID_ARGUMENT),
        (gateway_pb2.SubmitRequest(pipeline=itt, input=wrong_shape), code.INVALID_ARGUMENT),
        (gateway_pb2.SubmitRequest(pipeline=itt, input=short), code.INVALID_ARGUMENT),
        (gateway_pb2.SubmitRequest(pipeline=itt, input=huge), code.RESOURCE_EXHAUSTED),
    ]
    async with lifecycle.channel(one_each.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        async def good_query() -> None:
            await stub.Submit(
                gateway_pb2.SubmitRequest(pipeline="img-to-text", input=good), timeout=30
            )

        background = [asyncio.create_task(good_query()) for _ in range(20)]
        for request, want in cases:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Submit(request, timeout=30)
            assert e.value.code() == want, (request.pipeline, e.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Submit(
                gateway_pb2.SubmitRequest(pipeline="img-to-text", input=good), timeout=0.0005
            )
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.gather(*background)  # every good query succeeded
    assert await wait_leases_zero(one_each) == 0


async def test_kill_9_of_a_replica_under_load_loses_nothing_silently(tmp_path):
    tm = await testmesh.start(tmp_path, {"video-analytics": 2})
    try:
        cfg = load_pipeline("video-analytics", "tiny")
        item = wire_from_array(make_input(cfg, 3))
        results: dict[str, int] = {}
        async with lifecycle.channel(tm.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)

            async def client(n: int) -> None:
                for _ in range(n):
                    try:
                        await stub.Submit(
                            gateway_pb2.SubmitRequest(pipeline="video-analytics", input=item),
                            timeout=20,
                        )
                        key = "OK"
                    except grpc.aio.AioRpcError as e:
                        key = e.code().name
                    results[key] = results.get(key, 0) + 1

            clients = [asyncio.create_task(client(40)) for _ in range(4)]
            await asyncio.sleep(0.5)
            victim = tm.replicas["video-analytics.detect.0"]
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.gather(*clients)
        assert sum(results.values()) == 160
        assert set(results) <= {"OK", "UNAVAILABLE"}, results
        assert results.get("OK", 0) >= 150, results  # retried on the other replica
        assert await wait_leases_zero(tm) == 0
    finally:
        await tm.mesh.stop_all()
