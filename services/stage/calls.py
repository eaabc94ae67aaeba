"""The calls of one InferStream: many in flight, each answered once, answers sent in batches.

The servicer hands every message it reads to `take` and sends whatever `next_batch` returns. A
call is checked and queued at once (no task per call: the batcher's future carries it); its
answer (outputs, or its own status) joins the outgoing batch when its future settles, so the
calls of one replica batch leave in one message. A cancelled call still queued is dropped and
answered CANCELLED. When the caller closes its side, the stream ends after the last answer.

Forward mode (`forward.py`): a gateway's stream names itself in its first message (`stream_id`,
acknowledged at once) and is registered in `peers`. A request with `forward` set, whichever
stream it came by, is adopted by the stream it names as `reply_stream`: it is queued there under
the gateway's `reply_call_id`, so the gateway's cancel on that stream reaches it, and its error,
or the last step's answer, goes out there. A step that is not the last sends the next step's
request through the `Forwarder` instead of answering. A forwarded request naming a stream this
replica does not hold is dropped: that stream's end has already told the gateway to retry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable, Iterable

from common.clock import mono_us
from common.errors import CamelotError, Cancelled, DeadlineExceeded, InvalidArgument, Unavailable
from protos import stage_pb2
from services.stage.forward import Forwarder
from services.stage.intake import Intake
from services.stage.requests import Result
from shmbroker.client import NeedsRefresh

log = logging.getLogger(__name__)

# Cancels of forwarded calls not (yet) here that a gateway stream remembers, so a call that
# arrives after its cancel is not run: the last ones only.
REMEMBERED_CANCELS = 1024


def error_result(
    call_id: int, error: BaseException, done: Iterable[stage_pb2.InferResponse] = ()
) -> stage_pb2.InferResult:
    """A call's answer for an error: its Camelot status, or INTERNAL for anything else; `done`,
    a forwarded query's finished steps."""
    if isinstance(error, asyncio.CancelledError):
        error = Cancelled("the call was cancelled")
    elif not isinstance(error, CamelotError):
        error = CamelotError(f"internal error: {type(error).__name__}")
    assert isinstance(error, CamelotError)
    return stage_pb2.InferResult(
        call_id=call_id,
        code=error.code.value[0],
        message=error.message,
        retry_after_ms=error.retry_after_ms or 0,
        done=done,
    )


def response_of(r: Result, replica_id: str) -> stage_pb2.InferResponse:
    """A finished request's answer: its outputs and where its time went."""
    response = stage_pb2.InferResponse()
    fill_response(response, r, replica_id)
    return response


def fill_response(response: stage_pb2.InferResponse, r: Result, replica_id: str) -> None:
    """`response_of` into a message that already lies where it is sent (a stream's answer
    batch): a message built apart and then placed is copied once more."""
    response.outputs.extend(r.outputs)
    fill_timings(response, r, replica_id)


def fill_timings(response: stage_pb2.InferResponse, r: Result, replica_id: str) -> None:
    """A forwarded step's entry in `Forward.done`: where its time went and its replica, not its
    outputs (the gateway allocated their buffers and knows their refs)."""
    timings = response.timings
    timings.queue_us = r.queue_us
    timings.batch_wait_us = r.batch_wait_us
    timings.compute_us = r.compute_us
    timings.batch_size = r.batch_size
    timings.gpu_us = r.gpu_us
    response.replica_id = replica_id


def _finished(
    done: Iterable[stage_pb2.InferResponse], r: Result, replica_id: str
) -> list[stage_pb2.InferResponse]:
    """The steps done, this one's included, for an error that stops a forwarded query here."""
    entry = stage_pb2.InferResponse()
    fill_timings(entry, r, replica_id)
    return [*done, entry]


