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

Forward mode (`forwarding.py`) adds to a stream: its first message names it (`stream_id`, a
random id per opened stream) and the replica acknowledges, so replicas may answer forwarded
calls on it (`wait_ready`); forwarded calls' answers, which come on whichever stream of their
route answers, are matched by call id in the gateway's `Forwarded` registry (call ids are then
unique among all of the gateway's streams); and a stream that breaks answers UNAVAILABLE for
every forwarded call routed through its replica, as it fails its own calls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
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

__all__ = ["RETRY_AFTER_KEY", "ForwardAnswer", "Forwarded", "ReplicaStream"]


@dataclass(slots=True)
class ForwardAnswer:
    """How a forwarded attempt ended: the answer of the replica that answered (the last step's
    outputs, or an error with the steps finished), or `broken`: the address of a replica on the
    route whose stream broke (how far the query got is then unknown)."""

    result: stage_pb2.InferResult
    broken: str = ""


@dataclass
class Forwarded:
    """Forwarded calls in flight, shared by the gateway's streams: one id space for every call
    of every stream, so an answer on any stream finds its call."""

    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    calls: dict[int, asyncio.Future[ForwardAnswer]] = field(default_factory=dict)


class ReplicaStream:
    def __init__(
        self,
        stub: stage_pb2_grpc.StageStub,
        address: str,
        on_broken: Callable[[str, CamelotError], None] | None = None,
        forwarded: Forwarded | None = None,
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
        # which call's request generator is the live one: a generator whose call ended returns
        # at its next wake-up instead of taking the outbox that the next call's should send
        self._gen = 0
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # forward mode: the shared registry, this stream's announced id and its acknowledgement,
        # and the forwarded calls whose route passes this replica
        self.forwarded = forwarded
        self.stream_id = ""
        self._acked: asyncio.Future[None] | None = None
        self._routed: set[int] = set()
        self._ids = forwarded.ids if forwarded is not None else None

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
        if self._ids is None:
            self._next_id += 1
            call_id = self._next_id
        else:
            call_id = next(self._ids)
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

    # -- forward mode ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Open and acknowledged: replicas may answer forwarded calls on it."""
        return self._acked is not None and self._acked.done() and self._call is not None

    async def wait_ready(self) -> None:
        """Opens the stream if needed and waits for the replica to acknowledge its id; raises
        Unavailable if the stream breaks first."""
        if self._closed:
            raise Unavailable(f"stream to {self.address} is closed")
        if self._call is None:
            self._open()
        assert self._acked is not None
        await asyncio.shield(self._acked)

    def send_forward(self, call_id: int, request: stage_pb2.InferRequest, timeout_s: float) -> None:
        """Sends a forwarded query's first step; its answer comes through `Forwarded`."""
        self._outbox.append((call_id, asyncio.get_running_loop().time() + timeout_s, request))
        self._wake.set()

    def route(self, call_id: int) -> None:
        self._routed.add(call_id)

    def unroute(self, call_id: int) -> None:
        self._routed.discard(call_id)

    def cancel(self, call_id: int) -> None:
        """Tells the replica to drop the call (a forwarded one: wherever it is queued here)."""
        if self._call is not None:
            self._cancels.append(call_id)
            self._wake.set()

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
        if self.forwarded is not None:
            self.stream_id = secrets.token_hex(8)
            self._acked = asyncio.get_running_loop().create_future()
        self._gen += 1
        call = self.stub.InferStream(self._messages(self._gen))
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(self._read(call))

    async def _messages(self, gen: int) -> AsyncIterator[stage_pb2.InferBatch]:
        """What the stream sends: everything queued since the last message, as one message.
        Once its call has ended (`gen` is not the live one) it returns at its next wake-up, so
        gRPC's task that consumes it finishes rather than stay pending, and the outbox is left
        to the next call's generator."""
        if self.stream_id:
            yield stage_pb2.InferBatch(stream_id=self.stream_id)
        forwarded = self.forwarded.calls if self.forwarded is not None else {}
        while True:
            await self._wake.wait()
            if gen != self._gen:
                return
            self._wake.clear()
            now = asyncio.get_running_loop().time()
            requests = []
            for call_id, deadline, request in self._outbox:
                if call_id not in self._pending and call_id not in forwarded:
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
            forwarded = self.forwarded.calls if self.forwarded is not None else {}
            async for answers in call:
                if self._acked is not None and not self._acked.done() and answers.stream_id:
                    self._acked.set_result(None)
                for result in answers.results:
                    future = self._pending.get(result.call_id)
                    if future is None:
                        routed = forwarded.get(result.call_id)
                        if routed is not None and not routed.done():
                            routed.set_result(ForwardAnswer(result))
                        continue
                    if future.done():
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
                self._gen += 1
                self._wake.set()  # this call's request generator returns
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
        if self._acked is not None and not self._acked.done():
            self._acked.set_exception(type(error)(error.message))
            self._acked.exception()  # retrieved: nobody may be waiting for it
        if self.forwarded is not None and self._routed:
            broken = stage_pb2.InferResult(code=error.code.value[0], message=error.message)
            for call_id in self._routed:
                routed = self.forwarded.calls.get(call_id)
                if routed is not None and not routed.done():
                    routed.set_result(ForwardAnswer(broken, broken=self.address))
            self._routed.clear()

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
