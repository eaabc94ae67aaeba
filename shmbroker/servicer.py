"""The Broker gRPC service: adapts each RPC to one plain call on the domain `Broker`.

Errors are Camelot errors raised by the domain; `grpc_errors` turns them into statuses.
"""

from __future__ import annotations

import grpc

from common.errors import grpc_errors
from protos import broker_pb2, broker_pb2_grpc
from shmbroker.broker import Broker
from shmbroker.leases import EndReason

_REASONS = {
    broker_pb2.RELEASE_REASON_DONE: EndReason.DONE,
    broker_pb2.RELEASE_REASON_ABORTED: EndReason.ABORTED,
}


class BrokerServicer(broker_pb2_grpc.BrokerServicer):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @grpc_errors
    async def Describe(  # noqa: N802 (gRPC method names)
        self, request: broker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.DescribeResponse:
        return self.broker.describe()

    @grpc_errors
    async def OpenLease(  # noqa: N802
        self, request: broker_pb2.OpenLeaseRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.Lease:
        return self.broker.open_lease(request.pool, request.owner_pid, request.ttl_s, request.label)

    @grpc_errors
    async def Allocate(  # noqa: N802
        self, request: broker_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.AllocateResponse:
        if not request.HasField("open"):
            return broker_pb2.AllocateResponse(refs=self.broker.allocate(request.items))
        lease, refs = self.broker.open_and_allocate(request.open, request.items)
        return broker_pb2.AllocateResponse(refs=refs, lease=lease)

    @grpc_errors
    async def LendArena(  # noqa: N802
        self, request: broker_pb2.LendArenaRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.Arena:
        return self.broker.lend_arena(request)

    @grpc_errors
    async def Release(  # noqa: N802
        self, request: broker_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.ReleaseResponse:
        # an unspecified reason is treated as ABORTED: quarantine is the safe side
        reason = _REASONS.get(request.reason, EndReason.ABORTED)
        released, freed = self.broker.release(list(request.lease_ids), reason)
        return broker_pb2.ReleaseResponse(released=released, freed_bytes=freed)

    @grpc_errors
    async def Renew(  # noqa: N802
        self, request: broker_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.Lease:
        return self.broker.renew(request.lease_id, request.ttl_s)

    @grpc_errors
    async def CheckLeases(  # noqa: N802
        self, request: broker_pb2.CheckLeasesRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.CheckLeasesResponse:
        return broker_pb2.CheckLeasesResponse(closed=self.broker.closed_leases(request.lease_ids))

    @grpc_errors
    async def Stats(  # noqa: N802
        self, request: broker_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> broker_pb2.StatsResponse:
        return self.broker.stats()
