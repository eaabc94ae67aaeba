"""The host's part of a stage batch, measured by the stages and learned by the scheduler (CPU).

A stage on CUDA times its `infer` (StageTimings.gpu_us) and writes it in its latency report; the
scheduler's windows keep compute - GPU per stage, and the policies plan with its median in place
of the hand-set `stage_host_ms` (docs/results/stage-host-fit-h100-1731d70.md: 0.25-2.5 ms a
batch on the H100's host, which no one figure fits).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from common.backend import Backend
from common.dtypes import wire_from_array
from common.lifecycle import channel
from common.reports import ReportWriter
from loadgen.experiments.search import plan_record
from protos import admin_pb2, admin_pb2_grpc, report_pb2, stage_pb2, tensor_pb2
from scheduler.perfmodel.profilestore import DEFAULT_PROFILES, load
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows
from scheduler.service.world import World
from services.models.fault import fault
from services.stage.intake import Intake
from services.stage.plugin import ModelContext
from services.stage.replica import Replica, ReplicaIdentity
from services.stage.requests import Request
from tests.test_predictor_online import INFO, PIPE, first_plan, gpu_heartbeat, online_settings
from tests.test_scheduler_server import running

PROFILES = load()


def stage_report(stage: str, end_us: int, compute_us: int, gpu_us: int) -> report_pb2.LatencyReport:
    return report_pb2.LatencyReport(
        kind=report_pb2.REPORT_KIND_STAGE, pipeline=PIPE, stage=stage, end_unix_us=end_us,
        total_us=compute_us + 100, compute_us=compute_us, gpu_us=gpu_us, batch_size=1,
    )  # fmt: skip


def make_world(now: list[int], **settings: object) -> World:
    s = SchedulerSettings(**settings)  # type: ignore[arg-type]
    windows = Windows(bucket_s=0.25, horizon_s=120.0, clock_us=lambda: now[0])
    return World(s, [INFO], {k: p for k, p in PROFILES.items() if k.startswith(PIPE)}, windows)


def feed(w: World, now: list[int], stage: str, host_us: list[int], gpu_us: int = 2000) -> None:
    for h in host_us:
        now[0] += 1000
        w.windows.add(stage_report(stage, now[0], gpu_us + h, gpu_us))


def test_a_window_keeps_the_median_host_part_of_the_records_that_timed_their_gpu_work() -> None:
    now = [10**12]
    w = make_world(now)
    feed(w, now, "encode", [400, 800, 1200])
    # a record that did not time its GPU work (the host backend: gpu_us 0) is no host part
    now[0] += 1000
    w.windows.add(stage_report("encode", now[0], 50_000, 0))
    assert w.windows.snapshot(10.0)[(PIPE, "encode")].count == 4
    ms, count = w.windows.host_parts(10.0)[(PIPE, "encode")]
    assert count == 3 and abs(ms - 0.8) < 0.8 * 0.01  # the histogram's 0.8% bound
    # only stages have host parts, and only where some record timed its GPU work
    w.windows.add(report_pb2.LatencyReport(kind=report_pb2.REPORT_KIND_QUERY, pipeline=PIPE,
                                           end_unix_us=now[0], total_us=5000))  # fmt: skip
    feed(w, now, "decode", [0] * 3, gpu_us=0)
    assert set(w.windows.host_parts(10.0)) == {(PIPE, "encode")}


def test_the_policies_plan_with_each_stages_measured_host_part_else_the_setting() -> None:
    now = [10**12]
    w = make_world(now, stage_host_ms=0.5, min_samples=50)
    feed(w, now, "encode", [1500] * 60)
    feed(w, now, "decode", [3000] * 49)  # too few records to speak for the stage
    w.observe_host_parts(now[0] / 1e6)
    prof = w.profiles_now()
    assert abs(prof[f"{PIPE}/encode"].host_ms - 1.5) < 0.02
    assert prof[f"{PIPE}/decode"].host_ms == 0.5 and prof[f"{PIPE}/preprocess"].host_ms == 0.5
    assert w.host_ms(f"{PIPE}/encode")[1] == 60 and w.host_ms(f"{PIPE}/decode") == (0.5, 0)
    # priced: the measured part is in every latency the policy reads
    base = PROFILES[f"{PIPE}/encode"]
    assert abs(prof[f"{PIPE}/encode"].latency(10.0, 1) - base.latency(10.0, 1) - 1.5) < 0.02


def test_a_measured_host_part_stays_when_the_window_empties_and_moves_with_a_new_one() -> None:
    now = [10**12]
    w = make_world(now, min_samples=50, long_window_s=10.0)
    feed(w, now, "encode", [1500] * 60)
    w.observe_host_parts(now[0] / 1e6)
    now[0] += 60 * 10**6  # a minute idle: nothing in the long window
    w.observe_host_parts(now[0] / 1e6)
    assert abs(w.profiles_now()[f"{PIPE}/encode"].host_ms - 1.5) < 0.02
    feed(w, now, "encode", [700] * 80)
    w.observe_host_parts(now[0] / 1e6)
    assert abs(w.profiles_now()[f"{PIPE}/encode"].host_ms - 0.7) < 0.01


async def test_a_replicas_report_carries_its_batchs_gpu_part_where_its_tensors_went_by_ref() -> (
    None
):
    """The GPU's part comes from CUDA events on a GPU; the host backend has none, so the seam
    here is the thread's reading of them (`infer_gpu_us`). A request whose tensors went by value
    reports none: its batch's copies through the host are the wire transport's, which the
    predictor prices per hop, not the stage's host part."""
    sink: list[report_pb2.LatencyReport] = []

    class Sink:
        def add(self, report: report_pb2.LatencyReport) -> None:
            sink.append(report)

    model = fault(ModelContext(backend=Backend.HOST, xp=np))
    r = Replica(
        ReplicaIdentity(PIPE, "encode", f"{PIPE}.encode.0", "n1"), model, Backend.HOST, np,
        buffers=None, reports=Sink(), max_batch=1, max_wait_us=0, max_queue=8,
    )  # fmt: skip
    r.gpu.infer_gpu_us = lambda: 321  # type: ignore[method-assign]
    x = np.full(4096, 7, dtype=np.uint8)
    by_value = Intake(r).request(
        stage_pb2.InferRequest(
            query_id="q2", pipeline=PIPE, transport=tensor_pb2.TRANSPORT_WIRE,
            inputs=[tensor_pb2.Tensor(name="x", wire=wire_from_array(x))],
        ),
        None,
    )  # fmt: skip
    assert by_value.by_value
    r.start()
    try:
        # as the intake builds a request whose tensors all went by reference
        result = await r.infer(Request("q1", PIPE, "", {"x": x}, wire_out=True, by_value=False))
        second = await r.infer(by_value)
    finally:
        await r.close()
    assert result.gpu_us == second.gpu_us == 321  # the answer carries it either way
    got = [(s.query_id, s.gpu_us, s.compute_us) for s in sink]
    assert got == [("q1", 321, result.compute_us), ("q2", 0, second.compute_us)]


