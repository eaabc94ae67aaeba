"""Re-planning (scheduler.service.replanning) against a real Redis: a plan stored under the next
epoch, an equal plan kept, drains applied, and Redis down answered as UNAVAILABLE."""

from __future__ import annotations

import grpc
import pytest

from common.errors import CamelotError
from protos import admin_pb2, agent_pb2
from scheduler.policy import PipelineInfo, PlanSpec, ReplicaSpec, StageAssignment, StageInfo
from scheduler.service import planstore
from scheduler.service.decisions import Decision, Decisions
from scheduler.service.inforce import PlanInForce
from scheduler.service.replanning import Replanner, without_drained
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows
from scheduler.service.world import World
from tests.conftest import RedisServer, free_port

PIPE = PipelineInfo("p", (StageInfo("a"),), qos_p99_ms=100.0)


def make(url: str) -> Replanner:
    s = SchedulerSettings(redis_url=url, policy="even")
    world = World(s, [PIPE], {}, Windows(bucket_s=0.25, horizon_s=120.0))
    for node in ("n1", "n2"):
        world.heard(admin_pb2.NodeHeartbeat(
            node=node, agent_address="127.0.0.1:1",
            inventory=agent_pb2.InventoryResponse(backend="host")))  # fmt: skip
    store = planstore.PlanStore(planstore.connect(url))
    return Replanner(s, world, PlanInForce(s, world), store, Decisions())


def replica(rid: str, node: str) -> ReplicaSpec:
    return ReplicaSpec(replica_id=rid, node=node, gpu=-1, sm_percent=0.0, max_batch=1)


async def test_a_plan_is_stored_under_the_next_epoch_and_an_equal_one_kept(
    redis_server: RedisServer,
) -> None:
    r = make(redis_server.url)
    try:
        first, stored = await r.replan("start")
        assert stored and first.epoch == 1 and r.inforce.plan is first
        assert (await r.store.load_plan()) == first
        kept, stored = await r.replan("again", force=False)
        assert not stored and kept is first
        assert r.decisions.last("p", Decision.KEPT) is not None
        forced, stored = await r.replan("forced")
        assert stored and forced.epoch == 2
    finally:
        await r.store.redis.aclose()  # type: ignore[attr-defined]


async def test_a_drained_node_gets_no_replica(redis_server: RedisServer) -> None:
    r = make(redis_server.url)
    try:
        r.world.drained_nodes.add("n2")
        plan, _ = await r.replan("drain")
        assert {rep.node for st in plan.stages for rep in st.replicas} == {"n1"}
    finally:
        await r.store.redis.aclose()  # type: ignore[attr-defined]


async def test_a_redis_that_cannot_be_reached_fails_the_replan_as_unavailable() -> None:
    r = make(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(CamelotError) as e:
            await r.replan("start")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert r.inforce.plan.epoch == 0
    finally:
        await r.store.redis.aclose()  # type: ignore[attr-defined]


def test_drains_take_replicas_and_nodes_out_but_never_a_stages_last() -> None:
    spec = PlanSpec(
        policy="even",
        stages=(
            StageAssignment(
                "p", "a", (replica("a0", "n1"), replica("a1", "n2"), replica("a2", "n3"))
            ),
            StageAssignment("p", "b", (replica("b0", "n2"),)),
        ),
    )
    out = without_drained(spec, {"n2"}, {"a0"})
    assert [x.replica_id for x in out.stages[0].replicas] == ["a2"]
    assert [x.replica_id for x in out.stages[1].replicas] == ["b0"]  # its only replica stays
    assert without_drained(spec, set(), set()) is spec
