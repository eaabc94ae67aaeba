"""Refs and limits against real processes (broker, two pipelines' replicas, gateway; host).

A stage replica reads only refs the broker signed, of the current broker generation, under the
query's lease, in its own pipeline's pool; anything else gets a precise status and the replica
keeps serving. The gateway answers a full queue and an oversized payload with RESOURCE_EXHAUSTED;
only the full queue carries a `retry-after-ms` hint (the same payload will never fit).
"""

from __future__ import annotations

import asyncio
import secrets

import grpc
import numpy as np
import pytest

from common import lifecycle
from common.dtypes import from_numpy, wire_from_array
from common.errors import RETRY_AFTER_KEY
from contract.pipeline_config import load_pipeline
from protos import (
    broker_pb2,
    broker_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    stage_pb2,
    stage_pb2_grpc,
    tensor_pb2,
)
from services.pipelines.runner import make_input
from shmbroker.client import BrokerClient
from tests import mesh as testmesh

pytestmark = pytest.mark.slow

A, B = "img-to-text", "text-to-img"
C = grpc.StatusCode
MAX_PAYLOAD = 32 * 1024


@pytest.fixture
async def tm(tmp_path):
    m = await testmesh.start(
        tmp_path,
        {A: 1, B: 1},
        gateway_args=("--max-inflight", "2", "--max-payload-bytes", str(MAX_PAYLOAD)),
    )
    yield m
    await m.mesh.stop_all()


def first_stage(m: testmesh.TestMesh, pipeline: str) -> tuple[str, str, str, np.dtype, tuple]:
    cfg = load_pipeline(pipeline, "tiny")
    stage = cfg.stages[0]
    target = m.replicas[f"{pipeline}.{stage.name}.0"].target
    spec = cfg.input
    return target, stage.name, spec.name, np.dtype(spec.dtype), tuple(spec.shape)


async def infer(target: str, request: stage_pb2.InferRequest) -> grpc.StatusCode:
    async with lifecycle.channel(target) as ch:
        try:
            await stage_pb2_grpc.StageStub(ch).Infer(request, timeout=10)
            return C.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


def request_for(pipeline: str, input_name: str, ref, lease: str) -> stage_pb2.InferRequest:
    return stage_pb2.InferRequest(
        query_id="sec",
        pipeline=pipeline,
        lease_id=lease,
        transport=tensor_pb2.TRANSPORT_REF,
        inputs=[tensor_pb2.Tensor(name=input_name, ref=ref)],
    )


def edited(ref: tensor_pb2.TensorRef, **changes) -> tensor_pb2.TensorRef:
    out = tensor_pb2.TensorRef()
    out.CopyFrom(ref)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


