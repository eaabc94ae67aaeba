"""The calls of one InferStream: many in flight, each answered once, answers sent in batches.

The servicer hands every message it reads to `take` and sends whatever `next_batch` returns. A
call is checked and queued at once (no task per call: the batcher's future carries it); its
answer (outputs, or its own status) joins the outgoing batch when its future settles, so the
calls of one replica batch leave in one message. A cancelled call still queued is dropped and
answered CANCELLED. When the caller closes its side, the stream ends after the last answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from common.errors import CamelotError, Cancelled, InvalidArgument
from protos import stage_pb2
from services.stage.intake import Intake
from services.stage.requests import Result
from shmbroker.client import NeedsRefresh

log = logging.getLogger(__name__)


def error_result(call_id: int, error: BaseException) -> stage_pb2.InferResult:
    """A call's answer for an error: its Camelot status, or INTERNAL for anything else."""
    if isinstance(error, CamelotError):
        return stage_pb2.InferResult(
            call_id=call_id,
            code=error.code.value[0],
            message=error.message,
            retry_after_ms=error.retry_after_ms or 0,
        )
    if isinstance(error, asyncio.CancelledError):
        return error_result(call_id, Cancelled("the call was cancelled"))
    return error_result(call_id, CamelotError(f"internal error: {type(error).__name__}"))


def response_of(r: Result, replica_id: str) -> stage_pb2.InferResponse:
    """A finished request's answer: its outputs and where its time went."""
    response = stage_pb2.InferResponse()
    fill_response(response, r, replica_id)
    return response


def fill_response(response: stage_pb2.InferResponse, r: Result, replica_id: str) -> None:
    """`response_of` into a message that already lies where it is sent (a stream's answer
    batch): a message built apart and then placed is copied once more."""
    response.outputs.extend(r.outputs)
    timings = response.timings
    timings.queue_us = r.queue_us
    timings.batch_wait_us = r.batch_wait_us
    timings.compute_us = r.compute_us
    timings.batch_size = r.batch_size
    response.replica_id = replica_id


class StreamCalls:
    def __init__(self, intake: Intake, replica_id: str) -> None:
        self.intake = intake
        self.replica_id = replica_id
        self._calls: dict[int, asyncio.Future[Result]] = {}
        # the answers ready to send, built in the message that carries them
        self._answers = stage_pb2.InferResultBatch()
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def take(self, batch: stage_pb2.InferBatch) -> None:
        """Starts the batch's calls and applies its cancellations."""
        submit = self.intake.replica.submit
        for proto in batch.requests:
            call_id = proto.call_id
            if call_id in self._calls:
                self._answer(error_result(call_id, _duplicate(call_id)))
                continue
            deadline_us = self.intake.deadline(proto.budget_us)
            try:
                try:
                    request = self.intake.request(proto, deadline_us)
                except NeedsRefresh:
                    request = await self.intake.request_async(proto, deadline_us)
                future = submit(request, functools.partial(self._settled, call_id))
            except Exception as e:
                if not isinstance(e, CamelotError):
                    log.exception("call %d refused", call_id)
                self._answer(error_result(call_id, e))
                continue
            self._calls[call_id] = future
        for call_id in batch.cancel:
            queued = self._calls.get(call_id)
            if queued is not None:
                queued.cancel()

    def close(self) -> None:
        """The caller closed its side: end once every call is answered."""
        self._closed = True
        self._ready.set()

    def cancel_all(self) -> None:
        for future in list(self._calls.values()):
            future.cancel()

    async def next_batch(self) -> stage_pb2.InferResultBatch | None:
        """The answers ready now (waiting for one), or None when the stream is over."""
        while not self._answers.results:
            if self._closed and not self._calls:
                return None
            self._ready.clear()
            await self._ready.wait()
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
