"""Fatal GPU faults through real meshes on the host backend, where the fault plug-in raises the
error the stage takes for an illegal address (services/models/fault.py; the real kernel runs in
tests/gpu/test_gpu_faults.py).

A stage process that meets the fault answers the poisoned query INTERNAL, naming itself and the
fault, and exits DEVICE_FAULT_EXIT with that line last; through a planned mesh under load
(loadgen.gpu_faults, the code of the GPU benchmark) the agent restarts it, the mesh serves again,
the load loses nothing and fails at most UNAVAILABLE (or INTERNAL for the few queries batched
with the poison), and no lease is left.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from common import lifecycle
from common.errors import DEVICE_FAULT_EXIT
from loadgen import gpu_faults
from loadgen.meshstate import settle
from protos import gateway_pb2, gateway_pb2_grpc
from tests import mesh
from tests.test_agent import eventually

pytestmark = pytest.mark.slow

# the poison is its own query: at most the rest of its batch was load
BATCH_MATES = 7


async def test_a_stage_whose_batch_faults_answers_internal_and_exits_device_fault(tmp_path):
    m = await mesh.start(tmp_path, {"fault2": 1}, pipelines_dir=str(gpu_faults.FAULTS_DIR))
    try:
        rng = np.random.default_rng(0)
        assert await gpu_faults.submit(m.gateway, gpu_faults.query_input(False, rng), 10) == (
            "OK", "",
        )  # fmt: skip
        status, message = await gpu_faults.submit(m.gateway, gpu_faults.query_input(True, rng), 10)
        assert status == "INTERNAL", message
        assert message == (
            "fatal GPU fault in replica fault2.b.0 (cudaErrorIllegalAddress); the replica restarts"
        )
        b = m.replicas["fault2.b.0"]
        await eventually(lambda: not b.alive(), 30, "the faulted replica's exit")
        assert b.popen.returncode == DEVICE_FAULT_EXIT
        assert b.tail(1) == f"stage: INTERNAL: {message}"
        # the other stage's replica serves on; with b gone the pipeline is unavailable, not hung
        assert m.replicas["fault2.a.0"].alive()
        status, _ = await gpu_faults.submit(m.gateway, gpu_faults.query_input(False, rng), 10)
        assert status == "UNAVAILABLE"
        stats, local = await settle(m.broker_tcp, 30, m.gateway)
        assert stats.live_leases == 0 and local == 0
    finally:
        await m.mesh.stop_all(10)


@pytest.mark.timeout(300)
async def test_a_poisoned_query_under_load_fails_alone_and_the_mesh_recovers(tmp_path):
    out = tmp_path / "results"
    argv = ["--backend", "host", "--sharing", "mps", "--rate", "8", "--duration-s", "6",
            "--out-dir", str(out)]  # fmt: skip
    code = await asyncio.to_thread(gpu_faults.main, argv)
    doc = json.loads((out / "gpu-faults.json").read_text())
    [row] = doc["rows"]
    summary = doc["summary"]
    assert code == 0, doc
    assert row["poison_status"] == "INTERNAL"
    assert "fatal GPU fault in replica fault2.b." in row["poison_message"]
    # the agent restarted the replica that faulted, and the mesh served again by itself
    assert summary["recovered"] and summary["recovery_s"] > 0
    assert [r for r in row["replicas_restarted"] if r.startswith("fault2.b.")], row
    # nothing lost; what failed was retried until it ran out, or was batched with the poison
    assert row["queries_lost"] == 0 and row["queries_sent"] > 0, row
    failed = summary["failed_queries"]
    assert set(failed) <= {"UNAVAILABLE", "INTERNAL"}, failed
    assert failed.get("INTERNAL", 0) <= BATCH_MATES, failed
    assert summary["leases_leaked"] == 0
    assert set(summary) >= {"recovered", "recovery_s", "failed_queries", "leases_leaked"}


async def test_a_replica_is_answered_by_the_gateway_only_through_its_status(tmp_path):
    # the poison's status is the replica's own, not a gateway's retry of it elsewhere: with two
    # replicas of the faulting stage, the poison is still answered INTERNAL (never retried)
    m = await mesh.start(tmp_path, {"fault2": 2}, pipelines_dir=str(gpu_faults.FAULTS_DIR))
    try:
        rng = np.random.default_rng(1)
        item = gpu_faults.query_input(True, rng)
        async with lifecycle.channel(m.gateway) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await gateway_pb2_grpc.GatewayStub(ch).Submit(
                    gateway_pb2.SubmitRequest(pipeline="fault2", input=item), timeout=10
                )
        assert e.value.code() == grpc.StatusCode.INTERNAL
        bs = [m.replicas["fault2.b.0"], m.replicas["fault2.b.1"]]
        await eventually(lambda: sum(not b.alive() for b in bs) == 1, 30, "one replica's exit")
        # no other replica took the poison: the survivor answers
        ok, _ = await gpu_faults.submit(m.gateway, gpu_faults.query_input(False, rng), 10)
        assert ok == "OK"
    finally:
        await m.mesh.stop_all(10)
