"""The agent's heartbeat to the scheduler: node, inventory and replicas out; assignment back.

Beats every `heartbeat_s`, and at once when the routes change (so the scheduler, and through it
the gateways, see a shadow replacement's steps without waiting). The answer is the newest
assignment for the node; a newer epoch than the applied one is applied in the background, so a
slow apply never stops the beat. The loop never dies: a failed beat is logged and retried with
capped exponential backoff (the scheduler may be down or restarting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from common.lifecycle import TlsFiles, channel
from common.retry import Backoff
from protos import admin_pb2, admin_pb2_grpc
from services.agent.apply import Agent

log = logging.getLogger(__name__)

# log every failure until this many in a row, then one in LOG_EVERY
QUIET_AFTER = 3
LOG_EVERY = 30
BACKOFF_CAP_S = 10.0


class Heartbeat:
    def __init__(
        self,
        agent: Agent,
        scheduler_addr: str,
        agent_address: str,
        interval_s: float,
        timeout_s: float,
        tls: TlsFiles | None = None,
    ) -> None:
        self.tls = tls
        self.agent = agent
        self.scheduler_addr = scheduler_addr
        self.agent_address = agent_address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.sequence = 0
        self.failures = 0
        # after a failed beat: the interval, doubling to the cap, the latter half of it at random
        self.backoff = Backoff(interval_s, max(BACKOFF_CAP_S, interval_s), jitter=0.5)

    def delay_s(self) -> float:
        if self.failures == 0:
            return self.interval_s
        return self.backoff.delay_s(self.failures - 1)

    async def beat(self, stub: admin_pb2_grpc.ControlStub) -> None:
        self.sequence += 1
        request = admin_pb2.NodeHeartbeat(
            node=self.agent.settings.node,
            agent_address=self.agent_address,
            inventory=await self.agent.inventory(),
            replicas=self.agent.endpoints(),
            applied_epoch=self.agent.epoch,
            sequence=self.sequence,
            start_failures=self.agent.start_failures(),
        )
        assignment = await stub.Heartbeat(request, timeout=self.timeout_s)
        self.agent.heartbeats += 1
        if assignment.epoch > self.agent.epoch:
            log.info("scheduler has epoch %d (applied %d): applying", assignment.epoch,
                     self.agent.epoch)  # fmt: skip
            self.agent.submit(assignment)

    async def run(self) -> None:
        async with channel(self.scheduler_addr, self.tls) as ch:
            stub = admin_pb2_grpc.ControlStub(ch)
            while True:
                try:
                    await self.beat(stub)
                    if self.failures:
                        log.info("scheduler %s answers again after %d failed heartbeats",
                                 self.scheduler_addr, self.failures)  # fmt: skip
                    self.failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.failures += 1
                    if self.failures <= QUIET_AFTER or self.failures % LOG_EVERY == 0:
                        detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else repr(e)
                        log.warning("heartbeat %d to %s failed (%d in a row): %s", self.sequence,
                                    self.scheduler_addr, self.failures, detail)  # fmt: skip
                await self._pause()

    async def _pause(self) -> None:
        """Sleeps until the next beat; a route change cuts it short while the scheduler answers."""
        delay = self.delay_s()
        if self.failures:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.agent.board.changed(), delay)
