"""Building and running the scheduler: `create_server` (tests too) and `serve` (`__main__`)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

import grpc

from common import metrics
from common.lifecycle import Health, bind, new_server, run_until_signalled
from protos import admin_pb2_grpc
from scheduler.service.agents import AgentClients
from scheduler.service.app import SchedulerApp
from scheduler.service.loop import ControlLoop
from scheduler.service.pipelines import known_pipelines
from scheduler.service.servicer import AdminAuth, AdminServicer, ControlServicer
from scheduler.service.settings import SchedulerSettings

SERVICES = ("camelot.v1.Admin", "camelot.v1.Control")


@dataclass
class Scheduler:
    """What `create_server` started besides the gRPC server: close it after `server.stop`."""

    app: SchedulerApp
    loop: ControlLoop
    agents: AgentClients
    health: Health

    async def aclose(self) -> None:
        await self.app.stop_watchers()
        await self.loop.aclose()
        await self.app.aclose()
        await self.agents.aclose()


async def create_server(settings: SchedulerSettings) -> tuple[grpc.aio.Server, int, Scheduler]:
    """A bound, not yet started server, with the app restored and its reader and loop running.

    Tests: `server, port, sched = await create_server(s); await server.start()`, and at the end
    `await sched.app.stop_watchers(); await server.stop(0); await sched.aclose()`.
    """
    agents = AgentClients(settings.tls)
    app = SchedulerApp(settings, known_pipelines(settings), push=agents)
    server = new_server(interceptors=[AdminAuth(settings.admin_token)])
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(app), server)
    admin_pb2_grpc.add_ControlServicer_to_server(ControlServicer(app), server)
    health = Health(server, SERVICES)
    port = bind(server, settings.host, settings.port, tls=settings.tls)
    await app.start()
    loop = ControlLoop(app)
    await loop.start()
    return server, port, Scheduler(app, loop, agents, health)


async def serve(settings: SchedulerSettings) -> None:
    metrics.start(settings.metrics_port)
    async with AsyncExitStack() as stack:
        server, _port, sched = await create_server(settings)
        stack.push_async_callback(sched.aclose)
        await run_until_signalled(
            server, sched.health, settings.grace_s, on_stop=sched.app.stop_watchers
        )
