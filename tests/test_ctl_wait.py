"""`camelotctl set-policy/set-qos --wait` against a real scheduler: it returns once every agent
has applied the new plan's epoch, shows the plan's replicas coming up, and fails (exit 1, one
line) when the plan is not in force in time. The agent's side is its heartbeat, sent by the test
over the real Control API: the applied epoch it reports is what the wait follows."""

from __future__ import annotations

import asyncio

import pytest

from common.lifecycle import channel
from protos import admin_pb2, admin_pb2_grpc, plan_pb2
from scheduler import ctl
from scheduler.ctlwait import ready_of_plan
from tests.test_scheduler_server import TOKEN, host_heartbeat, make_settings, running, until

# the scheduler pushes plans to this address; nothing listens, so only heartbeats say "applied"
AGENT = "127.0.0.1:9"


def heartbeat(
    applied: int, plan: plan_pb2.Plan | None = None, node: str = "n1"
) -> admin_pb2.NodeHeartbeat:
    hb = host_heartbeat(node, AGENT)
    hb.applied_epoch = applied
    for st in plan.stages if plan is not None else ():
        for r in (r for r in st.replicas if r.node == node):
            hb.replicas.add(
                replica=r, pipeline=st.pipeline, stage=st.stage, state=plan_pb2.REPLICA_STATE_READY
            )
    return hb


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    for name in ("CAMELOT_ADMIN_TOKEN", "CAMELOT_ADMIN_TOKEN_FILE", "CAMELOT_SCHEDULER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    return path


async def test_wait_returns_once_the_agents_applied_the_new_epoch(
    redis_server, token_file, capsys
) -> None:
    settings = make_settings(redis_server.url, node_timeout_s=600.0)
    async with running(settings) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            control = admin_pb2_grpc.ControlStub(ch)
            await control.Heartbeat(heartbeat(0), timeout=5)
            await until(lambda: sched.app.plan.epoch >= 1)
            first = sched.app.plan.epoch
            await control.Heartbeat(heartbeat(first, sched.app.plan), timeout=5)
            base = ["--target", f"127.0.0.1:{port}", "--token-file", str(token_file)]
            waiting = asyncio.create_task(
                asyncio.to_thread(ctl.main, [*base, "set-qos", "p", "40", "--wait"])
            )
            # the agent applies the new plan only after the command has it in hand
            await until(lambda: sched.app.plan.epoch > first)
            assert not waiting.done()
            new = sched.app.plan
            await control.Heartbeat(heartbeat(new.epoch, new), timeout=5)
            rc = await asyncio.wait_for(waiting, timeout=60)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "qos of p set to 40 ms" in captured.out
    total = sum(len(st.replicas) for st in new.stages)
    assert f"{total}/{total} replicas ready" in captured.err
    assert f"in force (applied epoch {new.epoch})" in captured.err


async def test_drain_waits_for_every_agent(redis_server, token_file, capsys) -> None:
    settings = make_settings(redis_server.url, node_timeout_s=600.0)
    async with running(settings) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            control = admin_pb2_grpc.ControlStub(ch)
            for node in ("n1", "n2"):
                await control.Heartbeat(heartbeat(0, node=node), timeout=5)
            await until(lambda: {r.node for s in sched.app.plan.stages for r in s.replicas} == {
                "n1", "n2"})  # fmt: skip
            first = sched.app.plan.epoch
            base = ["--target", f"127.0.0.1:{port}", "--token-file", str(token_file)]
            waiting = asyncio.create_task(
                asyncio.to_thread(ctl.main, [*base, "drain", "--node", "n2", "--wait"])
            )
            await until(lambda: sched.app.plan.epoch > first)
            new = sched.app.plan
            await control.Heartbeat(heartbeat(new.epoch, new, "n1"), timeout=5)
            assert not waiting.done()  # n2 has not applied it yet
            await control.Heartbeat(heartbeat(new.epoch, new, "n2"), timeout=5)
            rc = await asyncio.wait_for(waiting, timeout=60)
    assert rc == 0
    assert f"in force (applied epoch {new.epoch})" in capsys.readouterr().err


async def test_wait_fails_with_one_line_when_the_plan_is_not_in_force_in_time(
    redis_server, token_file, capsys
) -> None:
    settings = make_settings(redis_server.url, node_timeout_s=600.0)
    async with running(settings) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(heartbeat(0), timeout=5)
        await until(lambda: sched.app.plan.epoch >= 1)
        base = ["--target", f"127.0.0.1:{port}", "--token-file", str(token_file)]
        argv = [*base, "set-policy", "even", "--wait", "--wait-timeout-s", "0.2"]
        rc = await asyncio.to_thread(ctl.main, argv)
        err = capsys.readouterr().err
        assert rc == 1
        assert "not in force after 0.2 s: applied epoch 0" in err
        assert "Traceback" not in err
        # without --wait the same call returns at once, whatever the agents do
        rc = await asyncio.to_thread(ctl.main, [*base, "set-policy", "even"])
        assert rc == 0


async def test_wait_with_no_agent_returns_at_once(redis_server, token_file, capsys) -> None:
    """Nodes that report without an agent apply nothing: the plan is in force when made."""
    async with running(make_settings(redis_server.url)) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
        await until(lambda: sched.app.plan.epoch >= 1)
        base = ["--target", f"127.0.0.1:{port}", "--token-file", str(token_file)]
        rc = await asyncio.to_thread(ctl.main, [*base, "set-qos", "q", "30", "--wait"])
        assert rc == 0
        assert f"in force (applied epoch {sched.app.plan.epoch})" in capsys.readouterr().err


def test_ready_of_plan_counts_ready_replicas_at_their_planned_share() -> None:
    plan = plan_pb2.Plan(epoch=2)
    st = plan.stages.add(pipeline="p", stage="a")
    st.replicas.add(replica_id="p.a.0", sm_percent=30.0)
    st.replicas.add(replica_id="p.a.1", sm_percent=30.0)
    routes = plan_pb2.Routes(epoch=2)
    ready = plan_pb2.REPLICA_STATE_READY
    # p.a.0 still runs at its old share (a resize keeps the id); p.a.1 is starting
    routes.endpoints.add(
        replica=plan_pb2.ReplicaPlan(replica_id="p.a.0", sm_percent=50.0), state=ready
    )
    routes.endpoints.add(
        replica=plan_pb2.ReplicaPlan(replica_id="p.a.1", sm_percent=30.0),
        state=plan_pb2.REPLICA_STATE_STARTING,
    )
    assert ready_of_plan(plan, routes) == 0
    routes.endpoints.add(
        replica=plan_pb2.ReplicaPlan(replica_id="p.a.0", sm_percent=30.0), state=ready
    )
    assert ready_of_plan(plan, routes) == 1
