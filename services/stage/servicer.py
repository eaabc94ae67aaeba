"""gRPC adapter of a stage replica: protos in, `Replica` calls, protos out."""

from __future__ import annotations

from typing import Any

import grpc

from common.clock import mono_us
from common.dtypes import array_from_wire, from_numpy, to_numpy
from common.errors import InvalidArgument, PermissionDenied, grpc_errors
from protos import stage_pb2, stage_pb2_grpc, tensor_pb2
from services.stage.replica import Replica, Request, check_inputs


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, replica: Replica, model_path: str, multiprocessors: int) -> None:
        self.replica = replica
        self.model_path = model_path
        self.multiprocessors = multiprocessors
        self.resizer: Any = None  # set in green mode: async (groups) -> (apply_us, multiprocessors)

    async def _input(self, t: tensor_pb2.Tensor, lease_id: str) -> Any:
        body = t.WhichOneof("body")
        if body == "ref":
            if t.ref.lease_id != lease_id:
                raise PermissionDenied(
                    f"input {t.name!r} belongs to lease {t.ref.lease_id!r}, not the query's lease"
                )
            buffers = self.replica.buffers
            if buffers is None:
                raise InvalidArgument("this replica has no broker; send inputs by value")
            view = await buffers.view(t.ref)
            # slabs are per pipeline: a replica works only on its own pipeline's memory, even
            # under a lease the caller holds (pool_of is read after `view` loaded the table)
            pool_of = getattr(buffers, "pool_of", None)
            pipeline = self.replica.identity.pipeline
            if pool_of is not None and pool_of(t.ref.slab_id) != pipeline:
                raise PermissionDenied(
                    f"input {t.name!r} lies in pool {pool_of(t.ref.slab_id)!r}, not {pipeline!r}"
                )
            return view
        if body == "wire":
            # a host array: the replica's GPU thread copies it to the device on its stream
            return array_from_wire(t.wire)
        raise InvalidArgument(f"input {t.name!r} has neither a ref nor bytes")

    async def _outputs(
        self, request: stage_pb2.InferRequest, wire_out: bool
    ) -> tuple[list[tensor_pb2.TensorRef] | None, list[Any] | None]:
        """Checks caller-allocated output buffers against the model's output specs."""
        if not request.outputs:
            return None, None
        if wire_out:
            raise InvalidArgument("output buffers were given but the transport is wire")
        given = {t.name: t for t in request.outputs}
        specs = self.replica.model.outputs
        if sorted(given) != sorted(s.name for s in specs) or len(given) != len(request.outputs):
            raise InvalidArgument(
                f"output buffers {sorted(given)} do not match the outputs {[s.name for s in specs]}"
            )
        refs, views = [], []
        for spec in specs:
            t = given[spec.name]
            if t.WhichOneof("body") != "ref":
                raise InvalidArgument(f"output buffer {spec.name!r} is not a ref")
            check_inputs(
                [spec],
                {spec.name: (to_numpy(t.ref.dtype), tuple(t.ref.shape))},
                what="output buffer",
            )
            refs.append(t.ref)
            views.append(await self._input(t, request.lease_id))
        return refs, views

    @grpc_errors
    async def Infer(
        self, request: stage_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.InferResponse:
        wire_out = request.transport == tensor_pb2.TRANSPORT_WIRE
        if not wire_out and not request.lease_id:
            raise InvalidArgument("transport ref needs a lease_id for the outputs")
        names = [t.name for t in request.inputs]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"duplicate input names in {names}")
        inputs = {t.name: await self._input(t, request.lease_id) for t in request.inputs}
        out_refs, out_views = await self._outputs(request, wire_out)
        remaining = context.time_remaining()
        deadline_us = None if remaining is None else mono_us() + int(remaining * 1e6)
        result = await self.replica.infer(
            Request(
                query_id=request.query_id,
                pipeline=request.pipeline,
                lease_id=request.lease_id,
                inputs=inputs,
                wire_out=wire_out,
                deadline_us=deadline_us,
                out_refs=out_refs,
                out_views=out_views,
            )
        )
        return stage_pb2.InferResponse(
            outputs=result.outputs,
            timings=stage_pb2.StageTimings(
                queue_us=result.queue_us,
                batch_wait_us=result.batch_wait_us,
                compute_us=result.compute_us,
                batch_size=result.batch_size,
            ),
            replica_id=self.replica.identity.replica_id,
        )

    @grpc_errors
    async def Describe(
        self, request: stage_pb2.DescribeStageRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.DescribeStageResponse:
        r = self.replica
        return stage_pb2.DescribeStageResponse(
            stage=r.identity.stage,
            model=self.model_path,
            inputs=[_spec(s) for s in r.model.inputs],
            outputs=[_spec(s) for s in r.model.outputs],
            max_batch=r.batcher.max_batch,
            max_wait_us=r.batcher.max_wait_us,
            backend=r.backend.value,
            sm_percent=r.identity.sm_percent,
            sm_groups=r.identity.sm_groups,
            replica_id=r.identity.replica_id,
            multiprocessors=self.multiprocessors,
        )

    @grpc_errors
    async def Drain(
        self, request: stage_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.DrainResponse:
        return stage_pb2.DrainResponse(completed=await self.replica.drain())

    @grpc_errors
    async def Resize(
        self, request: stage_pb2.ResizeRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.ResizeResponse:
        if self.resizer is None:
            raise InvalidArgument("this replica is not in green-context mode; its share is fixed")
        apply_us, sms = await self.resizer(tuple(request.sm_groups))
        self.multiprocessors = sms
        return stage_pb2.ResizeResponse(apply_us=apply_us, multiprocessors=sms)


def _spec(s: Any) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=s.name, dtype=from_numpy(s.dtype), shape=s.shape)
