"""Reads latency-report batches from the Redis stream through a consumer group into the windows.

The loop never dies: a Redis outage, a restart that lost the stream and its group (NOGROUP), or
a malformed entry is logged and backed off from; the group is (re)created with MKSTREAM when
missing. A new group starts at the beginning of the stream: reports too old for the windows are
discarded there, and nothing written between a Redis restart and the group's re-creation is lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from common.reports import FIELD, REDIS_BACKOFF, STREAM
from common.retry import Backoff
from protos import report_pb2
from scheduler.service.windows import Windows

log = logging.getLogger(__name__)

GROUP = "scheduler"


class ReportReader:
    """XREADGROUP → ReportBatch → Windows, then XACK."""

    def __init__(
        self,
        redis_url: str,
        windows: Windows,
        stream: str = STREAM,
        group: str = GROUP,
        consumer: str = "scheduler-0",
        block_ms: int = 200,
        count: int = 256,
        backoff: Backoff = REDIS_BACKOFF,
    ) -> None:
        self.windows = windows
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.count = count
        self.backoff = backoff
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=block_ms / 1000 + 2.0,
            socket_connect_timeout=2.0,
            retry=RedisRetry(NoBackoff(), 0),
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._group_ready = False
        self._failures = 0
        # counters, for status and tests
        self.batches_total = 0
        self.reports_total = 0
        self.dropped_total = 0  # drops the writers announced
        self.errors_total = 0
        self.iterations = 0

    @property
    def connected(self) -> bool:
        return self._failures == 0 and self._group_ready

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="report-reader")

    async def aclose(self) -> None:
        self._stopping = True  # as well as cancel: see ControlLoop.aclose
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._redis.aclose()  # type: ignore[attr-defined]  # stubs predate 5.0

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.read_once()
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.errors_total += 1
                self._failures += 1
                self._group_ready = False
                if self._failures == 1:
                    log.warning("report reader: %s; backing off", e)
                elif not isinstance(e, RedisError | OSError):
                    log.exception("report reader iteration failed")
                delay = self.backoff.delay_s(min(self._failures, 30))
                await asyncio.sleep(max(delay, 0.05))

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def read_once(self) -> int:
        """One XREADGROUP (blocking up to block_ms); returns the reports read."""
        self.iterations += 1
        if not self._group_ready:
            await self.ensure_group()
        try:
            resp: Any = await self._redis.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=self.count,
                block=self.block_ms,
            )
        except ResponseError as e:
            if "NOGROUP" in str(e):
                # Redis restarted without the stream: make the group again next time
                self._group_ready = False
                return 0
            raise
        n = 0
        ids: list[Any] = []
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                ids.append(entry_id)
                n += self._ingest(entry_id, fields)
        if ids:
            await self._redis.xack(self.stream, self.group, *ids)  # type: ignore[no-untyped-call]
            # Read and acknowledged: the entries are in the windows now, so the stream keeps only
            # what is unread (the writers' MAXLEN still bounds it while no scheduler reads).
            await self._redis.xtrim(self.stream, minid=ids[-1], approximate=True)
        return n

    def _ingest(self, entry_id: Any, fields: Any) -> int:
        raw = (fields or {}).get(FIELD)
        if raw is None:
            log.warning("report entry %r has no field %r; skipped", entry_id, FIELD)
            return 0
        batch = report_pb2.ReportBatch()
        try:
            batch.ParseFromString(raw)
        except DecodeError:
            log.warning("report entry %r is not a ReportBatch; skipped", entry_id)
            return 0
        self.windows.add_all(batch.reports)
        self.batches_total += 1
        self.reports_total += len(batch.reports)
        self.dropped_total += batch.dropped
        return len(batch.reports)
