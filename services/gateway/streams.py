"""Stage calls on long-lived streams: one `InferStream` per replica, many calls in flight on it.

A call is queued in the stream's outbox and the writer sends everything queued in one message,
so calls made in the same turn of the event loop (and those made while a write is under way)
share a message; answers come back the same way, matched by call id. A Python gRPC message on
an open stream costs about half a unary call, and a batch of calls costs about one message.

Semantics match a unary `Infer`: each call has its deadline (sent as a budget, enforced here
too), a cancelled call is cancelled at the replica (dropped if still queued), an error comes
back as the call's own status (RESOURCE_EXHAUSTED with its retry-after, UNAVAILABLE while
draining), and a stream that breaks (the replica died, or was stopped) fails every call in
flight on it with UNAVAILABLE, so the gateway retries them on another replica; the next call
opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from common.errors import (
    RETRY_AFTER_KEY,
    CamelotError,
    DeadlineExceeded,
    Unavailable,
    error_for_status,
)
from protos import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

__all__ = ["RETRY_AFTER_KEY", "ReplicaStream"]


class ReplicaStream:
    def __init__(
        self,
        stub: stage_pb2_grpc.StageStub,
        address: str,
        on_broken: Callable[[str, CamelotError], None] | None = None,
    ) -> None:
        self.stub = stub
        self.address = address
        # told when the stream breaks (not when closed): the caller drops the channel, whose
        # reconnect backoff would hold a new stream, and avoids the replica for a while
        self.on_broken = on_broken
        self._pending: dict[int, asyncio.Future[stage_pb2.InferResponse]] = {}
        # (call id, deadline on the loop's clock, request): ids and budgets are set when sent
        self._outbox: list[tuple[int, float, stage_pb2.InferRequest]] = []
        self._cancels: list[int] = []
        self._wake = asyncio.Event()
        self._next_id = 0
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def infer(
        self, request: stage_pb2.InferRequest, timeout_s: float
    ) -> stage_pb2.InferResponse:
        """One call on the stream; raises the call's own error (a Camelot error)."""
        if self._closed:
            raise Unavailable(f"stream to {self.address} is closed")
        if self._call is None:
            self._open()
        self._next_id += 1
        call_id = self._next_id
        loop = asyncio.get_running_loop()
        future: asyncio.Future[stage_pb2.InferResponse] = loop.create_future()
        self._pending[call_id] = future
        self._outbox.append((call_id, loop.time() + timeout_s, request))
        self._wake.set()
        timer = loop.call_later(timeout_s, self._expire, call_id)
        try:
            return await future
        except asyncio.CancelledError:
            if call_id in self._pending:
                self._cancel(call_id)
            raise
        finally:
            timer.cancel()
            self._pending.pop(call_id, None)

    async def close(self) -> None:
        self._closed = True
        self._fail_all(Unavailable(f"stream to {self.address} closed"))
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None

    # -- inside ------------------------------------------------------------------------------

    def _open(self) -> None:
        call = self.stub.InferStream(self._messages())
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(self._read(call))

    async def _messages(self) -> AsyncIterator[stage_pb2.InferBatch]:
        """What the stream sends: everything queued since the last message, as one message."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = asyncio.get_running_loop().time()
            requests = []
            for call_id, deadline, request in self._outbox:
                if call_id not in self._pending:
                    continue  # expired or cancelled before it was sent
                request.call_id = call_id
                request.budget_us = max(1, int((deadline - now) * 1e6))
                # the batch copies the request now: a retry elsewhere may reuse the object
                requests.append(request)
            self._outbox = []
            if not requests and not self._cancels:
                continue
            batch = stage_pb2.InferBatch(requests=requests, cancel=self._cancels)
            self._cancels = []
            yield batch

    async def _read(self, call: Any) -> None:
        error: CamelotError
        try:
            async for answers in call:
                for result in answers.results:
                    future = self._pending.get(result.call_id)
                    if future is None or future.done():
                        continue
                    if result.code == 0:
                        future.set_result(result.response)
                    else:
                        future.set_exception(
                            error_for_status(
                                result.code, result.message, result.retry_after_ms or None
                            )
                        )
            error = Unavailable(f"stream to {self.address} ended")
        except asyncio.CancelledError:
            error = Unavailable(f"stream to {self.address} cancelled")
            raise
        except grpc.aio.AioRpcError as e:
            error = Unavailable(f"stream to {self.address} broke: {e.code().name} {e.details()}")
        except Exception as e:  # never leave calls hanging on a reader that died
            log.exception("reading the stream to %s failed", self.address)
            error = Unavailable(f"stream to {self.address} failed: {e}")
        finally:
            if self._call is call:
                self._call = None
                self._outbox = []
                self._cancels = []
                self._fail_all(error)
                if not self._closed and self.on_broken is not None:
                    self.on_broken(self.address, error)

    def _fail_all(self, error: CamelotError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(type(error)(error.message))
        self._pending.clear()

    def _cancel(self, call_id: int) -> None:
        self._pending.pop(call_id, None)
        if self._call is not None and not any(c == call_id for c, _, _ in self._outbox):
            self._cancels.append(call_id)
            self._wake.set()

    def _expire(self, call_id: int) -> None:
        future = self._pending.get(call_id)
        if future is not None and not future.done():
            future.set_exception(DeadlineExceeded(f"stage call on {self.address} timed out"))
            self._cancel(call_id)
