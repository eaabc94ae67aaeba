"""The node agent with real replica processes (tests/agent_fake_stage.py, a real gRPC Stage
server whose model is the seam), a real gRPC agent server, and real routes clients."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from common import lifecycle
from protos import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    plan_pb2,
    stage_pb2,
    stage_pb2_grpc,
)
from services.agent.servicer import AgentApp, create_server
from services.agent.settings import DEFAULT_REPLICA_COMMAND, AgentSettings
from services.launcher import Mesh, wait_healthy
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
FAKE_COMMAND = tuple(
    "tests.agent_fake_stage" if word == "services.stage" else word
    for word in DEFAULT_REPLICA_COMMAND
)


def settings(run_dir: Path, **overrides: object) -> AgentSettings:
    base = AgentSettings(
        node="n1",
        port=0,
        backend="host",
        share_mode="mps",
        mps="off",
        run_dir=str(run_dir),
        replica_command=FAKE_COMMAND,
        ready_timeout_s=20.0,
        shift_s=0.3,
        drain_timeout_s=5.0,
        kill_grace_s=5.0,
        restart_backoff_s=0.2,
        heartbeat_s=0.1,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def environ(**extra: str) -> dict[str, str]:
    # keep what the environment already puts on the path (site dirs of a carried install)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def replica(
    rid: str,
    sm_percent: float = 50.0,
    max_batch: int = 4,
    groups: tuple[int, ...] = (),
    mode: int = plan_pb2.SHARE_MODE_UNSPECIFIED,
    gpu: int = -1,
) -> plan_pb2.Endpoint:
    pipeline, stage, _ = rid.split(".")
    return plan_pb2.Endpoint(
        pipeline=pipeline,
        stage=stage,
        replica=plan_pb2.ReplicaPlan(
            replica_id=rid,
            gpu=gpu,
            sm_percent=sm_percent,
            sm_groups=list(groups),
            max_batch=max_batch,
            max_wait_us=1000,
            mode=mode,  # type: ignore[arg-type]
        ),
    )


def assignment(epoch: int, *replicas: plan_pb2.Endpoint) -> agent_pb2.Assignment:
    return agent_pb2.Assignment(epoch=epoch, node="n1", replicas=list(replicas))


@contextlib.asynccontextmanager
async def running_agent(
    s: AgentSettings, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[AgentApp, agent_pb2_grpc.AgentStub]]:
    app = await create_server(s, environ=env or environ())
    await app.server.start()
    await app.health.set(True)
    await app.start_heartbeat()
    ch = lifecycle.channel(f"127.0.0.1:{app.port}")
    try:
        yield app, agent_pb2_grpc.AgentStub(ch)
    finally:
        await ch.close()
        await app.aclose()
        await app.server.stop(0)


class RoutedClient:
    """Sends Infer in a loop to a READY instance of one replica, chosen from the agent's routes."""

    def __init__(self, agent: agent_pb2_grpc.AgentStub, replica_id: str) -> None:
        self.agent = agent
        self.replica_id = replica_id
        self.routes: plan_pb2.Routes | None = None
        self.ok = 0
        self.failures: list[str] = []
        self.served_by: set[str] = set()
        self._stop = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def watch(self) -> None:
        async for routes in self.agent.WatchRoutes(agent_pb2.WatchAgentRoutesRequest()):
            self.routes = routes

    def target(self) -> str | None:
        if self.routes is None:
            return None
        for ep in self.routes.endpoints:
            if (
                ep.replica.replica_id == self.replica_id
                and ep.state == plan_pb2.REPLICA_STATE_READY
            ):
                return ep.address
        return None

    async def loop(self) -> None:
        while not self._stop.is_set():
            address = self.target()
            if address is None:
                await asyncio.sleep(0.01)
                continue
            if address not in self._channels:
                self._channels[address] = lifecycle.channel(address)
            stub = stage_pb2_grpc.StageStub(self._channels[address])
            try:
                reply = await stub.Infer(stage_pb2.InferRequest(query_id="q"), timeout=5)
                self.ok += 1
                self.served_by.add(reply.replica_id)
            except grpc.aio.AioRpcError as e:
                self.failures.append(f"{address}: {e.code().name} {e.details()}")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RoutedClient]:
        tasks = [asyncio.create_task(self.watch()), asyncio.create_task(self.loop())]
        try:
            yield self
        finally:
            self._stop.set()
            await tasks[1]
            tasks[0].cancel()
            await asyncio.gather(tasks[0], return_exceptions=True)
            for ch in self._channels.values():
                await ch.close()


async def health_serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with lifecycle.channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def describe(address: str) -> stage_pb2.DescribeStageResponse:
    async with lifecycle.channel(address) as ch:
        reply: stage_pb2.DescribeStageResponse = await stage_pb2_grpc.StageStub(ch).Describe(
            stage_pb2.DescribeStageRequest(), timeout=5
        )
    return reply


