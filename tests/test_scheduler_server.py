"""The scheduler in-process against a real Redis: restarts, the control loop, agents, policies."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
import redis.asyncio as aioredis

from common.errors import FailedPrecondition, InvalidArgument
from common.lifecycle import channel, new_server
from common.reports import ReportWriter
from protos import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, plan_pb2, report_pb2
from scheduler.policy import (
    GpuInfo,
    NodeInfo,
    PipelineInfo,
    PolicyInput,
    StageInfo,
    follows_load,
)
from scheduler.search.policies import get_policy
from scheduler.service import planstore
from scheduler.service.server import Scheduler, create_server
from scheduler.service.settings import SchedulerSettings

TOKEN = "t0ken-for-tests"
PIPES = (
    PipelineInfo("p", (StageInfo("a", max_batch=4), StageInfo("b", max_batch=8)), 50.0),
    PipelineInfo("q", (StageInfo("c"),), 20.0),
)


def make_settings(url: str, **kw: object) -> SchedulerSettings:
    base = SchedulerSettings(
        redis_url=url,
        port=0,
        admin_token=TOKEN,
        pipelines=PIPES,
        tick_s=0.05,
        min_replan_interval_s=0.2,
        window_s=5.0,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(settings: SchedulerSettings) -> AsyncIterator[tuple[int, Scheduler]]:
    server, port, sched = await create_server(settings)
    await server.start()
    try:
        yield port, sched
    finally:
        await sched.app.stop_watchers()
        await server.stop(0)
        await sched.aclose()


def host_heartbeat(node: str = "n1", address: str = "", seq: int = 1) -> admin_pb2.NodeHeartbeat:
    return admin_pb2.NodeHeartbeat(
        node=node,
        agent_address=address,
        inventory=agent_pb2.InventoryResponse(node=node, backend="host"),
        sequence=seq,
    )


async def write_queries(url: str, n: int, total_us: int) -> None:
    """`n` gateway records of pipeline q, ending now and taking `total_us`, into Redis."""
    async with ReportWriter(url, "gw@n1") as writer:
        for i in range(n):
            writer.add(
                report_pb2.LatencyReport(
                    kind=report_pb2.REPORT_KIND_QUERY, pipeline="q", query_id=str(i),
                    end_unix_us=int(time.time() * 1e6), total_us=total_us,
                )
            )  # fmt: skip


async def until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def auth() -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKEN}"),)


async def test_epochs_grow_across_scheduler_restart(redis_server) -> None:
    s = make_settings(redis_server.url)
    async with running(s) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
            await until(lambda: sched.app.plan.epoch >= 1)
            admin = admin_pb2_grpc.AdminStub(ch)
            await admin.SetQos(
                admin_pb2.SetQosRequest(pipeline="q", qos_p99_ms=33), metadata=auth()
            )
            p = await admin.SetPolicy(admin_pb2.SetPolicyRequest(policy="even"), metadata=auth())
        first = p.epoch
        assert first >= 3
    async with running(s) as (port, sched):
        # the restarted scheduler resumes plan, policy and QoS from Redis
        assert sched.app.plan.epoch == first
        assert sched.app.known.qos_of("q") == 33
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
            admin = admin_pb2_grpc.AdminStub(ch)
            p2 = await admin.SetPolicy(admin_pb2.SetPolicyRequest(policy="even"), metadata=auth())
        assert p2.epoch > first
    # Redis restarted empty: the epoch still does not go back (floor from the live scheduler)
    r = aioredis.Redis.from_url(redis_server.url)
    await r.flushall()
    await r.aclose()
    store = planstore.PlanStore(aioredis.Redis.from_url(redis_server.url))
    store.last_epoch = p2.epoch
    spec = planstore.from_proto(p2)
    assert (await store.save(spec)).epoch == p2.epoch + 1
    await store.redis.aclose()


async def test_heartbeat_gets_assignment_and_agent_gets_apply(redis_server) -> None:
    applied: list[agent_pb2.Assignment] = []

    class Agent(agent_pb2_grpc.AgentServicer):
        async def Apply(self, request, context):  # noqa: N802
            applied.append(request)
            eps = [plan_pb2.Endpoint(replica=e.replica, pipeline=e.pipeline, stage=e.stage,
                                     address=f"unix:/tmp/{e.replica.replica_id}",
                                     state=plan_pb2.REPLICA_STATE_READY)
                   for e in request.replicas]  # fmt: skip
            return agent_pb2.ApplyResponse(epoch=request.epoch, endpoints=eps)

    agent_server = new_server()
    agent_pb2_grpc.add_AgentServicer_to_server(Agent(), agent_server)
    agent_port = agent_server.add_insecure_port("127.0.0.1:0")
    await agent_server.start()
    try:
        async with running(make_settings(redis_server.url)) as (port, sched):
            async with channel(f"127.0.0.1:{port}") as ch:
                control = admin_pb2_grpc.ControlStub(ch)
                hb = host_heartbeat(address=f"127.0.0.1:{agent_port}")
                # a second node whose agent is down must not hold anything up
                dead = host_heartbeat("n2", address="127.0.0.1:1")
                await control.Heartbeat(hb, timeout=5)
                await control.Heartbeat(dead, timeout=5)
                await until(lambda: bool(applied) and applied[-1].epoch == sched.app.plan.epoch)
                # pushed is not applied: Status says so until the agent's heartbeat does
                assert sched.app.status(0).applied_epoch < sched.app.plan.epoch
                # the endpoints the agent returned are routes at once ...
                n = len(applied[-1].replicas)
                await until(lambda: len(sched.app.routes().endpoints) == n)
                # ... and stay so when its next heartbeat reports them running
                hb.replicas.extend(sched.app.routes().endpoints)
                hb.applied_epoch = applied[-1].epoch
                a = await control.Heartbeat(hb, timeout=5)
                # n2's agent has not applied it: the plan is not in force everywhere yet
                assert sched.app.status(0).applied_epoch < applied[-1].epoch
                dead.applied_epoch = applied[-1].epoch
                await control.Heartbeat(dead, timeout=5)
                assert sched.app.status(0).applied_epoch == applied[-1].epoch
            assert n > 0 and len(sched.app.routes().endpoints) == n
            assert a.epoch == sched.app.plan.epoch and a.node == "n1"
            assert all(r.replica.node == "n1" for r in a.replicas)
            assert {r.replica.replica_id for r in applied[-1].replicas} == {
                r.replica.replica_id for r in a.replicas
            }
            beats = sched.loop.heartbeats
            await until(lambda: sched.loop.heartbeats > beats + 3)
            assert sched.app.known.nodes["n2"].push_failures >= 1
    finally:
        await agent_server.stop(0)


async def test_loop_triggers_on_p99_and_load(redis_server) -> None:
    # rise_window_s=0: a rise is planned for at once (the hold has its own test below)
    s = make_settings(
        redis_server.url, min_samples=10, min_replan_interval_s=60.0, policy="feedback",
        rise_window_s=0.0,
    )  # fmt: skip
    async with running(s) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
        await until(lambda: sched.app.plan.epoch >= 1)
        assert sched.loop.trigger() == ("", False)
        await write_queries(redis_server.url, 200, total_us=19_500)
        await until(lambda: sched.app.reader.reports_total >= 200)
        await until(lambda: ("q", "") in sched.app.known.last_snapshot)
        reason, urgent = sched.loop.trigger()
        assert reason.startswith("p99 near target: q") and not urgent
        # a higher target removes the p99 reason; the load change (0 -> 40 qps) remains
        await sched.app.set_qos("q", 100.0)
        sched.app.inforce.planned_load["q"] = 0.0
        reason, _ = sched.loop.trigger()
        assert reason.startswith("load moved: q")
        # a policy whose plan does not depend on load is not re-planned when load moves
        await sched.app.set_policy("even", {})
        sched.app.inforce.planned_load["q"] = 0.0
        assert sched.loop.trigger() == ("", False)


def test_which_policies_follow_load() -> None:
    assert follows_load(get_policy("min-resource"), {})
    assert follows_load(get_policy("feedback"), {})
    assert not follows_load(get_policy("even"), {})
    for name in ("max-load", "exclusive"):
        assert not follows_load(get_policy(name), {})
        assert not follows_load(get_policy(name), {"weights": "a=1,b=2"})
        assert follows_load(get_policy(name), {"weights": "from-load"})


def test_even_policy_splits_gpus_and_host() -> None:
    even = get_policy("even")
    gpus = NodeInfo("g", (GpuInfo(0, 132, 80 << 30), GpuInfo(1, 132, 80 << 30)), backend="cuda")
    spec = even.plan(PolicyInput(pipelines=PIPES, nodes=(gpus,), load_qps={}))
    placed = {(st.pipeline, st.stage): st.replicas for st in spec.stages}
    assert all(len(r) == 1 for r in placed.values()) and len(placed) == 3
    # 3 stages on 2 GPUs: adjacent stages a, b share GPU 0 at 50% each; c has GPU 1
    assert [(r[0].gpu, r[0].sm_percent) for r in placed.values()] == [(0, 50.0), (0, 50.0),
                                                                         (1, 100.0)]  # fmt: skip
    assert placed[("p", "b")][0].max_batch == 8
    green = NodeInfo("g", (GpuInfo(0, 132, 80 << 30, sm_groups=15, sms_per_group=8),))
    spec = even.plan(PolicyInput(pipelines=PIPES, nodes=(green,), load_qps={}))
    groups = [set(st.replicas[0].sm_groups) for st in spec.stages]
    assert [len(g) for g in groups] == [5, 5, 5] and not (groups[0] & groups[1] & groups[2])
    planstore.validate(spec)
    host = NodeInfo("h", (), backend="host")
    spec = even.plan(PolicyInput(pipelines=PIPES, nodes=(host,), load_qps={}))
    assert {(r.gpu, r.sm_percent) for st in spec.stages for r in st.replicas} == {(-1, 100.0)}
    with pytest.raises(FailedPrecondition):
        even.plan(PolicyInput(pipelines=PIPES, nodes=(), load_qps={}))


def test_static_policy_reads_yaml_and_rejects_bad_files(tmp_path) -> None:
    static = get_policy("static")
    f = tmp_path / "plan.yaml"
    f.write_text(
        "stages:\n"
        "  - pipeline: p\n    stage: a\n    replicas:\n"
        "      - {node: n1, gpu: 0, sm_percent: 30}\n      - {node: n1, gpu: 0, sm_percent: 70}\n"
    )
    world = PolicyInput(pipelines=PIPES, nodes=(), load_qps={}, options={"file": str(f)})
    spec = static.plan(world)
    (st,) = spec.stages
    assert [r.replica_id for r in st.replicas] == ["p.a.0", "p.a.1"]
    assert [r.max_batch for r in st.replicas] == [4, 4]
    proto = planstore.to_proto(spec, 7)
    assert proto.stages[0].replicas[0].mode == plan_pb2.SHARE_MODE_MPS
    assert planstore.from_proto(proto) == spec
    f.write_text("stages:\n  - {pipeline: p, stage: zz, replicas: [{node: n1}]}\n")
    with pytest.raises(InvalidArgument):
        static.plan(world)
    with pytest.raises(InvalidArgument):
        static.plan(dataclasses.replace(world, options={}))
    with pytest.raises(InvalidArgument):
        get_policy("no-such-policy")


async def test_set_policy_static_with_bad_file_keeps_old_policy(redis_server, tmp_path) -> None:
    async with running(make_settings(redis_server.url)) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
            admin = admin_pb2_grpc.AdminStub(ch)
            req = admin_pb2.SetPolicyRequest(policy="static", options={"file": str(tmp_path / "x")})
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await admin.SetPolicy(req, metadata=auth())
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert sched.app.known.choice.name == "even"


async def test_the_gateways_figures_reach_every_policy_unless_its_options_say_otherwise(
    redis_server,
) -> None:
    s = make_settings(redis_server.url, gateway_cpu_ms=7.25, gateway_workers=3)
    async with running(s) as (_port, sched):
        options = sched.app.inforce.policy_input().options
        assert options["gateway_cpu_ms"] == "7.25" and options["gateway_workers"] == "3"
        await sched.app.set_policy("even", {"gateway_workers": "1"})
        assert sched.app.inforce.policy_input().options["gateway_workers"] == "1"
    async with running(make_settings(redis_server.url)) as (_port, sched):
        assert (
            "gateway_cpu_ms" not in sched.app.inforce.policy_input().options
        )  # not priced unless measured


async def test_a_rise_is_planned_for_once_it_has_lasted_the_rise_window(redis_server) -> None:
    # a 60 s window: the reports stay in it however slow this machine is
    s = make_settings(redis_server.url, min_replan_interval_s=60.0, policy="feedback",
                      rise_window_s=2.0, window_s=60.0)  # fmt: skip
    async with running(s) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
        await until(lambda: sched.app.plan.epoch >= 1)
        now = [1000.0]
        sched.loop.clock = lambda: now[0]
        await write_queries(redis_server.url, 200, total_us=1_000)
        await until(lambda: ("q", "") in sched.app.known.last_snapshot)
        await sched.app.set_qos("q", 1000.0)
        # the load rose from the plan's 0 qps: held while the rise is younger than the window
        sched.app.inforce.planned_load["q"] = 0.0
        assert sched.loop.trigger() == ("", False)
        now[0] += 1.0
        assert sched.loop.trigger() == ("", False)
        now[0] += 1.5
        reason, _ = sched.loop.trigger()
        assert reason.startswith("load moved: q 0.0 ->")
        # a fall is planned for at once
        sched.app.inforce.planned_load["q"] = 10_000.0
        reason, _ = sched.loop.trigger()
        assert reason.startswith("load moved: q 10000.0 ->")
        # back within the band, a later rise waits for its own hold again
        sched.app.inforce.planned_load["q"] = sched.app.known.load_qps()["q"]
        assert sched.loop.trigger() == ("", False)
        sched.app.inforce.planned_load["q"] = 0.0
        assert sched.loop.trigger() == ("", False)
