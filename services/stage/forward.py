"""Forward mode, the replica's side: the next step's request goes from this replica to the next.

Under the gateway's `--stage-calls forward` a query's request carries the rest of its route
(`Forward`: per later step, the replica the gateway chose and that step's request with its refs
already allocated). Once a step's outputs are in their buffers, its replica sends the next
step's request itself, on one long-lived `InferStream` per next replica (`Forwarder`), and only
the last step (or a step that fails) answers the gateway, on the gateway's own stream to that
replica. These streams carry requests only: a forwarded call is answered on the gateway's
stream it names, never on the stream it came by.

A send that fails (the next replica cannot be reached, or its stream broke while the message
was written) is reported through the request's `on_error`, which answers the gateway
UNAVAILABLE with the steps finished so far; the gateway retries from the first unfinished one.
A next replica that dies after taking a call is the gateway's to notice: its own stream to that
replica breaks, and it fails and retries every query routed through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from common import lifecycle
from common.errors import CamelotError, Unavailable
from protos import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

OnError = Callable[[CamelotError], None]


class Forwarder:
    """One sender per next replica's address, opened on the first request to it and dropped
    when its stream breaks (the next request opens a new one on a new channel)."""

    def __init__(self, tls: lifecycle.TlsFiles | None = None) -> None:
        self.tls = tls
        self._senders: dict[str, _Sender] = {}
        self._closed = False

    def send(self, address: str, request: stage_pb2.InferRequest, on_error: OnError) -> None:
        """Queues `request` for `address`; requests queued in one turn of the loop share a
        message. `on_error` runs (once) if the request could not be written."""
        try:
            queued = self.request(address, on_error)
        except CamelotError as e:
            on_error(e)
            return
        call_id = queued.call_id
        queued.MergeFrom(request)
        queued.call_id = call_id

    def request(self, address: str, on_error: OnError) -> stage_pb2.InferRequest:
        """A new request for `address` (only its call id set), to be filled by the caller before
        it yields to the loop: it already lies in the message the sender writes next (a request
        built apart would be copied once more into it). `on_error` runs (once) if the request
        could not be written. Raises UNAVAILABLE when this replica forwards nothing more."""
        if self._closed:
            raise Unavailable("this replica is shutting down; it forwards nothing more")
        sender = self._senders.get(address)
        if sender is None:
            sender = self._senders[address] = _Sender(address, self.tls, self._gone)
        return sender.add(on_error)

    @property
    def addresses(self) -> list[str]:
        """The next replicas this one holds a stream to."""
        return list(self._senders)

    def _gone(self, sender: _Sender) -> None:
        if self._senders.get(sender.address) is sender:
            del self._senders[sender.address]

    async def close(self) -> None:
        self._closed = True
        senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            await sender.close()


class _Sender:
    """The stream to one next replica: a writer task sends everything queued as one message.

    Requests are built in the batch that carries them (`add`); the writer task is woken once
    per batch, by the first request queued while it waits, not once per request."""

    def __init__(self, address: str, tls: lifecycle.TlsFiles | None, gone: Callable[..., None]):
        self.address = address
        self._channel = lifecycle.channel(address, tls)
        self._gone = gone
        self._outbox = stage_pb2.InferBatch()
        self._errors: list[OnError] = []
        self._wake = asyncio.Event()
        self._next_id = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    def add(self, on_error: OnError) -> stage_pb2.InferRequest:
        self._next_id += 1
        request = self._outbox.requests.add()
        request.call_id = self._next_id
        if not self._errors:
            self._wake.set()
        self._errors.append(on_error)
        return request

    async def _run(self) -> None:
        error: CamelotError = Unavailable(f"forward stream to {self.address} closed")
        call = stage_pb2_grpc.StageStub(self._channel).InferStream()
        sending: list[OnError] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._errors:
                    continue
                batch, self._outbox = self._outbox, stage_pb2.InferBatch()
                sending, self._errors = self._errors, []
                await call.write(batch)
                sending = []
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # gRPC raises AioRpcError, or InvalidStateError once the call has ended
            detail = f"{e.code().name} {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else e
            error = Unavailable(f"cannot forward to {self.address}: {detail}")
            log.warning("%s", error.message)
        finally:
            self._gone(self)
            for on_error in (*sending, *self._errors):
                on_error(error)
            self._errors = []
            self._outbox = stage_pb2.InferBatch()
            call.cancel()
            await self._channel.close()

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass
