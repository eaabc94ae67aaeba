"""Dynamic batching: requests queue up; a batch closes at `max_batch` or `max_wait_us` after its
first request was taken, whichever comes first, and runs while the next one fills. A batch waits
only when the recent arrival rate makes company likely within `max_wait_us`
(`contract.batching`), so at low load a request never waits for others that are not coming.

The batcher knows nothing of models or gRPC: it hands each closed batch to `run_batch`, which
must settle every item's future. Times are integer microseconds on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common.clock import mono_us
from common.errors import CamelotError, DeadlineExceeded, ResourceExhausted, Unavailable
from contract.batching import ArrivalRate, effective_wait

log = logging.getLogger(__name__)

# How long a client should wait before retrying a full queue, as a hint in the status trailer.
RETRY_AFTER_MS = 20


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(slots=True)
class Item:
    """One request waiting for a batch; `payload` is whatever `run_batch` needs."""

    payload: Any
    deadline_us: int | None = None
    arrived_us: int = field(default_factory=mono_us)
    taken_us: int = 0
    batch_started_us: int = 0
    batch_size: int = 0
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def queue_us(self) -> int:
        return self.taken_us - self.arrived_us


RunBatch = Callable[[list[Item]], Awaitable[None]]


class Batcher:
    def __init__(
        self, run_batch: RunBatch, max_batch: int, max_wait_us: int, max_queue: int
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_us < 0:
            raise ValueError(f"max_wait_us must be >= 0, got {max_wait_us}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_us = max_wait_us
        self.max_queue = max_queue
        self.state = State.IDLE
        self.completed = 0
        # a deque and one event, not an asyncio.Queue: a queue wakes its getter through a future
        # of its own per item, on top of the event the batch window waits on
        self._queue: deque[Item] = deque()
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrivals = ArrivalRate()
        self._arrived = asyncio.Event()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self.state = State.RUNNING
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def submit(self, payload: Any, deadline_us: int | None = None) -> Any:
        """Queues one request and waits for its result (or the error its batch raised for it)."""
        return await self.submit_nowait(payload, deadline_us)

    def submit_nowait(self, payload: Any, deadline_us: int | None = None) -> asyncio.Future[Any]:
        """Queues one request; its future settles with the result (or the batch's error for it).
        Cancelling the future drops the request if it is still queued. Raises at once when the
        replica is not running or its queue is full."""
        if self.state is not State.RUNNING:
            raise Unavailable(f"replica is {self.state.value}, not taking requests")
        if len(self._queue) >= self.max_queue:
            raise ResourceExhausted(
                f"queue full ({self.max_queue} waiting)", retry_after_ms=RETRY_AFTER_MS
            )
        now = mono_us()
        item = Item(payload, deadline_us, now, future=asyncio.get_running_loop().create_future())
        self._arrivals.arrived(now)
        self._idle.clear()
        self._queue.append(item)
        self._arrived.set()
        return item.future

    async def _take(self) -> list[Item]:
        queue = self._queue
        while not queue:
            self._arrived.clear()
            await self._arrived.wait()
        first = queue.popleft()
        first.taken_us = mono_us()
        batch = [first]
        wait_us = effective_wait(self._arrivals.per_us(first.taken_us), self.max_wait_us)
        close_at = first.taken_us + int(wait_us)
        while len(batch) < self.max_batch:
            if queue:
                item = queue.popleft()
                item.taken_us = mono_us()
                batch.append(item)
                continue
            wait_us = close_at - mono_us()
            if wait_us <= 0:
                break
            # one timer for the rest of the window (wait_for would make a task per item)
            self._arrived.clear()
            try:
                async with asyncio.timeout(wait_us / 1e6):
                    await self._arrived.wait()
            except TimeoutError:
                break
        return batch

    def _live(self, batch: list[Item]) -> list[Item]:
        """Drops requests whose caller gave up or whose deadline passed while they queued."""
        now = mono_us()
        live = []
        for item in batch:
            if item.future.done():
                continue
            if item.deadline_us is not None and now >= item.deadline_us:
                item.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(item)
        return live

    async def _loop(self) -> None:
        while True:
            batch = await self._take()
            self._busy = True
            try:
                live = self._live(batch)
                if live:
                    started = mono_us()
                    for item in live:
                        item.batch_started_us = started
                        item.batch_size = len(live)
                    await self.run_batch(live)
                    self.completed += len(live)
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(
                            RuntimeError("run_batch left a request unsettled")
                        )
            except Exception as e:
                # The loop never dies: the batch fails, the replica goes on. A Camelot error is
                # the request's fault (an ended lease, say) and carries its status: no traceback
                if isinstance(e, CamelotError):
                    log.warning("batch of %d failed: %s %s", len(batch), e.code.name, e.message)
                else:
                    log.exception("batch of %d failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
            finally:
                self._busy = False
                if not self._queue:
                    self._idle.set()

    async def drain(self) -> int:
        """Stops taking requests and returns once every queued request has been answered."""
        if self.state is State.RUNNING:
            self.state = State.DRAINING
        before = self.completed
        while self._queue or self._busy:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 0.05)
        return self.completed - before

    def refuse(self, error: CamelotError) -> int:
        """Stops taking requests at once and fails every queued one with `error` (a replica
        whose GPU context is lost runs nothing more); returns how many were queued."""
        self.state = State.STOPPED
        failed = 0
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(error)
                failed += 1
        self._idle.set()
        return failed

    async def stop(self) -> None:
        self.state = State.STOPPED
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Unavailable("replica stopped"))
