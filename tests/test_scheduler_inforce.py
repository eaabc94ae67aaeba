"""The plan in force (scheduler.service.inforce.PlanInForce): when every agent runs it, which
measurements speak for it, and when a moved bias calls a re-plan. No Redis, no gRPC."""

from __future__ import annotations

import time

from protos import admin_pb2, agent_pb2, plan_pb2
from scheduler.policy import PipelineInfo, StageInfo
from scheduler.service.inforce import BIAS_REPLAN_RATIO, PlanInForce
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows, WindowStat
from scheduler.service.world import World

PIPE = PipelineInfo("p", (StageInfo("a"),), qos_p99_ms=100.0)


def make(window_s: float = 10.0) -> PlanInForce:
    s = SchedulerSettings(window_s=window_s)
    world = World(s, [PIPE], {}, Windows(bucket_s=0.25, horizon_s=120.0))
    return PlanInForce(s, world)


def beat(f: PlanInForce, node: str, epoch: int, agent: str = "127.0.0.1:1") -> None:
    inv = agent_pb2.InventoryResponse(backend="host")
    f.world.heard(admin_pb2.NodeHeartbeat(node=node, agent_address=agent, inventory=inv,
                                          applied_epoch=epoch))  # fmt: skip


def test_a_plan_is_applied_once_every_live_agent_runs_it() -> None:
    f = make()
    f.adopt(plan_pb2.Plan(epoch=2))
    beat(f, "n1", 2)
    beat(f, "n2", 1)
    beat(f, "reporter", 0, agent="")  # reports without an agent: nothing to wait for
    assert f.applied_at() is None
    assert f.applied_epoch() == 1
    beat(f, "n2", 2)
    assert f.applied_at() is not None
    assert f.applied_epoch() == 2


def test_a_pipelines_p99_is_no_evidence_until_the_plan_has_settled() -> None:
    f = make(window_s=10.0)
    f.adopt(plan_pb2.Plan(epoch=1))
    f.world.last_snapshot = {
        ("p", ""): WindowStat("p", "", 80, 1.0, 2.0, 3.0, 5.0, 5.0, 0),
        ("p", "a"): WindowStat("p", "a", 80, 1.0, 2.0, 3.0, 5.0, 5.0, 0),
    }
    unsettled = f.policy_input().measured
    assert unsettled["p"].count == 0 and unsettled["p/a"].count == 80
    f.applied_at()  # applied now (no agents) ...
    f._applied = (1, time.monotonic() - 11.0)  # ... and a window ago
    assert f.policy_input().measured["p"].count == 80


def test_a_bias_that_moved_past_the_ratio_since_the_plan_names_its_key() -> None:
    f = make()
    f.world.bias.update("p/a", 2.0, 1.0)
    f.made_for(f.policy_input({}))
    assert f.bias_moved() == ""  # the plan was made with this factor
    factor = f.world.bias.factor("p/a")
    while f.world.bias.factor("p/a") <= factor * BIAS_REPLAN_RATIO:
        f.world.bias.update("p/a", 2.0, 1.0)
    assert f.bias_moved() == "p/a"


def test_made_for_notes_the_load_nodes_and_time_it_planned_against() -> None:
    f = make()
    beat(f, "n1", 0)
    f.world.last_snapshot = {("p", ""): WindowStat("p", "", 80, 1.0, 2.0, 3.0, 5.0, 5.0, 0)}
    f.made_for(f.policy_input({}))
    assert f.planned_load == {"p": 5.0}
    assert f.planned_nodes == frozenset({"n1"})
    assert f.made_at > 0


def test_without_a_plan_or_profiles_nothing_is_at_risk_or_learnt() -> None:
    f = make()
    assert not f.at_risk()
    f.adopt(plan_pb2.Plan(epoch=1))
    assert not f.at_risk()  # no profiles: nothing to predict with
    f.observe_bias()
    assert f.world.bias.factors() == {}
