"""The predictor's online correction in the running scheduler (real Redis, in-process server).

The scheduler measures a pipeline whose p99 stays well above what the model predicts for the
plan in force; the loop folds that into the bias, and the next plan gives the pipeline more
share than the uncorrected model would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

from common.lifecycle import channel
from common.reports import ReportWriter
from protos import admin_pb2, admin_pb2_grpc, agent_pb2, plan_pb2, report_pb2
from scheduler.perfmodel.predictor import predict
from scheduler.perfmodel.profilestore import DEFAULT_PROFILES, load
from scheduler.policy import PipelineInfo, PolicyInput, StageInfo
from scheduler.search.planning import total_units
from scheduler.search.policies.minresource import MinResource
from scheduler.service import planstore
from scheduler.service.app import SchedulerApp
from scheduler.service.settings import SchedulerSettings
from tests.test_scheduler_server import running

PIPE = "img-to-text"
STAGES = ("preprocess", "encode", "decode")
INFO = PipelineInfo(PIPE, tuple(StageInfo(s, 32) for s in STAGES), 60.0)
RATE = 300.0  # queries/s the fake gateway reports
SLOWER = 2.5  # how much slower than predicted the "real" system runs
PROFILES = load()


def online_settings(url: str, **kw: object) -> SchedulerSettings:
    """The scheduler these tests run: INFO alone, min-resource, fast ticks, 1 s windows."""
    base = SchedulerSettings(
        redis_url=url,
        port=0,
        admin_token="t",
        pipelines=(INFO,),
        policy="min-resource",
        tick_s=0.05,
        window_s=1.0,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


async def first_plan(app: SchedulerApp) -> float:
    """Waits (up to 10 s) for the scheduler's first plan; returns that deadline."""
    deadline = time.monotonic() + 10
    while app.plan.epoch < 1:
        assert time.monotonic() < deadline, "no first plan"
        await asyncio.sleep(0.02)
    return deadline


def gpu_heartbeat() -> admin_pb2.NodeHeartbeat:
    gpu = agent_pb2.GpuInfo(index=0, sm_count=132, memory_bytes=80 << 30)
    inv = agent_pb2.InventoryResponse(node="n1", backend="cuda", gpus=[gpu])
    return admin_pb2.NodeHeartbeat(node="n1", inventory=inv, sequence=1)


async def report_slowly(url: str, stage_ms: dict[str, float], stop: asyncio.Event) -> None:
    """Streams query and stage records at RATE, each stage at its fixed (too slow) latency."""
    writer = ReportWriter(url, "gw@n1")
    step_s, n = 0.05, 0
    async with writer:
        while not stop.is_set():
            now = int(time.time() * 1e6)
            for _ in range(int(RATE * step_s)):
                n += 1
                total = sum(stage_ms.values()) + 1.0
                writer.add(
                    report_pb2.LatencyReport(
                        kind=report_pb2.REPORT_KIND_QUERY, pipeline=PIPE, query_id=str(n),
                        end_unix_us=now, total_us=int(total * 1000),
                    )
                )  # fmt: skip
                for stage, ms in stage_ms.items():
                    writer.add(
                        report_pb2.LatencyReport(
                            kind=report_pb2.REPORT_KIND_STAGE, pipeline=PIPE, stage=stage,
                            query_id=str(n), end_unix_us=now, total_us=int(ms * 1000),
                        )
                    )  # fmt: skip
            await asyncio.sleep(step_s)


@contextlib.asynccontextmanager
async def reporting_slower(url: str, app: SchedulerApp) -> AsyncIterator[None]:
    """While open, reports stream at RATE with every stage SLOWER than the model predicts for
    the plan in force."""
    pred = predict(app.inforce.policy_input(), planstore.from_proto(app.plan), {PIPE: RATE})
    stage_ms = {s: SLOWER * pred.stage(PIPE, s).p99_ms for s in STAGES}
    stop = asyncio.Event()
    feeder = asyncio.create_task(report_slowly(url, stage_ms, stop))
    try:
        yield
    finally:
        stop.set()
        await feeder


async def test_measured_p99_above_prediction_raises_bias_and_share(redis_server) -> None:
    settings = online_settings(
        redis_server.url,
        min_replan_interval_s=0.2,
        min_samples=50,
        # the same profile set the test predicts with, whatever the bundled default is
        profiles_path=str(DEFAULT_PROFILES),
    )
    async with running(settings) as (port, sched):
        app = sched.app
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(gpu_heartbeat(), timeout=5)
        deadline = await first_plan(app)
        world = app.inforce.policy_input()
        async with reporting_slower(redis_server.url, app):
            # an uncorrected plan for the load the scheduler planned for
            while True:
                assert time.monotonic() < deadline + 20, "no corrected plan"
                await asyncio.sleep(0.1)
                plan = planstore.from_proto(app.plan)
                if app.known.bias.factor(PIPE) <= 1.0 or not plan.planned_qps.get(PIPE):
                    continue
                load = plan.planned_qps[PIPE] / 1.2  # min-resource's default headroom
                plain = MinResource().plan(
                    PolicyInput((INFO,), world.nodes, {PIPE: load}, PROFILES)
                )
                if total_units(plan) > total_units(plain):
                    break
            # min-resource's hysteresis reads the long window: seconds of data in a minute
            assert 0 < app.known.measured()[PIPE].arrival_qps < 0.5 * app.known.load_qps()[PIPE]
        assert app.known.bias.factor(PIPE) > 1.0
        assert all(app.known.bias.factor(f"{PIPE}/{s}") > 1.0 for s in STAGES)
        # the plan in force was made with the bias: it predicts the measured latency better
        assert app.inforce.planned_bias and app.inforce.planned_bias.get(PIPE, 1.0) > 1.0


