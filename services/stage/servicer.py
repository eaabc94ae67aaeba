"""gRPC adapter of a stage replica: protos in, `Replica` calls, protos out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from common.clock import mono_us
from common.dtypes import from_numpy
from common.errors import InvalidArgument, grpc_errors
from protos import stage_pb2, stage_pb2_grpc, tensor_pb2
from services.stage.calls import StreamCalls, response_of
from services.stage.forward import Forwarder
from services.stage.intake import Intake
from services.stage.replica import Replica

log = logging.getLogger(__name__)


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(
        self,
        replica: Replica,
        model_path: str,
        multiprocessors: int,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.replica = replica
        # forward mode: the gateways' streams by announced id, and the streams to next replicas
        self.peers: dict[str, StreamCalls] = {}
        self.forwarder = forwarder
        # every InferStream open on this replica (the gateways' and, in forward mode, the
        # previous replicas'), so that a stop can end them once the replica is drained
        self.streams: set[StreamCalls] = set()
        self._ending = False
        self.intake = Intake(replica)
        self.model_path = model_path
        self.multiprocessors = multiprocessors
        self.resizer: Any = None  # set in green mode: async (groups) -> (apply_us, multiprocessors)

    @grpc_errors
    async def Infer(
        self, request: stage_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.InferResponse:
        remaining = context.time_remaining()
        deadline_us = None if remaining is None else mono_us() + int(remaining * 1e6)
        result = await self.replica.infer(await self.intake.request_async(request, deadline_us))
        return response_of(result, self.replica.identity.replica_id)

    async def InferStream(
        self,
        request_iterator: AsyncIterator[stage_pb2.InferBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[stage_pb2.InferResultBatch]:
        """Reads batches of calls in a task of its own; yields answers as calls finish."""
        calls = StreamCalls(
            self.intake, self.replica.identity.replica_id, self.peers, self.forwarder
        )
        self.streams.add(calls)
        if self._ending:
            # a stream opened while the replica stops: it ends at once, its caller retries
            # elsewhere (a draining replica takes no calls anyway)
            calls.close()

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    try:
                        await calls.take(batch)
                    except Exception:
                        log.exception("a batch of stream calls failed to start")
            finally:
                calls.close()

        reader = asyncio.create_task(read())
        try:
            while (answers := await calls.next_batch()) is not None:
                yield answers
        finally:
            self.streams.discard(calls)
            reader.cancel()
            calls.cancel_all()
            if calls.stream_id and self.peers.get(calls.stream_id) is calls:
                del self.peers[calls.stream_id]

    def end_streams(self) -> int:
        """Ends every open InferStream once its calls are answered (on stop, after the drain):
        a caller that keeps its stream open, as a previous replica's forwarder does, would
        otherwise hold the server's stop for its whole grace. Returns how many were open."""
        self._ending = True
        open_ = list(self.streams)
        for calls in open_:
            calls.close()
        return len(open_)

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