async def eventually(predicate, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- tests ---------------------------------------------------------------------------------------


def instance_pid(app: AgentApp, rid: str) -> int:
    pid = app.agent.primary[rid].pid
    assert pid is not None
    return pid


def launched_with(unix_path: str) -> dict:
    """What the fake stage recorded about its start (argv, pid, CUDA_* environment)."""
    with open(unix_path + ".json") as f:
        return dict(json.load(f))


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); its parent (the agent) reaps it
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


async def test_apply_starts_replicas_that_answer_health(tmp_path):
    async with running_agent(settings(tmp_path)) as (app, stub):
        reply = await stub.Apply(
            assignment(1, replica("p.a.0", 50), replica("p.b.0", 30)), timeout=30
        )
        assert reply.epoch == 1 and reply.started == 2 and reply.stopped == 0
        by_id = {ep.replica.replica_id: ep for ep in reply.endpoints}
        assert set(by_id) == {"p.a.0", "p.b.0"}
        for ep in by_id.values():
            assert ep.state == plan_pb2.REPLICA_STATE_READY
            assert ep.address.startswith("unix:")
            assert await health_serving(ep.address)
        described = await describe(by_id["p.b.0"].address)
        assert described.replica_id == "p.b.0" and described.sm_percent == 30
        # the MPS share reaches the process as its active-thread percentage
        seen = launched_with(app.agent.primary["p.b.0"].unix_path)
        assert seen["env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
        status = await stub.Status(agent_pb2.AgentStatusRequest(), timeout=5)
        assert status.epoch == 1 and len(status.replicas) == 2
        inventory = await stub.Inventory(agent_pb2.InventoryRequest(), timeout=5)
        assert inventory.backend == "host" and list(inventory.gpus) == []
        # the same assignment again changes nothing
        again = await stub.Apply(assignment(1, replica("p.a.0", 50), replica("p.b.0", 30)))
        assert again.started == 0 and again.stopped == 0
        pids = [instance_pid(app, rid) for rid in ("p.a.0", "p.b.0")]
    # leaving the agent drains and stops its replicas
    assert all(process_gone(pid) for pid in pids)


async def test_share_change_is_a_shadow_replacement_without_failures(tmp_path):
    async with running_agent(settings(tmp_path)) as (app, stub):
        await stub.Apply(assignment(1, replica("p.a.0", 50)), timeout=30)
        old_pid = instance_pid(app, "p.a.0")
        async with RoutedClient(stub, "p.a.0").running() as client:
            await eventually(lambda: client.ok >= 20, what="requests to the first replica")
            reply = await stub.Apply(assignment(2, replica("p.a.0", 30)), timeout=30)
            done_at = client.ok
            await eventually(lambda: client.ok >= done_at + 20, what="requests after the change")
        assert reply.started == 1 and reply.stopped == 1
        new_pid = instance_pid(app, "p.a.0")
        assert new_pid != old_pid
        assert process_gone(old_pid)
        assert client.failures == []
        # traffic moved from the old process to the new one
        assert client.served_by == {f"p.a.0@{old_pid}", f"p.a.0@{new_pid}"}
        [ep] = reply.endpoints
        assert ep.replica.replica_id == "p.a.0" and ep.replica.sm_percent == 30
        assert (await describe(ep.address)).sm_percent == 30


async def test_routes_show_both_instances_during_replacement(tmp_path):
    async with running_agent(settings(tmp_path)) as (app, stub):
        await stub.Apply(assignment(1, replica("p.a.0", 50, max_batch=4)), timeout=30)
        seen: list[plan_pb2.Routes] = []

        async def watch() -> None:
            async for routes in stub.WatchRoutes(agent_pb2.WatchAgentRoutesRequest()):
                seen.append(routes)

        task = asyncio.create_task(watch())
        await eventually(lambda: len(seen) >= 1, what="first routes")
        await stub.Apply(assignment(2, replica("p.a.0", 50, max_batch=8)), timeout=30)
        await eventually(lambda: seen[-1].epoch == 2, what="routes of epoch 2")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    revisions = [r.revision for r in seen]
    assert revisions == sorted(revisions)
    both = [
        {plan_pb2.ReplicaState.Name(ep.state): ep.replica.max_batch for ep in r.endpoints}
        for r in seen
        if len(r.endpoints) == 2
    ]
    assert {"REPLICA_STATE_READY": 8, "REPLICA_STATE_DRAINING": 4} in both
    assert [ep.replica.max_batch for ep in seen[-1].endpoints] == [8]


async def test_removed_replica_is_drained_and_older_epochs_refused(tmp_path):
    async with running_agent(settings(tmp_path)) as (app, stub):
        await stub.Apply(assignment(1, replica("p.a.0"), replica("p.b.0")), timeout=30)
        pid = instance_pid(app, "p.b.0")
        reply = await stub.Apply(assignment(2, replica("p.a.0")), timeout=30)
        assert reply.stopped == 1 and reply.started == 0
        assert [ep.replica.replica_id for ep in reply.endpoints] == ["p.a.0"]
        assert process_gone(pid)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Apply(assignment(1, replica("p.a.0"), replica("p.b.0")), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert app.agent.epoch == 2 and list(app.agent.primary) == ["p.a.0"]


async def test_a_stopping_agent_applies_no_new_assignment(tmp_path):
    # seen at the end of a soak: the scheduler's next plan reached the agent while it drained on
    # SIGTERM, and it started fresh replicas only to stop them again
    async with running_agent(settings(tmp_path)) as (app, stub):
        await stub.Apply(assignment(1, replica("p.a.0")), timeout=30)
        pid = instance_pid(app, "p.a.0")
        closing = asyncio.create_task(app.agent.close())
        await asyncio.sleep(0)  # close() has begun
        app.agent.submit(assignment(2, replica("p.a.0"), replica("p.b.0")))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Apply(assignment(3, replica("p.a.0"), replica("p.b.0")), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await closing
        assert app.agent.epoch == 1
        assert app.agent.instances("p.a.0") == [] and app.agent.instances("p.b.0") == []
        assert process_gone(pid)


async def test_killed_replica_is_restarted_with_the_same_plan(tmp_path):
    async with running_agent(settings(tmp_path)) as (app, stub):
        await stub.Apply(assignment(1, replica("p.a.0", 40)), timeout=30)
        inst = app.agent.primary["p.a.0"]
        old_pid, address = instance_pid(app, "p.a.0"), inst.address
        os.kill(old_pid, signal.SIGKILL)
        await eventually(
            lambda: inst.restarts == 1 and inst.state.name == "READY", what="the restart"
        )
        status = await stub.Status(agent_pb2.AgentStatusRequest(), timeout=5)
        [ep] = status.replicas
        assert ep.replica.replica_id == "p.a.0" and ep.restarts == 1
        assert ep.state == plan_pb2.REPLICA_STATE_READY
        assert ep.replica.sm_percent == 40 and ep.address == address
        assert instance_pid(app, "p.a.0") != old_pid
        assert await health_serving(address)


async def test_green_groups_overlapping_are_invalid_and_resize_is_in_place(tmp_path):
    async with running_agent(settings(tmp_path, share_mode="green")) as (app, stub):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Apply(
                assignment(1, replica("p.a.0", groups=(0, 1)), replica("p.b.0", groups=(1, 2)))
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert app.agent.primary == {}
        await stub.Apply(assignment(1, replica("p.a.0", groups=(0, 1))), timeout=30)
        pid = instance_pid(app, "p.a.0")
        unix = app.agent.primary["p.a.0"].unix_path
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in launched_with(unix)["env"]
        reply = await stub.Apply(assignment(2, replica("p.a.0", groups=(0, 1, 2, 3))), timeout=30)
        assert reply.resized == 1 and reply.started == 0 and reply.stopped == 0
        assert instance_pid(app, "p.a.0") == pid
        assert list((await describe(reply.endpoints[0].address)).sm_groups) == [0, 1, 2, 3]


async def test_replica_that_cannot_start_fails_the_apply_and_keeps_the_epoch(tmp_path):
    s = settings(tmp_path, ready_timeout_s=1.0, kill_grace_s=0.5, restart_backoff_s=5.0)
    env = environ(FAKE_STAGE_WARMUP_S="30")
    async with running_agent(s, env) as (app, stub):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Apply(assignment(1, replica("p.a.0")), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert app.agent.epoch == 0 and app.agent.endpoints() == []
        # the same assignment again (as every heartbeat re-sends it) is refused at once, with
        # the reason, instead of starting the process that just failed once more
        logs = sorted((tmp_path / "logs").glob("p.a.0*"))
        revision = app.agent.board.revision
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Apply(assignment(1, replica("p.a.0")), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed to start 1 time(s) in a row, next try in" in e.value.details()
        assert time.monotonic() - t0 < 1.0
        assert sorted((tmp_path / "logs").glob("p.a.0*")) == logs
        # and changes nothing, so it publishes no new routes: a publish wakes the heartbeat,
        # whose beat re-sends the assignment at once (on the H100 the agent spun through this
        # loop ~500 times a second for two minutes while three replicas waited out a backoff)
        assert app.agent.board.revision == revision


class FakeScheduler(admin_pb2_grpc.ControlServicer):
    """The scheduler's side of heartbeats (a seam: the scheduler is not under test here)."""

    def __init__(self, answer: agent_pb2.Assignment) -> None:
        self.answer = answer
        self.beats: list[admin_pb2.NodeHeartbeat] = []

    async def Heartbeat(self, request, context):
        self.beats.append(request)
        return self.answer


async def test_heartbeat_applies_the_scheduler_assignment_and_survives_outages(tmp_path):
    port = free_port()
    scheduler = FakeScheduler(assignment(3, replica("p.a.0")))
    s = settings(tmp_path, scheduler_addr=f"127.0.0.1:{port}")
    async with running_agent(s) as (app, stub):
        # the scheduler is not up yet: beats fail, the loop lives on
        await asyncio.sleep(0.5)
        assert app.agent.heartbeats == 0
        server = lifecycle.new_server()
        admin_pb2_grpc.add_ControlServicer_to_server(scheduler, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            await eventually(lambda: app.agent.epoch == 3, what="the heartbeat's assignment")
            await eventually(lambda: app.agent.heartbeats >= 3, what="more heartbeats")
            # the apply runs beside the heartbeat loop: wait for a beat sent after it finished
            await eventually(
                lambda: scheduler.beats[-1].applied_epoch == 3, what="a beat after the apply"
            )
            last = scheduler.beats[-1]
            assert last.node == "n1" and last.applied_epoch == 3
            assert last.inventory.backend == "host"
            assert [ep.replica.replica_id for ep in last.replicas] == ["p.a.0"]
            assert [b.sequence for b in scheduler.beats] == sorted(
                b.sequence for b in scheduler.beats
            )
        finally:
            await server.stop(0)


@contextlib.asynccontextmanager
async def real_broker(run_dir: Path, backend: str) -> AsyncIterator[str]:
    """A real shmbroker process; yields its Unix-socket address."""
    mesh = Mesh(run_dir / "broker")
    sock = str(run_dir / "broker.sock")
    port = free_port()
    proc = mesh.python(
        "broker",
        "shmbroker",
        ["--port", str(port), "--socket", sock, "--backend", backend,
         "--slab-bytes", str(64 << 20)],
    )  # fmt: skip
    try:
        await wait_healthy(f"127.0.0.1:{port}", 30, proc)
        yield f"unix:{sock}"
    finally:
        await mesh.stop_all()


def stage_replica(rid: str, sm_percent: float, gpu: int = -1) -> plan_pb2.Endpoint:
    ep = replica(rid, sm_percent, max_batch=8, gpu=gpu)
    ep.pipeline = "img-to-text"
    return ep


async def test_real_stage_replica_is_started_and_replaced(tmp_path):
    async with real_broker(tmp_path, "host") as broker:
        s = settings(
            tmp_path, replica_command=DEFAULT_REPLICA_COMMAND, broker_addr=broker, shift_s=0.1
        )
        async with running_agent(s) as (app, stub):
            first = await stub.Apply(
                assignment(1, stage_replica("itt.preprocess.0", 50)), timeout=60
            )
            [ep] = first.endpoints
            described = await describe(ep.address)
            assert described.replica_id == "itt.preprocess.0"
            assert described.sm_percent == 50 and described.max_batch == 8
            old_pid = instance_pid(app, "itt.preprocess.0")
            second = await stub.Apply(
                assignment(2, stage_replica("itt.preprocess.0", 25)), timeout=60
            )
            assert second.started == 1 and second.stopped == 1
            assert (await describe(second.endpoints[0].address)).sm_percent == 25
            assert process_gone(old_pid)


def empty_dir(path: str) -> bool:
    return os.path.isdir(path) and os.listdir(path) == []


async def test_time_sliced_replica_gets_its_own_context_and_mps_ones_find_the_daemon(tmp_path):
    from common.backend import Backend
    from services.agent.apply import Agent, NodeInfo
    from services.agent.inventory import StaticGpu
    from services.agent.mps import MpsDaemon
    from services.agent.replicas import Instance

    pipe = str(tmp_path / "mps-pipe")
    node = NodeInfo(Backend.CUDA, (StaticGpu(0, "NVIDIA H100", "GPU-0", 80 << 30, 132),))
    agent = Agent(settings(tmp_path), node, MpsDaemon("external", pipe, pipe + "-log"), environ())

    def env_of(ep: plan_pb2.Endpoint) -> dict[str, str]:
        return agent.launches.launch(Instance("i", ep, str(tmp_path / "i.sock"), 0)).env

    capped = env_of(replica("p.a.0", 30, gpu=0, mode=plan_pb2.SHARE_MODE_MPS))
    assert capped["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert capped["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    sliced = env_of(replica("p.b.0", 100, gpu=0, mode=plan_pb2.SHARE_MODE_TIME_SLICED))
    # a pipe directory where no daemon answers: the driver makes a plain context
    own = sliced["CUDA_MPS_PIPE_DIRECTORY"]
    assert own != pipe and empty_dir(own)
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in sliced
