"""The node's routing table as a versioned value that many watchers can follow.

Every change (an apply, each step of a shadow replacement, a crash, a restart) publishes a new
revision; `Routes.epoch` is the applied plan epoch and `Routes.revision` counts changes, so a
watcher orders routes by (epoch, revision).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from protos import plan_pb2


class RouteBoard:
    def __init__(self) -> None:
        self.epoch = 0
        self.revision = 0
        self._endpoints: list[plan_pb2.Endpoint] = []
        self._changed = asyncio.Event()

    def publish(self, epoch: int, endpoints: Iterable[plan_pb2.Endpoint]) -> None:
        self.epoch = epoch
        self.revision += 1
        self._endpoints = list(endpoints)
        # wake every waiter of this revision; later waiters wait on a fresh event
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def routes(self) -> plan_pb2.Routes:
        return plan_pb2.Routes(epoch=self.epoch, revision=self.revision, endpoints=self._endpoints)

    async def wait_after(self, revision: int) -> plan_pb2.Routes:
        """The routes once their revision is past `revision`."""
        while self.revision <= revision:
            await self._changed.wait()
        return self.routes()

    async def changed(self) -> None:
        """Returns at the next publish."""
        await self._changed.wait()
