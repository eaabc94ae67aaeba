"""Queries on one long-lived SubmitStream instead of a unary Submit each.

A local client's cheaper path to the gateway: many queries share one stream per connection,
each answer matched to its query by query id. A query's deadline goes to the gateway in the
request and is kept here too, so a query the gateway never answers fails on time; a query the
gateway fails, or one left waiting when the stream ends, raises `StreamStatus` with the gRPC
code's name, as a unary call's `AioRpcError` would carry it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from protos import gateway_pb2, gateway_pb2_grpc


class StreamStatus(Exception):
    """A query's own failure on SubmitStream."""

    def __init__(self, code_name: str, message: str) -> None:
        super().__init__(f"{code_name}: {message}")
        self.code_name = code_name


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(StreamStatus("DEADLINE_EXCEEDED", "no answer in time"))


class SubmitStreamClient:
    """Queries on one long-lived SubmitStream, matched by query id; each with its deadline
    (sent to the gateway, and kept here too)."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub) -> None:
        self._outbox: asyncio.Queue[gateway_pb2.SubmitRequest | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[gateway_pb2.SubmitResult]] = {}
        self._call = stub.SubmitStream(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self) -> Any:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        error: BaseException = StreamStatus("UNAVAILABLE", "the stream ended")
        try:
            async for result in self._call:
                future = self._pending.pop(result.query_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except grpc.aio.AioRpcError as e:
            error = StreamStatus(e.code().name, str(e.details()))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    async def submit(
        self, request: gateway_pb2.SubmitRequest, timeout_s: float
    ) -> gateway_pb2.SubmitResponse:
        request.deadline_ms = max(1, int(timeout_s * 1e3))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[gateway_pb2.SubmitResult] = loop.create_future()
        self._pending[request.query_id] = future
        self._outbox.put_nowait(request)
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            result = await future
        finally:
            timer.cancel()
            self._pending.pop(request.query_id, None)
        if result.code != 0:
            raise StreamStatus(_CODE_NAMES.get(result.code, "UNKNOWN"), result.message)
        return result.response

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        try:
            await asyncio.wait_for(self._reader, 5.0)
        except (TimeoutError, asyncio.CancelledError):
            self._call.cancel()