async def test_forged_stale_foreign_and_ended_refs_are_refused(tm):
    target, _, name, dtype, shape = first_stage(tm, A)
    b_target, _, b_name, b_dtype, b_shape = first_stage(tm, B)
    async with await BrokerClient.connect(tm.broker) as client:
        lease_a, (ref,) = await client.open_and_allocate([(dtype, shape)], pool=A, ttl_s=30)
        lease_b, (ref_b,) = await client.open_and_allocate([(b_dtype, b_shape)], pool=B, ttl_s=30)
        # a buffer of pool A shaped like B's input, under A's lease
        (a_like_b,) = await client.allocate([(lease_a, b_dtype, b_shape)])
        view = await client.view(ref)
        view[...] = np.zeros(shape, dtype)

        # the well-formed request works: the refusals below are about the ref, not the test
        assert await infer(target, request_for(A, name, ref, lease_a)) == C.OK
        cases = {
            "another lease's request": (request_for(A, name, ref, lease_b), {C.PERMISSION_DENIED}),
            "lease id edited to match": (
                request_for(A, name, edited(ref, lease_id=lease_b), lease_b),
                {C.INVALID_ARGUMENT},
            ),
            "random tag": (
                request_for(A, name, edited(ref, tag=secrets.token_bytes(16)), lease_a),
                {C.INVALID_ARGUMENT},
            ),
            "offset edited": (
                request_for(A, name, edited(ref, offset=ref.offset + 64), lease_a),
                {C.INVALID_ARGUMENT},
            ),
            "past the slab": (
                request_for(A, name, edited(ref, offset=2**40), lease_a),
                {C.INVALID_ARGUMENT},
            ),
            "older generation": (
                request_for(A, name, edited(ref, slab_generation=ref.slab_generation - 1), lease_a),
                {C.FAILED_PRECONDITION},
            ),
            "newer generation": (
                request_for(A, name, edited(ref, slab_generation=ref.slab_generation + 1), lease_a),
                {C.INVALID_ARGUMENT},
            ),
            "unknown slab": (
                request_for(A, name, edited(ref, slab_id="nope"), lease_a),
                {C.INVALID_ARGUMENT},
            ),
            "pool A ref at pipeline B's stage, under A's lease": (
                request_for(B, b_name, a_like_b, lease_a),
                {C.PERMISSION_DENIED},
            ),
            "pool B ref at pipeline A's stage": (
                request_for(A, name, ref_b, lease_b),
                {C.PERMISSION_DENIED, C.INVALID_ARGUMENT},
            ),
        }
        for what, (request, allowed) in cases.items():
            stage = b_target if request.pipeline == B else target
            got = await infer(stage, request)
            assert got in allowed, f"{what}: {got.name}, expected one of {allowed}"

        # a caller-given output buffer of the wrong dtype is refused, and named as an output
        (wrong,) = await client.allocate([(lease_a, dtype, shape)])
        bad_out = request_for(A, name, ref, lease_a)
        bad_out.outputs.append(tensor_pb2.Tensor(name="image", ref=wrong))
        async with lifecycle.channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stage_pb2_grpc.StageStub(ch).Infer(bad_out, timeout=10)
        assert err.value.code() == C.INVALID_ARGUMENT
        assert "output buffer 'image' has dtype uint8" in (err.value.details() or "")

        # a ref whose lease has ended can no longer get outputs written under it
        await client.release([lease_a])
        assert await infer(target, request_for(A, name, ref, lease_a)) in {
            C.FAILED_PRECONDITION,
            C.NOT_FOUND,
        }
        await client.release([lease_b])

    for proc in tm.mesh.procs:
        assert proc.alive(), f"{proc.name} died:\n{proc.tail()}"
    # and both pipelines still serve end to end
    async with lifecycle.channel(tm.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for p in (A, B):
            item = wire_from_array(make_input(load_pipeline(p, "tiny"), 0))
            await stub.Submit(gateway_pb2.SubmitRequest(pipeline=p, input=item), timeout=10)


async def test_a_full_gateway_says_when_to_retry_and_a_huge_payload_is_refused(tm):
    item = wire_from_array(make_input(load_pipeline(A, "tiny"), 0))
    async with lifecycle.channel(tm.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        codes: list[grpc.StatusCode] = []
        hints: list[str] = []

        async def one() -> None:
            call = stub.Submit(gateway_pb2.SubmitRequest(pipeline=A, input=item), timeout=20)
            try:
                await call
                codes.append(C.OK)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
                if e.code() == C.RESOURCE_EXHAUSTED:
                    hints.extend(
                        v for k, v in (e.trailing_metadata() or ()) if k == RETRY_AFTER_KEY
                    )

        await asyncio.gather(*(one() for _ in range(40)))
        assert set(codes) <= {C.OK, C.RESOURCE_EXHAUSTED}
        assert C.OK in codes and C.RESOURCE_EXHAUSTED in codes
        assert len(hints) == codes.count(C.RESOURCE_EXHAUSTED)
        assert all(int(h) > 0 for h in hints)

        big = tensor_pb2.WireTensor(
            dtype=from_numpy(np.uint8), shape=[MAX_PAYLOAD + 1], data=bytes(MAX_PAYLOAD + 1)
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Submit(gateway_pb2.SubmitRequest(pipeline=A, input=big), timeout=10)
        assert e.value.code() == C.RESOURCE_EXHAUSTED
        assert RETRY_AFTER_KEY not in dict(e.value.trailing_metadata() or ())

    async with lifecycle.channel(tm.broker_tcp) as ch:
        broker = broker_pb2_grpc.BrokerStub(ch)
        for _ in range(100):
            if (await broker.Stats(broker_pb2.StatsRequest(), timeout=5)).live_leases == 0:
                break
            await asyncio.sleep(0.1)
        assert (await broker.Stats(broker_pb2.StatsRequest(), timeout=5)).live_leases == 0
