"""The agent's calls to one replica: health, Drain, Resize, Describe. Every call has a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import from_rpc_error
from common.lifecycle import channel
from protos import stage_pb2, stage_pb2_grpc

HEALTH_POLL_S = 0.05
HEALTH_CALL_TIMEOUT_S = 1.0


class StageClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = channel(address)
        self._stage = stage_pb2_grpc.StageStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def serving(self) -> bool:
        """One health check; False on any failure (not listening yet, NOT_SERVING)."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def wait_serving(self, timeout_s: float, alive: asyncio.Future[object] | None) -> bool:
        """Polls health until SERVING; False on timeout or when `alive` (the process) completes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if alive is not None and alive.done():
                return False
            if await self.serving():
                return True
            await asyncio.sleep(HEALTH_POLL_S)
        return False

    async def drain(self, timeout_s: float) -> int:
        try:
            reply = await self._stage.Drain(stage_pb2.DrainRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        return int(reply.completed)

    async def resize(self, groups: Sequence[int], timeout_s: float) -> stage_pb2.ResizeResponse:
        try:
            reply: stage_pb2.ResizeResponse = await self._stage.Resize(
                stage_pb2.ResizeRequest(sm_groups=list(groups)), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        return reply

    async def describe(self, timeout_s: float) -> stage_pb2.DescribeStageResponse:
        try:
            described: stage_pb2.DescribeStageResponse = await self._stage.Describe(
                stage_pb2.DescribeStageRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        return described
