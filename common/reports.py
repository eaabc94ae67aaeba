"""The latency-report writer every service uses: buffered, batched, one Redis round trip per tick.

`add()` only appends to an in-memory buffer, so the request path never waits on Redis. A
background task wakes at most once per `flush_interval_s` and sends everything buffered as one
`ReportBatch` in one `XADD` (field `b`) with approximate `MAXLEN` trimming, so the cost to Redis
is bounded per process whatever the request rate.

When Redis is down serving goes on: the failed batch and any report that overflows the buffer
are counted as dropped (in `common.metrics.REPORTS_DROPPED`, and in `ReportBatch.dropped` of
the next successful flush, so the scheduler knows its windows are thin), and the writer retries
with capped exponential backoff and full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common import metrics
from common.retry import Backoff
from protos import report_pb2

log = logging.getLogger(__name__)

STREAM = "camelot:reports"
FIELD = b"b"
# how long a flush (or the final one in aclose) may take before it counts as failed
FLUSH_TIMEOUT_S = 2.0
REDIS_BACKOFF = Backoff(base_s=0.1, cap_s=5.0)


class ReportSink(Protocol):
    """What a service needs of a report writer (tests pass a list-backed one)."""

    def add(self, report: report_pb2.LatencyReport) -> None: ...


class ReportWriter:
    """Buffers `LatencyReport`s and flushes them to a Redis stream from a background task."""

    def __init__(
        self,
        redis_url: str,
        source: str,
        stream: str = STREAM,
        flush_interval_s: float = 0.05,
        maxlen: int = 100_000,
        max_buffer: int = 50_000,
        backoff: Backoff = REDIS_BACKOFF,
        service: str = "",
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s!r}")
        if maxlen <= 0 or max_buffer <= 0:
            raise ValueError(f"maxlen and max_buffer must be > 0, got {maxlen!r}, {max_buffer!r}")
        self.redis_url = redis_url
        self.source = source
        self.stream = stream
        self.flush_interval_s = flush_interval_s
        self.maxlen = maxlen
        self.max_buffer = max_buffer
        self.backoff = backoff
        self._dropped_metric = metrics.REPORTS_DROPPED.labels(
            service=service or source.split("@", 1)[0]
        )
        self._buffer: list[report_pb2.LatencyReport] = []
        # drops not yet announced in a successful batch
        self._pending_dropped = 0
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # redis-py's own retries would add round trips; the writer's loop is the retry
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=FLUSH_TIMEOUT_S,
            socket_connect_timeout=FLUSH_TIMEOUT_S,
            retry=RedisRetry(NoBackoff(), 0),
        )
        # counters, for tests and status
        self.flushes = 0
        self.sent_total = 0
        self.dropped_total = 0

    def add(self, report: report_pb2.LatencyReport) -> None:
        """Queues one report; never blocks. Over `max_buffer` the report is dropped and counted."""
        if len(self._buffer) >= self.max_buffer:
            self._drop(1)
            return
        self._buffer.append(report)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def connected(self) -> bool:
        """Whether the last flush attempt reached Redis."""
        return self._failures == 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"report-writer:{self.source}")

    async def aclose(self) -> None:
        """Stops the loop, makes a final best-effort flush, closes the connection pool."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._buffer or self._pending_dropped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_TIMEOUT_S):
                    await self.flush()
        await self._redis.aclose()  # type: ignore[attr-defined]  # stubs predate 5.0

    async def __aenter__(self) -> ReportWriter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def flush(self) -> bool:
        """Sends the buffer as one batch; True if Redis took it (or there was nothing to send)."""
        if not self._buffer and not self._pending_dropped:
            return True
        reports, self._buffer = self._buffer, []
        batch = report_pb2.ReportBatch(dropped=self._pending_dropped, source=self.source)
        batch.reports.extend(reports)
        try:
            await self._redis.xadd(
                self.stream,
                {FIELD: batch.SerializeToString()},
                maxlen=self.maxlen,
                approximate=True,
            )
        except asyncio.CancelledError:
            self._drop(len(reports))
            raise
        except (RedisError, OSError, TimeoutError) as e:
            self._drop(len(reports))
            self._failures += 1
            if self._failures == 1:
                log.warning("report flush to %s failed (%s); dropping and retrying", self.stream, e)
            return False
        if self._failures:
            log.info("report flush to %s recovered after %d failures", self.stream, self._failures)
        self._failures = 0
        self._pending_dropped = 0
        self.flushes += 1
        self.sent_total += len(reports)
        return True

    def _drop(self, n: int) -> None:
        self._pending_dropped += n
        self.dropped_total += n
        self._dropped_metric.inc(n)

    async def _run(self) -> None:
        while not self._closing:
            started = time.monotonic()
            try:
                ok = await self.flush()
            except Exception:  # the loop never dies: a bug here must not stop reporting
                log.exception("report writer iteration failed")
                ok = False
            wait_s = self.flush_interval_s - (time.monotonic() - started)
            if not ok:
                wait_s = max(wait_s, self.backoff.delay_s(min(self._failures, 30)))
            await asyncio.sleep(max(0.0, wait_s))