class StreamCalls:
    def __init__(
        self,
        intake: Intake,
        replica_id: str,
        peers: dict[str, StreamCalls] | None = None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.intake = intake
        self.replica_id = replica_id
        # the gateways' streams on this replica by the ids they announced (forward mode)
        self.peers: dict[str, StreamCalls] = {} if peers is None else peers
        self.forwarder = forwarder
        self.stream_id = ""
        self._calls: dict[int, asyncio.Future[Result]] = {}
        # the answers ready to send, built in the message that carries them
        self._answers = stage_pb2.InferResultBatch()
        self._ready = asyncio.Event()
        self._closed = False
        self._ack = False
        self._cancelled: set[int] = set()
        self._cancelled_order: deque[int] = deque()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    @property
    def unsent(self) -> int:
        """Answers settled but not yet taken by the stream's writer."""
        return len(self._answers.results)

    async def take(self, batch: stage_pb2.InferBatch) -> None:
        """Starts the batch's calls and applies its cancellations."""
        if batch.stream_id:
            self._announce(batch.stream_id)
        for proto in batch.requests:
            if proto.HasField("forward"):
                await self._take_forwarded(proto)
                continue
            call_id = proto.call_id
            if call_id in self._calls:
                self._answer(error_result(call_id, _duplicate(call_id)))
                continue
            deadline_us = self.intake.deadline(proto.budget_us)
            await self._start(
                proto, call_id, deadline_us, functools.partial(self._settled, call_id)
            )
        for call_id in batch.cancel:
            queued = self._calls.get(call_id)
            if queued is not None:
                queued.cancel()
            elif self.stream_id:
                self._remember_cancel(call_id)

    def _announce(self, stream_id: str) -> None:
        """A gateway named this stream: forwarded calls may now name it to answer on."""
        if self.stream_id:
            self.peers.pop(self.stream_id, None)
        self.stream_id = stream_id
        self.peers[stream_id] = self
        self._answers.stream_id = stream_id
        self._ack = True
        self._ready.set()

    def _remember_cancel(self, call_id: int) -> None:
        self._cancelled.add(call_id)
        self._cancelled_order.append(call_id)
        if len(self._cancelled_order) > REMEMBERED_CANCELS:
            self._cancelled.discard(self._cancelled_order.popleft())

    async def _take_forwarded(self, proto: stage_pb2.InferRequest) -> None:
        """A step of a forwarded query, queued on the gateway's stream it names."""
        reply = self.peers.get(proto.forward.reply_stream)
        if reply is None or reply._closed:
            log.warning(
                "forwarded call of %s names stream %r, which is not open here; dropped",
                proto.query_id,
                proto.forward.reply_stream,
            )
            return
        await reply.adopt(proto)

    async def adopt(self, proto: stage_pb2.InferRequest) -> None:
        """Queues a forwarded step on this (the gateway's) stream under the gateway's call id."""
        forward = proto.forward
        call_id = forward.reply_call_id
        if call_id in self._cancelled:
            self._answer(error_result(call_id, Cancelled("cancelled by the caller")))
            return
        if call_id in self._calls:
            self._answer(error_result(call_id, _duplicate(call_id), forward.done))
            return
        deadline_us = self.intake.deadline(proto.budget_us)
        on_done = functools.partial(self._forward_settled, call_id, proto, deadline_us)
        await self._start(proto, call_id, deadline_us, on_done, forward.done)

    async def _start(
        self,
        proto: stage_pb2.InferRequest,
        call_id: int,
        deadline_us: int | None,
        on_done: Callable[[asyncio.Future[Result]], None],
        done: Iterable[stage_pb2.InferResponse] = (),
    ) -> None:
        """Checks a call's request and queues it on the replica under `call_id`, or answers
        with the error (`done`: a forwarded query's finished steps)."""
        try:
            try:
                request = self.intake.request(proto, deadline_us)
            except NeedsRefresh:
                request = await self.intake.request_async(proto, deadline_us)
            future = self.intake.replica.submit(request, on_done)
        except Exception as e:
            if not isinstance(e, CamelotError):
                log.exception("call %d refused", call_id)
            self._answer(error_result(call_id, e, done))
            return
        self._calls[call_id] = future

    def _forward_settled(
        self,
        call_id: int,
        proto: stage_pb2.InferRequest,
        deadline_us: int | None,
        future: asyncio.Future[Result],
    ) -> None:
        """A forwarded step finished: answer the gateway (last step, or an error), or send the
        next step's request with the steps done so far and the query's remaining budget."""
        self._calls.pop(call_id, None)
        forward = proto.forward
        if future.cancelled():
            self._answer(error_result(call_id, Cancelled("cancelled by the caller"), forward.done))
            return
        error = future.exception()
        if error is not None:
            self._answer(error_result(call_id, error, forward.done))
            return
        hops = forward.hops
        if not hops:
            answer = self._answers.results.add()
            answer.call_id = call_id
            answer.done.extend(forward.done)
            fill_response(answer.response, future.result(), self.replica_id)
            self._ready.set()
            return
        result = future.result()
        budget_us = 0
        if deadline_us is not None:
            budget_us = deadline_us - mono_us()
            if budget_us <= 0:
                late = DeadlineExceeded("deadline passed")
                done = _finished(forward.done, result, self.replica_id)
                self._answer(error_result(call_id, late, done))
                return
        hop = hops[0]
        # the next request is built where it is sent (in the sender's next message) from the
        # hop's request, the hops after it and the steps done; this step's entry there has no
        # outputs: the gateway allocated their buffers, and reads only timings and replica
        try:
            if self.forwarder is None:
                raise Unavailable("this replica does not forward")
            request = self.forwarder.request(
                hop.address,
                lambda e: self._answer(error_result(call_id, e, request.forward.done)),
            )
        except CamelotError as e:
            self._answer(error_result(call_id, e, _finished(forward.done, result, self.replica_id)))
            return
        call = request.call_id
        request.CopyFrom(hop.request)  # faster than MergeFrom (upb merges through the wire)
        request.call_id = call
        if deadline_us is not None:
            request.budget_us = budget_us
        onward = request.forward
        if len(hops) > 1:
            onward.hops.extend(hops[1:])
        onward.done.extend(forward.done)
        fill_timings(onward.done.add(), result, self.replica_id)

    def close(self) -> None:
        """The caller closed its side: end once every call is answered."""
        self._closed = True
        self._ready.set()

    def cancel_all(self) -> None:
        for future in list(self._calls.values()):
            future.cancel()

    async def next_batch(self) -> stage_pb2.InferResultBatch | None:
        """The answers ready now (waiting for one), or None when the stream is over."""
        while not self._answers.results and not self._ack:
            if self._closed and not self._calls:
                return None
            self._ready.clear()
            await self._ready.wait()
        self._ack = False
        answers, self._answers = self._answers, stage_pb2.InferResultBatch()
        return answers

    def _answer(self, result: stage_pb2.InferResult) -> None:
        self._answers.results.append(result)
        self._ready.set()

    def _settled(self, call_id: int, future: asyncio.Future[Result]) -> None:
        self._calls.pop(call_id, None)
        if future.cancelled():
            self._answer(error_result(call_id, Cancelled("cancelled by the caller")))
            return
        error = future.exception()
        if error is not None:
            self._answer(error_result(call_id, error))
            return
        answer = self._answers.results.add()
        answer.call_id = call_id  # code OK is the default
        fill_response(answer.response, future.result(), self.replica_id)
        self._ready.set()


def _duplicate(call_id: int) -> CamelotError:
    return InvalidArgument(f"call id {call_id} is already in flight on this stream")
