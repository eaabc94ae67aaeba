"""gRPC adapter of the gateway: Submit and SubmitStream hand queries to the front door (the
domain: checks, admission, deadlines, running, reporting); Stats and ListPipelines describe it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import grpc

from common.dtypes import from_numpy
from common.errors import CamelotError, grpc_errors
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.gateway.frontdoor import FrontDoor, PipelineEntry

__all__ = ["GatewayServicer", "PipelineEntry"]

log = logging.getLogger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.pipelines = door.pipelines
        self.runner = door.runner

    @grpc_errors
    async def Submit(
        self, request: gateway_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SubmitResponse:
        return await self.door.submit(request, context.time_remaining())

    async def SubmitStream(
        self,
        request_iterator: AsyncIterator[gateway_pb2.SubmitRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.SubmitResult]:
        """Runs each query read as a task of its own; yields answers as queries finish."""
        answers: list[gateway_pb2.SubmitResult] = []
        ready = asyncio.Event()
        running: dict[str, asyncio.Task[None]] = {}
        reading = True

        async def one(request: gateway_pb2.SubmitRequest) -> None:
            budget_s = request.deadline_ms / 1e3 if request.deadline_ms > 0 else None
            try:
                response = await self.door.submit(request, budget_s)
                answer = gateway_pb2.SubmitResult(query_id=request.query_id, response=response)
            except CamelotError as e:
                answer = gateway_pb2.SubmitResult(
                    query_id=request.query_id,
                    code=e.code.value[0],
                    message=e.message,
                    retry_after_ms=e.retry_after_ms or 0,
                )
            except Exception:
                log.exception("query %s failed", request.query_id)
                answer = gateway_pb2.SubmitResult(
                    query_id=request.query_id,
                    code=grpc.StatusCode.INTERNAL.value[0],
                    message="internal error in SubmitStream",
                )
            answers.append(answer)
            ready.set()

        def start(request: gateway_pb2.SubmitRequest) -> None:
            query_id = request.query_id
            if not query_id or query_id in running:
                problem = "needs a query_id" if not query_id else "has a query_id in flight"
                answers.append(
                    gateway_pb2.SubmitResult(
                        query_id=query_id,
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        message=f"a query on SubmitStream {problem}",
                    )
                )
                ready.set()
                return
            task = asyncio.create_task(one(request))
            running[query_id] = task
            task.add_done_callback(lambda _: running.pop(query_id, None))

        async def read() -> None:
            nonlocal reading
            try:
                async for request in request_iterator:
                    start(request)
            finally:
                reading = False
                ready.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                while not answers:
                    if not reading and not running:
                        return
                    ready.clear()
                    await ready.wait()
                batch, answers = answers, []
                for answer in batch:
                    yield answer
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()

    @grpc_errors
    async def Stats(
        self, request: gateway_pb2.GatewayStatsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayStatsResponse:
        out = gateway_pb2.GatewayStatsResponse(pid=os.getpid(), inflight=self.door.inflight)
        arena_stats = getattr(self.runner.buffers, "stats", None)
        if arena_stats is not None:
            a = arena_stats()
            out.live_leases = a.live_leases
            out.quarantined_leases = a.quarantined
            out.arenas = a.arenas
            out.arena_bytes = a.arena_bytes
            out.broker_fallbacks = a.fallbacks
        return out

    @grpc_errors
    async def ListPipelines(
        self, request: gateway_pb2.ListPipelinesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListPipelinesResponse:
        return gateway_pb2.ListPipelinesResponse(
            pipelines=[
                gateway_pb2.PipelineInfo(
                    name=name,
                    input=tensor_pb2.TensorSpec(
                        name=e.input_name, dtype=from_numpy(e.input_dtype), shape=e.input_shape
                    ),
                    output=tensor_pb2.TensorSpec(
                        name=e.output_name, dtype=from_numpy(e.output_dtype), shape=e.output_shape
                    ),
                    stages=[s.name for s in e.route.steps],
                    qos_p99_ms=e.route.qos_p99_ms,
                )
                for name, e in sorted(self.pipelines.items())
            ]
        )
