"""The node's routing table as a versioned value that many watchers can follow.

Every change (an apply, each step of a shadow replacement, a crash, a restart) publishes a new
revision; `Routes.epoch` is the applied plan epoch and `Routes.revision` counts changes, so a
watcher orders routes by (epoch, revision). The revision is the broadcast's version.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.broadcast import Broadcast
from protos import plan_pb2


class RouteBoard:
    def __init__(self) -> None:
        self._routes: Broadcast[plan_pb2.Routes] = Broadcast(plan_pb2.Routes())

    @property
    def epoch(self) -> int:
        return self._routes.value.epoch

    @property
    def revision(self) -> int:
        return self._routes.version

    def publish(self, epoch: int, endpoints: Iterable[plan_pb2.Endpoint]) -> None:
        # the revision is part of the value, so even unchanged endpoints make a new revision
        # (and wake the heartbeat that waits on changed())
        routes = plan_pb2.Routes(epoch=epoch, revision=self.revision + 1, endpoints=endpoints)
        self._routes.publish(routes)

    def routes(self) -> plan_pb2.Routes:
        out = plan_pb2.Routes()
        out.CopyFrom(self._routes.value)
        return out

    async def wait_after(self, revision: int) -> plan_pb2.Routes:
        """The routes once their revision is past `revision`."""
        await self._routes.wait_after(revision)
        return self.routes()

    async def changed(self) -> None:
        """Returns at the next publish."""
        await self._routes.wait_after(self.revision)