async def test_the_running_scheduler_learns_the_host_part_from_its_stream_and_shows_it(
    redis_server,
) -> None:
    settings = online_settings(
        redis_server.url, min_samples=50, profiles_path=str(DEFAULT_PROFILES), stage_host_ms=0.25
    )
    async with running(settings) as (port, sched):
        app = sched.app
        async with channel(f"127.0.0.1:{port}") as ch:
            await admin_pb2_grpc.ControlStub(ch).Heartbeat(gpu_heartbeat(), timeout=5)
            deadline = await first_plan(app)
            async with ReportWriter(redis_server.url, f"{PIPE}.encode.0@n1") as writer:
                end = int(time.time() * 1e6)
                for i in range(80):
                    writer.add(stage_report("encode", end + i, 3200, 2000))
            admin = admin_pb2_grpc.AdminStub(ch)
            meta = (("authorization", "Bearer t"),)
            while True:
                assert time.monotonic() < deadline + 20, "the host part was never learned"
                status = await admin.Status(admin_pb2.StatusRequest(), metadata=meta, timeout=5)
                rows = {s.stage: s for s in status.stats}
                if rows["encode"].host_count >= 50:
                    break
                await asyncio.sleep(0.05)
            # the next plan is priced with it, and says so (a result keeps it: plan_record)
            plan = await app.replan("test")
        assert abs(rows["encode"].host_ms - 1.2) < 0.012 and rows["encode"].host_count == 80
        # the stages that measured nothing plan with the setting, and say so
        assert (rows["decode"].host_ms, rows["decode"].host_count) == (0.25, 0)
    kept = {s["stage"]: s["host_ms"] for s in plan_record(plan)["stages"]}
    assert abs(kept[f"{PIPE}/encode"] - 1.2) < 0.012
    assert kept[f"{PIPE}/decode"] == kept[f"{PIPE}/preprocess"] == 0.25


def test_an_overloaded_window_teaches_no_host_part_nor_does_any_window_reaching_back_into_it():
    """A queue growing for a whole window (p99 past three times the target) is a saturated host's:
    on the H100 its host parts priced max-load's next plans at half its first."""
    now, mono = [10**12], [1000.0]
    w = make_world(now, min_samples=50, long_window_s=60.0)
    feed(w, now, "encode", [1000] * 60)
    w.observe_host_parts(mono[0])
    assert abs(w.host_ms(f"{PIPE}/encode")[0] - 1.0) < 0.01
    # overloaded: the stage's batches take 3 ms of host, the pipeline's p99 is 300 ms (QoS 60)
    feed(w, now, "encode", [3000] * 200)
    for _ in range(60):
        now[0] += 100
        w.windows.add(report_pb2.LatencyReport(kind=report_pb2.REPORT_KIND_QUERY, pipeline=PIPE,
                                               end_unix_us=now[0], total_us=300_000))  # fmt: skip
    w.last_snapshot = w.windows.snapshot(10.0)
    mono[0] += 10.0
    w.observe_host_parts(mono[0])
    assert abs(w.host_ms(f"{PIPE}/encode")[0] - 1.0) < 0.01  # unchanged
    # the load falls: the next window is not overloaded, and only it is read, not the minute
    # behind it that still holds the saturated batches
    now[0] += 11 * 10**6
    feed(w, now, "encode", [800] * 60)
    w.last_snapshot = w.windows.snapshot(10.0)
    mono[0] += 10.0
    w.observe_host_parts(mono[0])
    assert abs(w.host_ms(f"{PIPE}/encode")[0] - 0.8) < 0.01
