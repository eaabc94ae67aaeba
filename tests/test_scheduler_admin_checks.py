"""The operator's requests checked before anything changes (scheduler.service.admin): codes,
not messages."""

from __future__ import annotations

import grpc
import pytest

from common.errors import CamelotError
from protos import admin_pb2, agent_pb2
from scheduler.policy import PipelineInfo, StageInfo
from scheduler.service import admin
from scheduler.service.decisions import Decisions
from scheduler.service.inforce import PlanInForce
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows
from scheduler.service.world import World
from tests.test_scheduler_routes import plan

PIPE = PipelineInfo("p", (StageInfo("a"),), qos_p99_ms=100.0)


def world(*nodes: str) -> World:
    w = World(SchedulerSettings(), [PIPE], {}, Windows(bucket_s=0.25, horizon_s=120.0))
    for n in nodes:
        w.heard(admin_pb2.NodeHeartbeat(node=n, inventory=agent_pb2.InventoryResponse()))
    return w


def code(call: object, *args: object) -> grpc.StatusCode | None:
    try:
        call(*args)  # type: ignore[operator]
    except CamelotError as e:
        return e.code
    return None


def test_qos_needs_a_known_pipeline_and_a_finite_positive_target() -> None:
    w = world()
    assert code(admin.check_qos, w, "p", 50.0) is None
    assert code(admin.check_qos, w, "nope", 50.0) == grpc.StatusCode.NOT_FOUND
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert code(admin.check_qos, w, "p", bad) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_drain_names_one_known_thing_and_leaves_something_to_run_on() -> None:
    w, p = world("n1", "n2"), plan()
    assert code(admin.check_drain, w, p, "", "") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(admin.check_drain, w, p, "n1", "a0") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(admin.check_drain, w, p, "n9", "") == grpc.StatusCode.NOT_FOUND
    assert code(admin.check_drain, w, p, "", "zz") == grpc.StatusCode.NOT_FOUND
    assert code(admin.check_drain, w, p, "", "b0") == grpc.StatusCode.FAILED_PRECONDITION
    assert code(admin.check_drain, w, p, "", "a0") is None
    assert code(admin.check_drain, w, p, "n1", "") is None
    w.drained_nodes.add("n2")
    assert code(admin.check_drain, w, p, "n1", "") == grpc.StatusCode.FAILED_PRECONDITION


def test_status_reports_the_plan_per_pipeline_and_stage_and_refuses_a_bad_window() -> None:
    w = world("n1")
    f = PlanInForce(w.settings, w)
    f.adopt(plan())
    out = admin.status(w, f, Decisions(), 7, 0.0)
    assert out.plan.epoch == 4 and out.policy == "even" and out.reports_total == 7
    assert out.window_s == w.settings.window_s and out.nodes == ["n1"]
    assert [(s.pipeline, s.stage) for s in out.stats] == [("p", ""), ("p", "a")]
    assert [loop.pipeline for loop in out.loop] == ["p"]
    with pytest.raises(CamelotError) as e:
        admin.status(w, f, Decisions(), 0, -1.0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
