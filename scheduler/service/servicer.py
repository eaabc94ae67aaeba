"""gRPC adapters: Admin and Control onto the SchedulerApp, and the Admin bearer-token check.

The token check is a server interceptor scoped to the Admin service: Control (agents, gateways)
and health stay open on the mesh. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from common.errors import grpc_errors
from protos import admin_pb2, admin_pb2_grpc, agent_pb2, plan_pb2
from scheduler.service.app import SchedulerApp

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/camelot.v1.Admin/"


class AdminAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admin calls need `authorization: Bearer <token>`; anything else is UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if not method.startswith(ADMIN_PREFIX):
            return await continuation(details)
        if self._allowed(details.invocation_metadata or ()):
            return await continuation(details)
        log.warning("admin call %s refused: missing or wrong bearer token", method)
        message = "admin token required" if self._token else "no admin token is configured"
        return _refuse(message)

    def _allowed(self, metadata: Any) -> bool:
        if not self._token:
            return False
        for key, value in metadata:
            if key != "authorization":
                continue
            raw = value.encode() if isinstance(value, str) else bytes(value)
            scheme, _, token = raw.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token):
                return True
        return False


def _refuse(message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, app: SchedulerApp) -> None:
        self.app = app

    @grpc_errors
    async def SetPolicy(  # noqa: N802 (gRPC method names)
        self, request: admin_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.Plan:
        return await self.app.set_policy(request.policy, dict(request.options))

    @grpc_errors
    async def SetQos(  # noqa: N802
        self, request: admin_pb2.SetQosRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.Plan:
        return await self.app.set_qos(request.pipeline, request.qos_p99_ms)

    @grpc_errors
    async def GetPlan(  # noqa: N802
        self, request: admin_pb2.GetPlanRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.Plan:
        return self.app.plan

    @grpc_errors
    async def Status(  # noqa: N802
        self, request: admin_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StatusResponse:
        return self.app.status(request.window_s)

    @grpc_errors
    async def Drain(  # noqa: N802
        self, request: admin_pb2.DrainTargetRequest, context: grpc.aio.ServicerContext
    ) -> plan_pb2.Plan:
        return await self.app.drain(request.node, request.replica_id)


class ControlServicer(admin_pb2_grpc.ControlServicer):
    def __init__(self, app: SchedulerApp) -> None:
        self.app = app

    @grpc_errors
    async def WatchRoutes(  # type: ignore[override]  # noqa: N802 (streams by context.write)
        self, request: admin_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async for routes in self.app.watch_routes(request.known_epoch):
            await context.write(routes)

    @grpc_errors
    async def Heartbeat(  # noqa: N802
        self, request: admin_pb2.NodeHeartbeat, context: grpc.aio.ServicerContext
    ) -> agent_pb2.Assignment:
        return await self.app.heartbeat(request)
