"""A stage refuses refs whose lease has ended (a replica in this process: null model, host
backend, real broker and gRPC).

A released lease's buffers may already hold another query's data, and a view of a ref cannot
tell: so a ref under a broker lease that is no longer open is refused FAILED_PRECONDITION on
every path (unary Infer and InferStream; outputs as bytes, into buffers the replica allocates,
or into buffers the caller gave), nothing is computed from it or written into it, and the
replica logs no traceback, since the fault is the caller's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from common.errors import CamelotError, FailedPrecondition, NotFound
from protos import stage_pb2, stage_pb2_grpc, tensor_pb2
from services.gateway.streams import ReplicaStream
from services.stage.app import StageApp
from shmbroker.client import BrokerClient
from tests.test_broker_server import MiB, running_broker
from tests.test_stage_stream import stage

C = grpc.StatusCode
SHAPE = (4096,)
SENTINEL = 0xAB


@pytest.fixture
async def broker():
    async with running_broker(slab_bytes=4 * MiB, max_bytes=32 * MiB) as r:
        yield r


@pytest.fixture
async def replica(broker) -> AsyncIterator[StageApp]:
    app = await stage(broker)
    yield app
    await app.server.stop(0)
    await app.aclose()


@pytest.fixture
async def client(broker) -> AsyncIterator[BrokerClient]:
    c = await BrokerClient.connect(broker.target)
    yield c
    await c.close()


@pytest.fixture
async def channel(replica) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}")
    yield ch
    await ch.close()


async def unary(channel: grpc.aio.Channel, request: stage_pb2.InferRequest) -> grpc.StatusCode:
    try:
        await stage_pb2_grpc.StageStub(channel).Infer(request, timeout=30)
        return C.OK
    except grpc.aio.AioRpcError as e:
        return e.code()


async def streamed(channel: grpc.aio.Channel, request: stage_pb2.InferRequest) -> grpc.StatusCode:
    stream = ReplicaStream(stage_pb2_grpc.StageStub(channel), "replica")
    try:
        await stream.infer(request, 30.0)
        return C.OK
    except CamelotError as e:
        return e.code
    finally:
        await stream.close()


CALLS = {"unary": unary, "stream": streamed}
# how the outputs leave: bytes, into buffers the replica allocates, into buffers the caller gave
OUTPUTS = ("wire", "allocated", "given")


def request_for(
    lease: str, inp: tensor_pb2.TensorRef, out: tensor_pb2.TensorRef, outputs: str
) -> stage_pb2.InferRequest:
    request = stage_pb2.InferRequest(
        query_id="q",
        pipeline="null1",
        lease_id=lease,
        transport=tensor_pb2.TRANSPORT_WIRE if outputs == "wire" else tensor_pb2.TRANSPORT_REF,
        inputs=[tensor_pb2.Tensor(name="x", ref=inp)],
    )
    if outputs == "given":
        request.outputs.append(tensor_pb2.Tensor(name="x", ref=out))
    return request


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("outputs", OUTPUTS)
@pytest.mark.parametrize("call", sorted(CALLS))
async def test_a_ref_of_a_released_lease_is_refused_and_logs_no_traceback(
    client, channel, caplog, call, outputs
):
    caplog.set_level(logging.INFO)
    send = CALLS[call]
    lease, (inp, out) = await client.open_and_allocate(
        [(np.uint8, SHAPE), (np.uint8, SHAPE)], pool="null1", ttl_s=30
    )
    (await client.view(inp))[...] = 7
    # the same request while the lease is open is served: the refusal below is the lease's
    assert await send(channel, request_for(lease, inp, out, outputs)) == C.OK
    out_view = await client.view(out)
    out_view[...] = SENTINEL

    await client.release([lease])
    assert await send(channel, request_for(lease, inp, out, outputs)) == C.FAILED_PRECONDITION
    # nothing was written into the freed buffer the caller gave
    assert int(out_view.min()) == int(out_view.max()) == SENTINEL
    assert tracebacks(caplog) == []


async def test_on_a_stream_only_the_call_under_the_released_lease_fails(client, channel):
    (live, (inp,)) = await client.open_and_allocate([(np.uint8, SHAPE)], pool="null1", ttl_s=30)
    (ended, (old,)) = await client.open_and_allocate([(np.uint8, SHAPE)], pool="null1", ttl_s=30)
    (await client.view(inp))[...] = 5
    await client.release([ended])
    stream = ReplicaStream(stage_pb2_grpc.StageStub(channel), "replica")
    try:
        good = stream.infer(request_for(live, inp, inp, "wire"), 30.0)
        bad = stream.infer(request_for(ended, old, old, "wire"), 30.0)
        results = await asyncio.gather(good, bad, return_exceptions=True)
    finally:
        await stream.close()
        await client.release([live])
    assert isinstance(results[0], stage_pb2.InferResponse)
    assert isinstance(results[1], FailedPrecondition)


async def test_the_broker_names_the_leases_that_are_not_open_and_changes_none(client):
    open_, _ = await client.open_and_allocate([(np.uint8, (8,))], pool="null1", ttl_s=30)
    ended, _ = await client.open_and_allocate([(np.uint8, (8,))], pool="null1", ttl_s=30)
    await client.release([ended])
    closed = await client.closed_leases([open_, ended, "never-issued"])
    assert sorted(closed) == sorted([ended, "never-issued"])
    assert isinstance(closed[ended], FailedPrecondition)
    assert isinstance(closed["never-issued"], NotFound)
    # asking changed nothing: the open lease is still open and still releases once
    assert (await client.release([open_])).released == 1
