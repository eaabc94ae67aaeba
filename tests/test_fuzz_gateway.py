"""Bad input against a real gateway (processes: broker, replicas, gateway; host backend).

Property: whatever a client sends, the answer is a status from a small allowed set for the
case, and afterwards every process is alive and SERVING, a good query still succeeds and the
broker holds no lease. NaN in a float input is computed, not refused: the pipelines are plain
arithmetic, NaN flows through to the output, and no process or other query is affected.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.dtypes import array_from_wire, wire_from_array
from common.lifecycle import CHANNEL_OPTIONS
from contract.pipeline_config import load_pipeline
from protos import broker_pb2, broker_pb2_grpc, gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.pipelines.runner import make_input
from tests import mesh as testmesh

pytestmark = pytest.mark.slow

FLOAT = "speech-to-text"  # float32 waveform in
INTS = "text-to-img"  # int32 tokens in
MAX_PAYLOAD = 64 * 1024
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
C = grpc.StatusCode


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz")
    tm = asyncio.run(
        testmesh.start(
            run_dir,
            {FLOAT: 1, INTS: 1},
            gateway_args=("--max-payload-bytes", str(MAX_PAYLOAD)),
        )
    )
    channel = grpc.insecure_channel(tm.gateway, options=CHANNEL_OPTIONS)
    yield tm, gateway_pb2_grpc.GatewayStub(channel)
    channel.close()
    asyncio.run(tm.mesh.stop_all())


def code_of(stub, request, timeout=10.0) -> grpc.StatusCode:
    try:
        stub.Submit(request, timeout=timeout)
        return C.OK
    except grpc.RpcError as e:
        return e.code()


def assert_mesh_whole(tm: testmesh.TestMesh, stub) -> None:
    """Every process alive and SERVING; a good query answers; no lease left behind."""
    for proc in tm.mesh.procs:
        assert proc.alive(), f"{proc.name} died:\n{proc.tail()}"
    for target in [tm.gateway, tm.broker_tcp, *(p.target for p in tm.replicas.values())]:
        with grpc.insecure_channel(target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, target
    item = make_input(load_pipeline(FLOAT, "tiny"), 0)
    stub.Submit(gateway_pb2.SubmitRequest(pipeline=FLOAT, input=wire_from_array(item)), timeout=10)
    with grpc.insecure_channel(tm.broker_tcp) as ch:
        broker = broker_pb2_grpc.BrokerStub(ch)
        for _ in range(100):
            if broker.Stats(broker_pb2.StatsRequest(), timeout=5).live_leases == 0:
                break
            time.sleep(0.1)
        assert broker.Stats(broker_pb2.StatsRequest(), timeout=5).live_leases == 0


dtypes = st.integers(min_value=-3, max_value=12)
dims = st.one_of(
    st.integers(min_value=0, max_value=64),
    st.integers(min_value=-(2**63), max_value=-1),
    st.integers(min_value=2**40, max_value=2**63 - 1),
)


@FUZZ
@given(
    pipeline=st.sampled_from([FLOAT, INTS]),
    dtype=dtypes,
    shape=st.lists(dims, max_size=4),
    data=st.binary(max_size=4096),
)
def test_random_tensors_get_a_precise_refusal(gw, pipeline, dtype, shape, data):
    _, stub = gw
    request = gateway_pb2.SubmitRequest(pipeline=pipeline)
    request.input.dtype = dtype
    request.input.shape.extend(shape)
    request.input.data = data
    assert code_of(stub, request) in {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED}


@FUZZ
@given(data=st.data())
def test_right_dtype_and_shape_with_random_bytes_computes(gw, data):
    """Any bit pattern of the right size is a valid tensor (NaN, inf, huge token ids included)."""
    _, stub = gw
    pipeline = data.draw(st.sampled_from([FLOAT, INTS]))
    cfg = load_pipeline(pipeline, "tiny")
    want = make_input(cfg, 0)
    # random bit patterns (NaN, inf, subnormals, huge or negative token ids), from a drawn seed
    seed = data.draw(st.integers(min_value=0, max_value=2**32 - 1))
    fill = data.draw(st.sampled_from([None, 0x00, 0xFF, 0x7F, 0x80]))
    rng = np.random.default_rng(seed)
    raw = rng.bytes(want.nbytes) if fill is None else bytes([fill]) * want.nbytes
    wire = tensor_pb2.WireTensor(dtype=wire_from_array(want).dtype, shape=want.shape, data=raw)
    r = stub.Submit(gateway_pb2.SubmitRequest(pipeline=pipeline, input=wire), timeout=10)
    assert r.output.data


@FUZZ
@given(name=st.text(max_size=40))
def test_unknown_pipeline_is_not_found(gw, name):
    _, stub = gw
    if name in (FLOAT, INTS):
        return
    item = make_input(load_pipeline(FLOAT, "tiny"), 0)
    request = gateway_pb2.SubmitRequest(pipeline=name, input=wire_from_array(item))
    assert code_of(stub, request) == C.NOT_FOUND


def test_dtype_mismatch_and_oversized_payload(gw):
    tm, stub = gw
    item = make_input(load_pipeline(FLOAT, "tiny"), 0)
    as_f16 = wire_from_array(item.astype(np.float16))
    assert code_of(stub, gateway_pb2.SubmitRequest(pipeline=FLOAT, input=as_f16)) == (
        C.INVALID_ARGUMENT
    )
    big = tensor_pb2.WireTensor(
        dtype=as_f16.dtype, shape=[MAX_PAYLOAD], data=bytes(MAX_PAYLOAD + 1)
    )
    try:
        stub.Submit(gateway_pb2.SubmitRequest(pipeline=FLOAT, input=big), timeout=10)
        raise AssertionError("an oversized payload was accepted")
    except grpc.RpcError as e:
        assert e.code() == C.RESOURCE_EXHAUSTED
    assert_mesh_whole(tm, stub)


def test_nan_input_computes_and_propagates(gw):
    tm, stub = gw
    item = make_input(load_pipeline(FLOAT, "tiny"), 0).copy()
    item[::7] = np.nan
    item[1] = np.inf
    r = stub.Submit(
        gateway_pb2.SubmitRequest(pipeline=FLOAT, input=wire_from_array(item)), timeout=10
    )
    out = array_from_wire(r.output)
    assert out.shape == tuple(r.output.shape)
    assert_mesh_whole(tm, stub)


def test_expired_deadlines_are_deadline_exceeded(gw):
    tm, stub = gw
    item = wire_from_array(make_input(load_pipeline(FLOAT, "tiny"), 0))
    for timeout in (1e-6, 1e-4, 1e-3):
        assert code_of(stub, gateway_pb2.SubmitRequest(pipeline=FLOAT, input=item), timeout) == (
            C.DEADLINE_EXCEEDED
        )
    assert_mesh_whole(tm, stub)


def test_after_the_fuzzing_every_process_is_whole(gw):
    """Runs last in the module (pytest keeps file order): the fuzzers above left no damage."""
    tm, stub = gw
    assert_mesh_whole(tm, stub)
