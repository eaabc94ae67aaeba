"""What the mesh is told: each agent its assignment, every gateway the routes.

Routes are the plan's epoch and the endpoints the live agents report, less the drained and the
gone; a `Broadcast` hands the newest to every watcher, one that falls behind skipping to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Set

from common.broadcast import Broadcast
from protos import agent_pb2, plan_pb2
from scheduler.service.nodes import NodeState

_GONE = (plan_pb2.REPLICA_STATE_STOPPED, plan_pb2.REPLICA_STATE_FAILED)


def assignment(plan: plan_pb2.Plan, node: str) -> agent_pb2.Assignment:
    """The replicas of `plan` that run on `node`."""
    out = agent_pb2.Assignment(epoch=plan.epoch, node=node)
    for st in plan.stages:
        for r in st.replicas:
            if r.node == node:
                out.replicas.add(replica=r, pipeline=st.pipeline, stage=st.stage)
    return out


def routes(
    epoch: int,
    live: Iterable[NodeState],
    drained_nodes: Set[str],
    drained_replicas: Set[str],
) -> plan_pb2.Routes:
    """The endpoints gateways may send to: live, not drained, neither stopped nor failed."""
    out = plan_pb2.Routes(epoch=epoch)
    for node in sorted(live, key=lambda n: n.name):
        if node.name in drained_nodes:
            continue
        for ep in node.endpoints:
            if ep.state in _GONE or ep.replica.replica_id in drained_replicas:
                continue
            out.endpoints.append(ep)
    return out


class RouteBroadcast:
    """The routes as every watching gateway follows them."""

    def __init__(self) -> None:
        self._routes: Broadcast[plan_pb2.Routes] = Broadcast(plan_pb2.Routes())

    def publish(self, routes: plan_pb2.Routes) -> None:
        self._routes.publish(routes)

    def close(self) -> None:
        """Ends every watch (before the server stops, so it need not wait for them)."""
        self._routes.close()

    async def watch(self, known_epoch: int) -> AsyncIterator[plan_pb2.Routes]:
        """The current routes (unless the watcher already has a newer epoch), then every change."""
        first = True
        async with contextlib.aclosing(self._routes.watch()) as watch:
            async for r in watch:
                if first and known_epoch and r.epoch <= known_epoch:
                    first = False
                    continue
                first = False
                yield r
