"""Pushes a node's assignment to its agent (Agent.Apply over gRPC), one channel per agent."""

from __future__ import annotations

import grpc

from common.errors import from_rpc_error
from common.lifecycle import TlsFiles, channel
from protos import agent_pb2, agent_pb2_grpc


class AgentClients:
    """Callable as `push(address, assignment, timeout_s) -> ApplyResponse`; errors are Camelot's."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __call__(
        self, address: str, assignment: agent_pb2.Assignment, timeout_s: float
    ) -> agent_pb2.ApplyResponse:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address, self.tls)
        try:
            resp: agent_pb2.ApplyResponse = await agent_pb2_grpc.AgentStub(ch).Apply(
                assignment, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e
        return resp

    async def aclose(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
