"""The Agent gRPC service over the domain `Agent`, and building the whole agent process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import grpc

from common import lifecycle
from common.backend import Backend
from common.errors import grpc_errors
from protos import agent_pb2, agent_pb2_grpc, plan_pb2
from services.agent import inventory
from services.agent.apply import Agent, NodeInfo
from services.agent.heartbeat import Heartbeat
from services.agent.mps import MpsDaemon
from services.agent.settings import AgentSettings
from services.agent.xid import XidWatcher

log = logging.getLogger(__name__)

SERVICE_NAME = "camelot.v1.Agent"


class AgentServicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @grpc_errors
    async def Apply(
        self, request: agent_pb2.Assignment, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ApplyResponse:
        return await self.agent.apply(request)

    @grpc_errors
    async def Inventory(
        self, request: agent_pb2.InventoryRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.InventoryResponse:
        return await self.agent.inventory()

    @grpc_errors
    async def Status(
        self, request: agent_pb2.AgentStatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.AgentStatusResponse:
        return self.agent.status()

    async def WatchRoutes(
        self, request: agent_pb2.WatchAgentRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[plan_pb2.Routes]:
        board = self.agent.board
        routes = board.routes()
        yield routes
        while True:
            routes = await board.wait_after(routes.revision)
            yield routes


@dataclass
class AgentApp:
    settings: AgentSettings
    server: grpc.aio.Server
    port: int
    agent: Agent
    health: lifecycle.Health
    stack: contextlib.AsyncExitStack

    async def start_heartbeat(self) -> None:
        """Starts the heartbeat loop (when a scheduler is configured); it ends at `aclose`."""
        if not self.settings.scheduler_addr:
            return
        beat = Heartbeat(
            self.agent,
            self.settings.scheduler_addr,
            f"{self.settings.host}:{self.port}",
            self.settings.heartbeat_s,
            self.settings.heartbeat_timeout_s,
            tls=self.settings.tls,
        )
        task = asyncio.create_task(beat.run())
        self.stack.push_async_callback(_cancel, task)

    async def aclose(self) -> None:
        await self.stack.aclose()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def create_server(
    settings: AgentSettings, environ: Mapping[str, str] | None = None
) -> AgentApp:
    """Finds the GPUs, starts MPS if managed, binds (health NOT_SERVING until started).

    `environ` is what replicas inherit (default: this process's environment).
    """
    base_env = dict(os.environ if environ is None else environ)
    stack = contextlib.AsyncExitStack()
    try:
        backend = inventory.resolve_backend(settings.backend)
        mps_mode = settings.mps
        if backend is Backend.HOST or settings.share_mode == "none":
            mps_mode = "off"
        mps = MpsDaemon(mps_mode, settings.mps_pipe_dir, settings.mps_log_path)
        await mps.start()
        stack.push_async_callback(mps.stop)
        probe_env = inventory.probe_env({**base_env, **mps.env()})
        gpus = await inventory.discover(backend, settings.share_mode == "green", probe_env)
        agent = Agent(settings, NodeInfo(backend, tuple(gpus)), mps, base_env)
        stack.push_async_callback(agent.close)
        if backend is Backend.CUDA:
            # critical Xids begin a fault round on their GPU (services/agent/recovery.py)
            xids = XidWatcher(agent.faults.on_xid, asyncio.get_running_loop())
            if await asyncio.to_thread(xids.start):
                stack.push_async_callback(asyncio.to_thread, xids.stop)
        server = lifecycle.new_server()
        agent_pb2_grpc.add_AgentServicer_to_server(AgentServicer(agent), server)
        health = lifecycle.Health(server, [SERVICE_NAME])
        port = lifecycle.bind(server, settings.host, settings.port, tls=settings.tls)
        log.info("agent for node %s: backend %s, share mode %s, MPS %s, %d GPUs", settings.node,
                 backend.value, settings.share_mode, mps_mode, len(gpus))  # fmt: skip
        return AgentApp(settings, server, port, agent, health, stack)
    except BaseException:
        await stack.aclose()
        raise
