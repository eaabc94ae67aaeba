"""The operator's requests checked against what the scheduler knows, and its status report.

The checks raise the error an admin RPC answers with (NOT_FOUND, INVALID_ARGUMENT,
FAILED_PRECONDITION) before anything changes; `status` reads, it changes nothing.
"""

from __future__ import annotations

import math

from common.errors import FailedPrecondition, InvalidArgument, NotFound
from protos import admin_pb2, plan_pb2
from scheduler.service.decisions import Decisions
from scheduler.service.inforce import PlanInForce
from scheduler.service.nodes import replica_status
from scheduler.service.windows import admin_stats
from scheduler.service.world import World


def check_qos(world: World, pipeline: str, qos_p99_ms: float) -> None:
    if pipeline not in world.pipelines:
        raise NotFound(f"unknown pipeline {pipeline!r}")
    if not math.isfinite(qos_p99_ms) or qos_p99_ms <= 0:
        raise InvalidArgument(f"qos_p99_ms must be a finite number > 0, got {qos_p99_ms}")


def check_drain(world: World, plan: plan_pb2.Plan, node: str, replica_id: str) -> None:
    """Whether exactly one of a node and a replica is named, known, and may be drained: a node
    when another stays to run on, a replica when its stage keeps another."""
    if bool(node) == bool(replica_id):
        raise InvalidArgument("give exactly one of node and replica_id")
    if node:
        planned = {r.node for st in plan.stages for r in st.replicas}
        if node not in world.nodes and node not in planned:
            raise NotFound(f"unknown node {node!r}")
        if not [n for n in world.placeable_nodes() if n.name != node]:
            raise FailedPrecondition(f"draining {node!r} would leave no node to run on")
        return
    stage = next(
        (st for st in plan.stages for r in st.replicas if r.replica_id == replica_id), None
    )
    if stage is None:
        raise NotFound(f"no replica {replica_id!r} in the plan")
    if len(stage.replicas) == 1:
        raise FailedPrecondition(
            f"{replica_id!r} is the only replica of {stage.pipeline}/{stage.stage}"
        )


def status(
    world: World,
    inforce: PlanInForce,
    record: Decisions,
    reports_total: int,
    window_s: float,
) -> admin_pb2.StatusResponse:
    """The plan, the policy, live nodes, the profiles planned with, per pipeline and stage the
    window's figures against the plan's replicas, what the loop decided, and each replica's
    state."""
    if window_s < 0 or not math.isfinite(window_s):
        raise InvalidArgument(f"window_s must be >= 0, got {window_s}")
    window_s = window_s or world.settings.window_s
    snap = world.windows.snapshot(window_s)
    plan = inforce.plan
    planned: dict[tuple[str, str], list[plan_pb2.ReplicaPlan]] = {}
    for st in plan.stages:
        planned.setdefault((st.pipeline, st.stage), []).extend(st.replicas)
    out = admin_pb2.StatusResponse(
        plan=plan,
        policy=world.choice.name,
        nodes=sorted(n.name for n in world.live_nodes()),
        reports_total=reports_total,
        window_s=window_s,
        applied_epoch=inforce.applied_epoch(),
        profiles=world.profiles_note,
    )
    for name, p in world.pipelines.items():
        all_replicas = [r for s in p.stages for r in planned.get((name, s.name), [])]
        out.stats.append(
            admin_stats(snap.get((name, "")), name, "", all_replicas, world.qos_of(name))
        )
        for s in p.stages:
            reps = planned.get((name, s.name), [])
            row = admin_stats(snap.get((name, s.name)), name, s.name, reps, 0.0)
            row.host_ms, row.host_count = world.host_ms(f"{name}/{s.name}")
            out.stats.append(row)
    load = world.load_qps()
    for name in world.pipelines:
        planned_qps = plan.planned_qps.get(name, 0.0)
        out.loop.append(record.to_proto(name, planned_qps, load.get(name, 0.0)))
    out.replicas.extend(replica_status(plan, world.live_nodes()))
    return out
