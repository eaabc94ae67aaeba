"""A gateway whose own GPU copy meets a fatal fault (its CUDA context is lost: under MPS a fault in
any client of the GPU's server takes every client's) fails that query with the fault's status,
stops serving and ends with DEVICE_FAULT_EXIT, so that its supervisor starts a clean process;
any other failure of a copy stays that query's. A real gateway, broker and null stages in this
process; the fault comes in at the seam where the gateway writes a query's input into its
buffer (`query._fill`), as CuPy raises it."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import DeviceFault
from services.gateway import query as gateway_query
from services.gateway.app import SERVICE_NAME
from tests.test_broker_server import MiB, running_broker
from tests.test_forward import mesh_of
from tests.test_gateway_inprocess import close
from tests.test_gateway_inprocess import query as null3_query
from tests.test_gpu_faults import CUDARuntimeError


@pytest.fixture
async def broker():
    async with running_broker(slab_bytes=16 * MiB, max_bytes=128 * MiB) as r:
        yield r


def fail_copies(monkeypatch, error: Exception) -> list[int]:
    """Every copy of a query's input into its buffer raises `error`; counts the copies."""
    calls: list[int] = []

    def broken(view, item: np.ndarray) -> None:
        calls.append(item.nbytes)
        raise error

    monkeypatch.setattr(gateway_query, "_fill", broken)
    return calls


async def serving(m) -> int:
    stub = health_pb2_grpc.HealthStub(m.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    return reply.status


@pytest.mark.parametrize(
    ("code", "status"),
    [(700, grpc.StatusCode.INTERNAL), (805, grpc.StatusCode.UNAVAILABLE)],
)
async def test_a_fatal_fault_in_the_gateways_copy_fails_the_query_and_ends_the_process(
    broker, monkeypatch, code, status
):
    m = await mesh_of(broker)
    exits: list[DeviceFault] = []
    m.gateway.exit = exits.append
    await m.gateway.health.set(True)  # as serve() does after warm-up
    try:
        fail_copies(monkeypatch, CUDARuntimeError(code))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await m.stub.Submit(null3_query(1), timeout=30)
        # a kernel fault is INTERNAL; the MPS server's own failure leaves the query innocent
        assert e.value.code() == status
        await asyncio.wait_for(m.gateway._fault_task, 10)
        # one exit, however many queries meet the dead context before it
        with pytest.raises(grpc.aio.AioRpcError):
            await m.stub.Submit(null3_query(2), timeout=30)
        assert len(exits) == 1 and exits[0].fault
        assert await serving(m) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await close(m)


async def test_any_other_failure_of_a_copy_is_that_querys_alone(broker, monkeypatch):
    m = await mesh_of(broker)
    exits: list[DeviceFault] = []
    m.gateway.exit = exits.append
    await m.gateway.health.set(True)
    try:
        calls = fail_copies(monkeypatch, ValueError("shapes do not match"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await m.stub.Submit(null3_query(1), timeout=30)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert calls and m.gateway._fault_task is None and not exits
        assert await serving(m) == health_pb2.HealthCheckResponse.SERVING
        # the next query, with copies that work, is answered
        monkeypatch.undo()
        reply = await m.stub.Submit(null3_query(3), timeout=30)
        assert [s.stage for s in reply.stages] == ["a", "b", "c"]
    finally:
        await close(m)
