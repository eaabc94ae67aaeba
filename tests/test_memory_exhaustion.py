"""GPU memory exhaustion (issue #21 item 2): a plan whose replicas do not fit a GPU's memory is
refused before it is stored, whoever made it, and a replica that runs out of memory at start is
reported by its agent and planned around by the scheduler.

Real scheduler and agents in-process (real gRPC servers, real Redis), real replica processes
(tests/agent_fake_stage.py, whose model is the seam) and a real stage process. Memory is what
the stages' profiles say; the test profiles make it large against small GPUs. No timing
assumptions: every wait is for a state.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from common.errors import OUT_OF_MEMORY_EXIT
from common.lifecycle import channel
from protos import admin_pb2, admin_pb2_grpc, agent_pb2, plan_pb2
from scheduler.perfmodel import profilestore
from scheduler.perfmodel.profiles import StageProfile
from scheduler.policy import PipelineInfo, StageInfo
from scheduler.search.policies import names
from scheduler.service.decisions import Decision
from scheduler.service.nodes import NodeState, replica_status
from scheduler.service.server import Scheduler
from services.agent.servicer import AgentApp
from tests.test_agent import environ, running_agent
from tests.test_agent import settings as agent_settings
from tests.test_scheduler_server import auth, make_settings, running, until

GIB = 1 << 30
PIPES = (PipelineInfo("p", (StageInfo("a", max_batch=4), StageInfo("b", max_batch=4)), 100.0),)
ROOT = Path(__file__).resolve().parents[1]


def profile(stage: str, weights_bytes: int) -> StageProfile:
    """A stage of pipeline p that needs `weights_bytes` at any batch (no activations)."""
    shares, batches = (10.0, 50.0, 100.0), (1, 4)
    latency = tuple(tuple(200.0 / s * (1 + 0.2 * b) for b in batches) for s in shares)
    return StageProfile(
        "p", stage, shares, batches, latency, weights_bytes, 0, (0.0, 1.0), (1.0, 1.2), 0.1
    )


def profiles_file(tmp: Path, *profiles: StageProfile) -> str:
    path = tmp / "profiles.json"
    doc = profilestore.to_document(profiles, device="test GPU", date="2025-01-01")
    path.write_text(json.dumps(doc))
    return str(path)


def cuda_heartbeat(*gpus: tuple[int, int]) -> admin_pb2.NodeHeartbeat:
    """Node n1 with one GPU per (total, free) bytes, none of our replicas on them."""
    inventory = agent_pb2.InventoryResponse(node="n1", backend="cuda")
    for i, (total, free) in enumerate(gpus):
        inventory.gpus.add(index=i, sm_count=132, memory_bytes=total, memory_free_bytes=free)
    return admin_pb2.NodeHeartbeat(node="n1", inventory=inventory, sequence=1)


def placement(plan: plan_pb2.Plan) -> dict[str, tuple[str, int]]:
    return {r.replica_id: (r.node, r.gpu) for st in plan.stages for r in st.replicas}


async def test_an_admin_plan_over_a_gpus_memory_is_refused_naming_it_and_the_plan_stays(
    redis_server, tmp_path
) -> None:
    static = tmp_path / "both-on-gpu0.yaml"
    static.write_text(
        "stages:\n"
        "  - {pipeline: p, stage: a, replicas: [{node: n1, gpu: 0, sm_percent: 50}]}\n"
        "  - {pipeline: p, stage: b, replicas: [{node: n1, gpu: 0, sm_percent: 50}]}\n"
    )
    s = make_settings(
        redis_server.url, pipelines=PIPES, policy="even",
        profiles_path=profiles_file(tmp_path, profile("a", 6 * GIB), profile("b", 6 * GIB)),
    )  # fmt: skip
    async with running(s) as (port, sched), channel(f"127.0.0.1:{port}") as ch:
        await admin_pb2_grpc.ControlStub(ch).Heartbeat(
            cuda_heartbeat((8 * GIB, 8 * GIB), (8 * GIB, 8 * GIB)), timeout=5
        )
        await until(lambda: sched.app.plan.epoch >= 1)
        admin = admin_pb2_grpc.AdminStub(ch)
        before = await admin.GetPlan(admin_pb2.GetPlanRequest(), metadata=auth(), timeout=5)
        # even's plan, one stage per 8 GiB GPU, fits
        assert placement(before) == {"p.a.0": ("n1", 0), "p.b.0": ("n1", 1)}
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.SetPolicy(
                admin_pb2.SetPolicyRequest(policy="static", options={"file": str(static)}),
                metadata=auth(), timeout=10,
            )  # fmt: skip
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # the reason names the GPU, what its replicas need and what it has, in bytes
        details = e.value.details() or ""
        assert "n1 GPU 0" in details and str(12 * GIB) in details and str(8 * GIB) in details
        after = await admin.GetPlan(admin_pb2.GetPlanRequest(), metadata=auth(), timeout=5)
        assert after == before
        status = await admin.Status(admin_pb2.StatusRequest(), metadata=auth(), timeout=5)
        assert status.policy == "even"


def decided(sched: Scheduler) -> bool:
    return sched.app.plan.epoch >= 1 or sched.app.decisions.last("p", Decision.FAILED) is not None


MEMORY_AWARE = {"max-load", "min-resource"}  # they pack by memory; the others are refused


@pytest.mark.parametrize("policy", names())
async def test_every_policy_refuses_or_avoids_a_plan_over_what_other_tenants_leave(
    redis_server, tmp_path, policy: str
) -> None:
    static = tmp_path / "one-per-gpu.yaml"
    static.write_text(
        "stages:\n"
        "  - {pipeline: p, stage: a, replicas: [{node: n1, gpu: 0, sm_percent: 50}]}\n"
        "  - {pipeline: p, stage: b, replicas: [{node: n1, gpu: 1, sm_percent: 50}]}\n"
    )
    s = make_settings(
        redis_server.url, pipelines=PIPES, policy=policy, policy_options={"file": str(static)},
        profiles_path=profiles_file(tmp_path, profile("a", 6 * GIB), profile("b", 6 * GIB)),
    )  # fmt: skip
    async with running(s) as (port, sched), channel(f"127.0.0.1:{port}") as ch:
        # two 16 GiB GPUs; another process holds 12 GiB of GPU 0, so 4 GiB are free there
        await admin_pb2_grpc.ControlStub(ch).Heartbeat(
            cuda_heartbeat((16 * GIB, 4 * GIB), (16 * GIB, 16 * GIB)), timeout=5
        )
        await until(lambda: decided(sched), timeout_s=60)
        if policy in MEMORY_AWARE:
            # both 6 GiB stages on GPU 1, none on the 4 GiB GPU 0 leaves
            assert set(placement(sched.app.plan).values()) == {("n1", 1)}
            return
        # the policy's plan puts a 6 GiB stage on GPU 0: refused, recorded, nothing stored
        assert sched.app.plan.epoch == 0
        failed = sched.app.decisions.last("p", Decision.FAILED)
        assert failed is not None and failed.detail.startswith("FAILED_PRECONDITION")
        assert "n1 GPU 0" in failed.detail
        assert str(6 * GIB) in failed.detail and str(4 * GIB) in failed.detail


def test_other_tenants_memory_is_read_only_from_a_gpu_none_of_our_replicas_runs_on() -> None:
    hb = cuda_heartbeat((16 * GIB, 4 * GIB), (16 * GIB, 10 * GIB))
    ours = plan_pb2.Endpoint(replica=plan_pb2.ReplicaPlan(replica_id="p.a.0", node="n1", gpu=1))
    n1 = NodeState("n1", "", hb.inventory, [ours], 0, 0.0)
    n1.observe_memory()
    # GPU 0: 12 GiB held by another process; GPU 1's 6 GiB in use may be our replica's own
    assert n1.others_bytes == {0: 12 * GIB}
    assert [g.memory_bytes for g in n1.info().gpus] == [4 * GIB, 16 * GIB]
    n1.memory_caps[1] = 5 * GIB
    assert [g.memory_bytes for g in n1.info().gpus] == [4 * GIB, 5 * GIB]


def test_the_status_of_a_planned_replica_its_agent_could_not_start_says_why() -> None:
    plan = plan_pb2.Plan(epoch=4)
    plan.stages.add(pipeline="p", stage="a").replicas.add(replica_id="p.a.0", node="n1")
    failure = agent_pb2.StartFailure(
        replica=plan_pb2.Endpoint(replica=plan.stages[0].replicas[0], pipeline="p", stage="a"),
        epoch=4, failures=2, out_of_memory=True,
        reason="replica p.a.0.2 exited with 3: stage: RESOURCE_EXHAUSTED: out of device memory",
    )  # fmt: skip
    n1 = NodeState("n1", "", agent_pb2.InventoryResponse(), [], 0, 0.0, start_failures=[failure])
    (status,) = replica_status(plan, [n1])
    assert status.phase == admin_pb2.REPLICA_PHASE_PLANNED
    assert status.detail == f"its agent failed to start it 2 time(s): {failure.reason}"


@contextlib.asynccontextmanager
async def agents(tmp: Path, scheduler: str) -> AsyncIterator[tuple[AgentApp, AgentApp]]:
    """Agents n1 (whose replicas run out of GPU memory at start) and n2, on the host backend."""
    full = environ(FAKE_STAGE_OUT_OF_MEMORY="CUDA out of memory. Tried to allocate 10.00 GiB")
    n1 = agent_settings(tmp / "n1", node="n1", scheduler_addr=scheduler, share_mode="none",
                        restart_backoff_s=0.5)  # fmt: skip
    n2 = agent_settings(tmp / "n2", node="n2", scheduler_addr=scheduler, share_mode="none")
    async with running_agent(n1, full) as (a1, _), running_agent(n2) as (a2, _):
        yield a1, a2


async def test_a_replica_out_of_gpu_memory_at_start_is_reported_and_planned_around(
    redis_server, tmp_path
) -> None:
    # one stage of 10 GiB; each host node counts as one device of 16 GiB: one replica per node
    s = make_settings(
        redis_server.url, policy="min-resource", node_timeout_s=60.0,
        pipelines=(PipelineInfo("p", (StageInfo("a", max_batch=4),), 100.0),),
        profiles_path=profiles_file(tmp_path, profile("a", 10 * GIB)),
    )  # fmt: skip
    async with running(s) as (port, sched):
        app = sched.app
        # both nodes known before their agents start, n1 first: min-resource packs the one
        # replica onto n1 (the first node, then the plan in force it keeps), whichever agent
        # beats first
        for node in ("n1", "n2"):
            inventory = agent_pb2.InventoryResponse(node=node, backend="host")
            await app.heartbeat(admin_pb2.NodeHeartbeat(node=node, inventory=inventory))
        await until(lambda: app.plan.epoch >= 1, timeout_s=30)
        assert set(placement(app.plan).values()) == {("n1", -1)}
        async with agents(tmp_path, f"127.0.0.1:{port}") as (a1, a2):
            # n1's agent cannot start it; the re-plan puts it on n2
            await until(lambda: set(placement(app.plan).values()) == {("n2", -1)}, timeout_s=90)
            # the agent reported it with its reason; the scheduler capped that device below
            # what the failed plan put there and recorded why
            failed = app.decisions.last("p", Decision.FAILED)
            assert failed is not None and 1 <= failed.epoch < app.plan.epoch
            assert failed.reason == "GPU memory ran out: p.a.0 on n1 GPU -1"
            assert "Tried to allocate 10.00 GiB" in failed.detail
            assert app.known.nodes["n1"].memory_caps == {-1: 10 * GIB - 1}
            # the new epoch runs: n2 serves the replica, and n1's agent, which has it no more,
            # stops trying to start it
            await until(lambda: a2.agent.epoch == app.plan.epoch, timeout_s=60)
            assert [i.state.name for i in a2.agent.primary.values()] == ["READY"]
            await until(lambda: a1.agent.epoch == app.plan.epoch, timeout_s=60)
            assert a1.agent.start_failures() == [] and a1.agent.endpoints() == []


def test_a_stage_whose_model_does_not_fit_its_gpu_exits_out_of_memory_in_one_line(
    tmp_path,
) -> None:
    (tmp_path / "too-big.yaml").write_text(
        "name: too-big\n"
        "generator: services.models.null:payload\n"
        "output: a.y\n"
        "stages:\n"
        "  - name: a\n"
        "    model: tests.oom_model:too_big\n"
        "    inputs: {x: input}\n"
        "sizes:\n"
        "  tiny:\n"
        "    qos_p99_ms: 100\n"
        "    input: {name: x, dtype: uint8, shape: [16]}\n"
    )
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "services.stage", "--pipeline", "too-big", "--stage", "a",
         "--backend", "host", "--pipelines-dir", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    # the exit status the agent reads as "out of memory", and the one line it reports
    assert done.returncode == OUT_OF_MEMORY_EXIT, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stage: RESOURCE_EXHAUSTED: "), done.stderr
    assert "OutOfMemoryError" in lines[0] and "10,737,418,240 bytes" in lines[0]
