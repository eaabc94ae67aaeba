"""gRPC adapter of the gateway: checks a query against its pipeline, runs it, reports it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from common import metrics
from common.clock import mono_us, wall_us
from common.dtypes import array_from_wire, from_numpy, to_numpy
from common.errors import (
    CamelotError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    grpc_errors,
)
from common.reports import ReportSink
from protos import gateway_pb2, gateway_pb2_grpc, report_pb2, tensor_pb2
from services.gateway.query import PipelineRoute, QueryRunner

RETRY_AFTER_MS = 50


@dataclass(frozen=True)
class PipelineEntry:
    route: PipelineRoute
    input_name: str
    input_dtype: np.dtype[np.generic]
    input_shape: tuple[int, ...]
    output_name: str
    output_dtype: np.dtype[np.generic]
    output_shape: tuple[int, ...]


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        pipelines: Mapping[str, PipelineEntry],
        runner: QueryRunner,
        reports: ReportSink | None,
        node: str,
        default_transport: tensor_pb2.Transport.ValueType,
        deadline_qos_multiple: float,
        max_payload_bytes: int,
        max_inflight: int,
    ) -> None:
        self.pipelines = dict(pipelines)
        self.runner = runner
        self.reports = reports
        self.node = node
        self.default_transport = default_transport
        self.deadline_qos_multiple = deadline_qos_multiple
        self.max_payload_bytes = max_payload_bytes
        self.max_inflight = max_inflight
        self.inflight = 0

    def _check(self, request: gateway_pb2.SubmitRequest) -> tuple[PipelineEntry, np.ndarray]:
        entry = self.pipelines.get(request.pipeline)
        if entry is None:
            raise NotFound(
                f"unknown pipeline {request.pipeline!r}; serving {sorted(self.pipelines)}"
            )
        if len(request.input.data) > self.max_payload_bytes:
            raise ResourceExhausted(
                f"payload of {len(request.input.data)} bytes is over the limit of "
                f"{self.max_payload_bytes}"
            )
        dtype = to_numpy(request.input.dtype)
        if dtype != entry.input_dtype:
            raise InvalidArgument(
                f"input dtype {dtype} does not match the pipeline's {entry.input_dtype}"
            )
        if tuple(request.input.shape) != entry.input_shape:
            raise InvalidArgument(
                f"input shape {list(request.input.shape)} does not match the pipeline's "
                f"{list(entry.input_shape)}"
            )
        return entry, array_from_wire(request.input)

    @grpc_errors
    async def Submit(
        self, request: gateway_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SubmitResponse:
        start = mono_us()
        query_id = request.query_id or uuid.uuid4().hex
        code = "OK"
        pipeline = request.pipeline if request.pipeline in self.pipelines else "unknown"
        try:
            entry, item = self._check(request)
            remaining = context.time_remaining()
            budget_s = (
                remaining
                if remaining is not None
                else entry.route.qos_p99_ms * self.deadline_qos_multiple / 1e3
            )
            if budget_s <= 0:
                raise DeadlineExceeded("the deadline has already passed")
            if self.inflight >= self.max_inflight:
                raise ResourceExhausted(
                    f"{self.inflight} queries in flight, the limit is {self.max_inflight}",
                    retry_after_ms=RETRY_AFTER_MS,
                )
            transport = request.transport or self.default_transport
            self.inflight += 1
            try:
                result = await self.runner.run(
                    entry.route, item, transport, query_id, start + int(budget_s * 1e6)
                )
            finally:
                self.inflight -= 1
            e2e = mono_us() - start
            return gateway_pb2.SubmitResponse(
                output=result.output,
                query_id=query_id,
                e2e_us=e2e,
                stages=result.stages,
                plan_epoch=self.runner.routes.epoch,
            )
        except CamelotError as e:
            code = e.code.name
            raise
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            self._record(pipeline, query_id, mono_us() - start, code)

    def _record(self, pipeline: str, query_id: str, e2e_us: int, code: str) -> None:
        metrics.REQUESTS.labels("gateway", pipeline, "", code).inc()
        metrics.LATENCY.labels("gateway", pipeline, "").observe(e2e_us / 1e6)
        if self.reports is None or pipeline == "unknown":
            return
        self.reports.add(
            report_pb2.LatencyReport(
                kind=report_pb2.REPORT_KIND_QUERY,
                pipeline=pipeline,
                node=self.node,
                query_id=query_id,
                end_unix_us=wall_us(),
                total_us=e2e_us,
                status_code=grpc.StatusCode[code].value[0]
                if code in grpc.StatusCode.__members__
                else 2,
                plan_epoch=self.runner.routes.epoch,
            )
        )

    @grpc_errors
    async def Stats(
        self, request: gateway_pb2.GatewayStatsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayStatsResponse:
        out = gateway_pb2.GatewayStatsResponse(pid=os.getpid(), inflight=self.inflight)
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
