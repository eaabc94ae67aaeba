"""`camelotctl set-policy/set-qos --wait`: follow a new plan until it is in force.

A plan is in force once every live agent has applied its epoch (the Admin Status's
`applied_epoch` >= the plan's): its replicas started and warm, the replaced ones drained. While
waiting, a progress bar on stderr counts the plan's replicas the scheduler's routes show ready
with their planned share (a resize keeps the replica id, so the share is compared too).
"""

from __future__ import annotations

import asyncio
import time
from typing import TextIO

import grpc

from common.progress import Progress
from protos import admin_pb2, admin_pb2_grpc, plan_pb2

POLL_S = 0.5
CALL_DEADLINE_S = 10.0


class NotInForce(Exception):
    """The plan was not in force within the timeout."""


def ready_of_plan(plan: plan_pb2.Plan, routes: plan_pb2.Routes) -> int:
    """How many of the plan's replicas run ready with their planned share."""
    ready = {
        ep.replica.replica_id: ep.replica.sm_percent
        for ep in routes.endpoints
        if ep.state == plan_pb2.REPLICA_STATE_READY
    }
    return sum(
        1
        for st in plan.stages
        for r in st.replicas
        if r.replica_id in ready and abs(ready[r.replica_id] - r.sm_percent) < 1e-6
    )


async def _routes(control: admin_pb2_grpc.ControlStub) -> plan_pb2.Routes:
    call = control.WatchRoutes(admin_pb2.WatchRoutesRequest(), timeout=CALL_DEADLINE_S)
    try:
        first = await call.read()
    finally:
        call.cancel()
    return first if isinstance(first, plan_pb2.Routes) else plan_pb2.Routes()


async def wait_in_force(
    ch: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...],
    plan: plan_pb2.Plan,
    timeout_s: float,
    err: TextIO,
) -> int:
    """Returns the applied epoch once it reaches `plan.epoch`; NotInForce after `timeout_s`."""
    admin = admin_pb2_grpc.AdminStub(ch)
    control = admin_pb2_grpc.ControlStub(ch)
    total = sum(len(st.replicas) for st in plan.stages)
    deadline = time.monotonic() + timeout_s
    bar = Progress(f"camelotctl: plan epoch {plan.epoch}", max(total, 1), "replicas ready", err)
    applied = 0
    try:
        while True:
            status = await admin.Status(
                admin_pb2.StatusRequest(), metadata=metadata, timeout=CALL_DEADLINE_S
            )
            applied = int(status.applied_epoch)
            ready = ready_of_plan(plan, await _routes(control))
            bar.update(ready if total else 1)
            if applied >= plan.epoch:
                bar.close(f"in force (applied epoch {applied})")
                return applied
            if time.monotonic() > deadline:
                bar.close("timed out")
                raise NotInForce(
                    f"plan epoch {plan.epoch} not in force after {timeout_s:g} s: applied epoch "
                    f"{applied}, {ready}/{total} of its replicas ready"
                )
            await asyncio.sleep(POLL_S)
    finally:
        bar.close("interrupted")
