"""The Admin API over real gRPC: the bearer token, precise errors, WatchRoutes, camelotctl."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.clock import wall_us
from common.lifecycle import channel
from common.reports import ReportWriter
from protos import admin_pb2, admin_pb2_grpc, report_pb2
from scheduler import ctl
from tests.test_scheduler_server import TOKEN, auth, host_heartbeat, make_settings, running, until


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code()


async def test_admin_needs_the_token(redis_server) -> None:
    async with running(make_settings(redis_server.url)) as (port, _sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            req = admin_pb2.GetPlanRequest()
            assert await code_of(admin.GetPlan(req)) == grpc.StatusCode.UNAUTHENTICATED
            wrong = (("authorization", "Bearer nope"),)
            assert (
                await code_of(admin.GetPlan(req, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED
            )
            basic = (("authorization", f"Basic {TOKEN}"),)
            assert (
                await code_of(admin.GetPlan(req, metadata=basic)) == grpc.StatusCode.UNAUTHENTICATED
            )
            plan = await admin.GetPlan(req, metadata=auth())
            assert plan.epoch == 0
            # Control stays open to the mesh
            a = await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
            assert a.node == "n1"


async def test_no_configured_token_refuses_everyone(redis_server) -> None:
    async with running(make_settings(redis_server.url, admin_token="")) as (port, _sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            empty = (("authorization", "Bearer "),)
            code = await code_of(admin.GetPlan(admin_pb2.GetPlanRequest(), metadata=empty))
            assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_precise_errors(redis_server) -> None:
    async with running(make_settings(redis_server.url)) as (port, _sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            bad = admin_pb2.SetPolicyRequest(policy="no-such-policy")
            assert (
                await code_of(admin.SetPolicy(bad, metadata=auth()))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            unknown = admin_pb2.SetQosRequest(pipeline="nope", qos_p99_ms=10)
            assert (
                await code_of(admin.SetQos(unknown, metadata=auth())) == grpc.StatusCode.NOT_FOUND
            )
            for ms in (0.0, -5.0, float("nan")):
                zero = admin_pb2.SetQosRequest(pipeline="p", qos_p99_ms=ms)
                code = await code_of(admin.SetQos(zero, metadata=auth()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
            both = admin_pb2.DrainTargetRequest(node="n1", replica_id="x")
            assert (
                await code_of(admin.Drain(both, metadata=auth()))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            ghost = admin_pb2.DrainTargetRequest(replica_id="ghost")
            assert await code_of(admin.Drain(ghost, metadata=auth())) == grpc.StatusCode.NOT_FOUND


async def test_watch_routes_delivers_plan_after_set_policy(redis_server, tmp_path) -> None:
    async with running(make_settings(redis_server.url)) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            control = admin_pb2_grpc.ControlStub(ch)
            await control.Heartbeat(host_heartbeat(), timeout=5)
            await until(lambda: sched.app.plan.epoch >= 1)
            epoch = sched.app.plan.epoch
            stream = control.WatchRoutes(admin_pb2.WatchRoutesRequest(known_epoch=epoch))
            f = tmp_path / "plan.json"
            f.write_text(
                '{"stages": [{"pipeline": "q", "stage": "c", "replicas": [{"node": "n1"}]}]}'
            )
            req = admin_pb2.SetPolicyRequest(policy="static", options={"file": str(f)})
            plan = await admin_pb2_grpc.AdminStub(ch).SetPolicy(req, metadata=auth())
            assert plan.epoch > epoch and plan.policy == "static"
            async with asyncio.timeout(5):
                routes = await stream.read()
            assert routes.epoch == plan.epoch
            stream.cancel()


async def test_drain_replica_and_node(redis_server) -> None:
    async with running(make_settings(redis_server.url)) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            control = admin_pb2_grpc.ControlStub(ch)
            await control.Heartbeat(host_heartbeat("n1"), timeout=5)
            await control.Heartbeat(host_heartbeat("n2"), timeout=5)
            await until(
                lambda: len({r.node for s in sched.app.plan.stages for r in s.replicas}) == 2
            )
            admin = admin_pb2_grpc.AdminStub(ch)
            plan = await admin.Drain(admin_pb2.DrainTargetRequest(node="n2"), metadata=auth())
            assert {r.node for s in plan.stages for r in s.replicas} == {"n1"}
            only = plan.stages[0].replicas[0].replica_id
            code = await code_of(
                admin.Drain(admin_pb2.DrainTargetRequest(replica_id=only), metadata=auth())
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            code = await code_of(
                admin.Drain(admin_pb2.DrainTargetRequest(node="n1"), metadata=auth())
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_camelotctl_status_and_errors(redis_server, tmp_path, capsys, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.delenv("CAMELOT_ADMIN_TOKEN", raising=False)
    async with running(make_settings(redis_server.url)) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(host_heartbeat(), timeout=5)
        await until(lambda: sched.app.plan.epoch >= 1)
        async with ReportWriter(redis_server.url, "gw@n1") as writer:
            for i in range(100):
                writer.add(report_pb2.LatencyReport(
                    kind=report_pb2.REPORT_KIND_QUERY, pipeline="p", end_unix_us=wall_us(),
                    total_us=2000 + i))  # fmt: skip
        await until(lambda: sched.app.reader.reports_total >= 100)
        base = ["--target", f"127.0.0.1:{port}", "--token-file", str(token_file)]
        rc = await asyncio.to_thread(ctl.main, [*base, "status"])
        out = capsys.readouterr().out
        assert rc == 0
        lines = out.splitlines()
        assert lines[1].split()[:6] == ["PIPELINE", "STAGE", "COUNT", "P50ms", "P95ms", "P99ms"]
        row = next(line.split() for line in lines if line.startswith("p ") and " * " in line)
        assert row[2] == "100" and float(row[5]) == pytest.approx(2.1, rel=0.02)
        assert row[6] == "50" and row[7] == "met"
        assert any(line.split()[:2] == ["p", "a"] for line in lines)
        # planned and applied epoch; the loop's view; every replica with its state and share
        assert "planned" in lines[0] and "applied" in lines[0]
        assert "control loop" in lines
        assert any(line.startswith("  last trigger") and "initial plan" in line for line in lines)
        assert any(line.split()[:2] == ["p", "0.0"] for line in lines)  # PLANNED/s
        reps = lines[lines.index("replicas") + 2 :]
        assert {line.split()[0] for line in reps} == {"p.a.0", "p.b.0", "q.c.0"}
        assert all("planned" in line and "not started" in line for line in reps)

        rc = await asyncio.to_thread(ctl.main, [*base, "set-qos", "p", "1"])
        assert rc == 0 and "qos of p set to 1 ms" in capsys.readouterr().out
        rc = await asyncio.to_thread(ctl.main, [*base, "get-plan"])
        assert rc == 0 and "p.a.0" in capsys.readouterr().out

        rc = await asyncio.to_thread(ctl.main, [*base, "set-policy", "bogus"])
        assert rc == 1 and "INVALID_ARGUMENT" in capsys.readouterr().err
        rc = await asyncio.to_thread(ctl.main, ["--target", f"127.0.0.1:{port}", "get-plan"])
        assert rc == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