async def test_a_moved_bias_is_a_reason_to_replan(redis_server) -> None:
    settings = online_settings(redis_server.url, min_replan_interval_s=60.0)
    async with running(settings) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(gpu_heartbeat(), timeout=5)
        await first_plan(sched.app)
        assert sched.loop.trigger() == ("", False)
        sched.app.known.bias.update(f"{PIPE}/encode", 2.0, 1.0)  # measured twice the prediction
        reason, urgent = sched.loop.trigger()
        assert reason.startswith(f"model error: bias of {PIPE}/encode") and not urgent
        await sched.app.replan("test")
        assert sched.loop.trigger() == ("", False)  # the new plan was made with it


async def test_green_nodes_shorten_the_replan_interval(redis_server) -> None:
    settings = SchedulerSettings(
        redis_url=redis_server.url, port=0, admin_token="t", pipelines=(INFO,),
        min_replan_interval_s=5.0,
    )  # fmt: skip
    async with running(settings) as (port, sched):
        hb = gpu_heartbeat()
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(hb, timeout=5)
            assert sched.loop.replan_interval_s() == 5.0  # MPS: a share change is a new process
            hb.inventory.mode = plan_pb2.SHARE_MODE_GREEN
            hb.sequence = 2
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(hb, timeout=5)
        assert sched.loop.replan_interval_s() < 1.0


async def test_bias_learns_only_once_every_agent_runs_the_plan(redis_server) -> None:
    """Windows taken while a plan is being applied hold the change itself (replicas draining and
    warming up), not the model's error: no bias is learned until every agent runs the plan."""
    settings = online_settings(
        redis_server.url,
        min_replan_interval_s=60.0,
        min_samples=50,
        profiles_path=str(DEFAULT_PROFILES),
    )
    async with running(settings) as (port, sched):
        app = sched.app
        beat = gpu_heartbeat()
        beat.agent_address = "127.0.0.1:9"  # an agent that never applies what it is sent
        async with channel(f"127.0.0.1:{port}") as ch:
            control = admin_pb2_grpc.ControlStub(ch)
            await control.Heartbeat(beat, timeout=5)
            deadline = await first_plan(app)
            async with reporting_slower(redis_server.url, app):
                await asyncio.sleep(3 * settings.window_s)
                assert app.inforce.applied_at() is None
                assert app.known.bias.factors() == {}
                beat.applied_epoch, beat.sequence = app.plan.epoch, 2
                await control.Heartbeat(beat, timeout=5)
                while app.known.bias.factor(PIPE) <= 1.0:
                    assert time.monotonic() < deadline + 20, "no bias after the plan applied"
                    await asyncio.sleep(0.1)
        assert app.inforce.applied_at() is not None


async def test_a_moved_bias_replans_a_load_blind_plan_only_where_it_is_at_risk(
    redis_server,
) -> None:
    """max-load with fixed weights does not follow load: a model error that leaves its plan
    comfortably within the targets at the measured load replaces no replica; one that puts it
    near a target does."""
    settings = online_settings(
        redis_server.url, min_replan_interval_s=60.0, policy="max-load",
        policy_options={"weights": "img-to-text=1"},
    )  # fmt: skip
    async with running(settings) as (port, sched):
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(gpu_heartbeat(), timeout=5)
        await first_plan(sched.app)
        assert sched.loop.trigger() == ("", False)
        # measured twice the prediction at no load: the factor moves, the plan still holds
        sched.app.known.bias.update(f"{PIPE}/encode", 2.0, 1.0)
        assert sched.app.inforce.bias_moved() == f"{PIPE}/encode"
        assert not sched.app.inforce.at_risk()
        assert sched.loop.trigger() == ("", False)
        # an error large enough to cross the target at this load is a reason to re-plan
        # (windows each within the factor's range, to its cap: a p99 past it is a queue)
        for _ in range(6):
            for s in STAGES:
                sched.app.known.bias.update(f"{PIPE}/{s}", 2.9, 1.0)
            sched.app.known.bias.update(PIPE, 2.9, 1.0)
        assert sched.app.inforce.at_risk()
        reason, urgent = sched.loop.trigger()
        assert reason.startswith("model error: bias of") and not urgent
