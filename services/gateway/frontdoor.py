"""The gateway's front door: a query is checked against its pipeline, admitted (or refused
with RESOURCE_EXHAUSTED and a retry hint when too many are in flight), given its deadline, run,
and reported. The servicer's Submit and SubmitStream both come here; nothing here knows gRPC.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import metrics
from common.clock import mono_us, wall_us
from common.dtypes import array_from_bytes, to_numpy
from common.errors import (
    CamelotError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    status_value,
)
from common.reports import ReportSink
from protos import gateway_pb2, report_pb2, tensor_pb2
from services.gateway.pipelineroute import PipelineRoute
from services.gateway.query import QueryRunner

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


class FrontDoor:
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
        # per pipeline: the latency histogram, and a counter per code, labelled once
        self._latency = {
            p: metrics.LATENCY.labels("gateway", p, "") for p in [*self.pipelines, "unknown"]
        }
        self._requests: dict[tuple[str, str], Any] = {}

    def entry(self, request: gateway_pb2.SubmitRequest) -> PipelineEntry:
        entry = self.pipelines.get(request.pipeline)
        if entry is None:
            raise NotFound(
                f"unknown pipeline {request.pipeline!r}; serving {sorted(self.pipelines)}"
            )
        return entry

    async def client_refs(
        self, entry: PipelineEntry, request: gateway_pb2.SubmitRequest
    ) -> tuple[tensor_pb2.TensorRef, tensor_pb2.TensorRef | None]:
        """A node-local client's input (and answer) buffers, checked: signed by the broker for
        one lease of the client, in the pipeline's pool, of the pipeline's input spec."""
        buffers = self.runner.buffers
        if buffers is None:
            raise InvalidArgument("an input by reference needs a broker; this gateway has none")
        if request.HasField("input") and request.input.ByteSize():
            raise InvalidArgument("give the input by value or by reference, not both")
        refs = [request.input_ref]
        if request.HasField("output_ref"):
            refs.append(request.output_ref)
        for ref in refs:
            await buffers.view(ref)  # its tag, generation, slab and size
            pool = buffers.pool_of(ref.slab_id)
            if pool != entry.route.name:
                raise PermissionDenied(f"a ref in pool {pool!r} is not {entry.route.name!r}'s")
            if ref.lease_id != refs[0].lease_id or not ref.lease_id:
                raise PermissionDenied("input_ref and output_ref must be of one client lease")
        ref = request.input_ref
        dtype, shape = to_numpy(ref.dtype), tuple(ref.shape)
        if dtype != entry.input_dtype or shape != entry.input_shape:
            raise InvalidArgument(
                f"input_ref is {dtype} {list(shape)}; the pipeline takes {entry.input_dtype} "
                f"{list(entry.input_shape)}"
            )
        return ref, (request.output_ref if request.HasField("output_ref") else None)

    def check(self, request: gateway_pb2.SubmitRequest) -> tuple[PipelineEntry, np.ndarray]:
        """The pipeline and the input as an array (a view of the request's bytes, read once)."""
        entry = self.entry(request)
        wire = request.input
        data = wire.data  # protobuf makes a new bytes object on every access: read it once
        if len(data) > self.max_payload_bytes:
            raise ResourceExhausted(
                f"payload of {len(data)} bytes is over the limit of {self.max_payload_bytes}"
            )
        dtype = to_numpy(wire.dtype)
        if dtype != entry.input_dtype:
            raise InvalidArgument(
                f"input dtype {dtype} does not match the pipeline's {entry.input_dtype}"
            )
        shape = tuple(wire.shape)
        if shape != entry.input_shape:
            raise InvalidArgument(
                f"input shape {list(shape)} does not match the pipeline's {list(entry.input_shape)}"
            )
        return entry, array_from_bytes(data, wire.dtype, shape)

    async def submit(
        self, request: gateway_pb2.SubmitRequest, remaining_s: float | None
    ) -> gateway_pb2.SubmitResponse:
        """Runs one query; `remaining_s` is the caller's deadline (None: the QoS multiple).
        Raises the query's Camelot error."""
        start = mono_us()
        query_id = request.query_id or uuid.uuid4().hex
        code = "OK"
        pipeline = request.pipeline if request.pipeline in self.pipelines else "unknown"
        try:
            item: np.ndarray | tensor_pb2.TensorRef
            output_ref = None
            if request.HasField("input_ref"):
                entry = self.entry(request)
                item, output_ref = await self.client_refs(entry, request)
            else:
                if request.HasField("output_ref"):
                    raise InvalidArgument("output_ref needs the input by reference too")
                entry, item = self.check(request)
            budget_s = (
                remaining_s
                if remaining_s is not None
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
                    entry.route, item, transport, query_id, start + int(budget_s * 1e6),
                    output_ref,
                )  # fmt: skip
            finally:
                self.inflight -= 1
            response = gateway_pb2.SubmitResponse(
                output=result.output,
                query_id=query_id,
                e2e_us=mono_us() - start,
                stages=result.stages,
                plan_epoch=self.runner.routes.epoch,
            )
            if result.output_ref is not None:
                response.output_ref.CopyFrom(result.output_ref)
            return response
        except CamelotError as e:
            code = e.code.name
            raise
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            self._record(pipeline, query_id, mono_us() - start, code)

    def _record(self, pipeline: str, query_id: str, e2e_us: int, code: str) -> None:
        counter = self._requests.get((pipeline, code))
        if counter is None:
            counter = self._requests[(pipeline, code)] = metrics.REQUESTS.labels(
                "gateway", pipeline, "", code
            )
        counter.inc()
        self._latency[pipeline].observe(e2e_us / 1e6)
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
                status_code=status_value(code),
                plan_epoch=self.runner.routes.epoch,
            )
        )
