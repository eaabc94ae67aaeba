"""A stage's intake: an `InferRequest` proto becomes a checked `Request`, or a precise error.

Refs are verified and viewed through the broker client (its tag, generation, slab and size; no
broker call unless the slab table must be loaded), and every ref must belong to the query: to
its lease, or to the node-local client's lease the request names. A replica works only on its
own pipeline's memory (slabs are per pipeline). Caller-given output buffers must match the
model's outputs exactly. The broker leases the refs lie under are kept on the request: the
replica asks the broker once per batch whether they are still open (a view cannot tell). Nothing
here knows gRPC: the servicer adapts it to unary and stream calls alike.
"""

from __future__ import annotations

from typing import Any

from common.clock import mono_us
from common.dtypes import array_from_wire, from_numpy, to_numpy
from common.errors import InvalidArgument, PermissionDenied
from protos import stage_pb2, tensor_pb2
from services.stage.replica import Replica
from services.stage.requests import Request, check_inputs
from shmbroker.arena import is_local_lease
from shmbroker.client import NeedsRefresh


class Intake:
    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        # the model's outputs, as a caller-given buffer must match them: (name, dtype, shape)
        self._out_specs = [
            (s.name, from_numpy(s.dtype), tuple(s.shape)) for s in replica.model.outputs
        ]

    def request(self, proto: stage_pb2.InferRequest, deadline_us: int | None) -> Request:
        """The checked request, without I/O; NeedsRefresh when a slab table must be loaded
        first (then `request_async`)."""
        return self._build(proto, deadline_us)

    async def request_async(
        self, proto: stage_pb2.InferRequest, deadline_us: int | None
    ) -> Request:
        """`request`, loading the broker's slab table when a ref needs it."""
        try:
            return self._build(proto, deadline_us)
        except NeedsRefresh:
            buffers = self.replica.buffers
            assert buffers is not None
            for t in (*proto.inputs, *proto.outputs):
                if t.WhichOneof("body") == "ref":
                    await buffers.view(t.ref)  # loads the table (and checks the ref)
            return self._build(proto, deadline_us)

    @staticmethod
    def deadline(budget_us: int) -> int | None:
        """The local monotonic deadline of a budget sent with a stream call (0: none)."""
        return mono_us() + budget_us if budget_us > 0 else None

    def _build(self, proto: stage_pb2.InferRequest, deadline_us: int | None) -> Request:
        # Every stage call of every query comes through here: each field is read once (a
        # protobuf field read costs about as much as the check that uses it).
        wire_out = proto.transport == tensor_pb2.TRANSPORT_WIRE
        lease_id = proto.lease_id
        if not wire_out and not lease_id:
            raise InvalidArgument("transport ref needs a lease_id for the outputs")
        client_lease = proto.client_lease_id
        leases = (lease_id, client_lease) if client_lease else (lease_id,)
        inputs: dict[str, Any] = {}
        used: set[str] = set()  # the leases the refs lie under
        valued: list[str] = []  # the inputs sent by value
        for t in proto.inputs:
            name = t.name
            if name in inputs:
                raise InvalidArgument(f"duplicate input names in {[i.name for i in proto.inputs]}")
            inputs[name] = self._tensor(t, leases, used, valued)
        out_refs, out_views = self._outputs(proto, wire_out, leases, used)
        return Request(
            query_id=proto.query_id,
            pipeline=proto.pipeline,
            lease_id=lease_id,
            inputs=inputs,
            wire_out=wire_out,
            by_value=wire_out or bool(valued),
            deadline_us=deadline_us,
            out_refs=out_refs,
            out_views=out_views,
            ref_leases=(
                frozenset(lease for lease in used if not is_local_lease(lease))
                if used
                else _NO_LEASES
            ),
        )

    def _tensor(
        self,
        t: tensor_pb2.Tensor,
        leases: tuple[str, ...],
        used: set[str],
        valued: list[str] | None = None,
    ) -> Any:
        body = t.WhichOneof("body")
        if body == "ref":
            ref = t.ref
            lease = ref.lease_id
            if lease not in leases:
                raise PermissionDenied(
                    f"input {t.name!r} belongs to lease {lease!r}, not the query's lease"
                )
            buffers = self.replica.buffers
            if buffers is None:
                raise InvalidArgument("this replica has no broker; send inputs by value")
            view = buffers.view_cached(ref)
            # slabs are per pipeline: a replica works only on its own pipeline's memory, even
            # under a lease the caller holds
            pool = buffers.pool_of(ref.slab_id)
            pipeline = self.replica.identity.pipeline
            if pool != pipeline:
                raise PermissionDenied(f"input {t.name!r} lies in pool {pool!r}, not {pipeline!r}")
            used.add(lease)
            return view
        if body == "wire":
            # a host array: the replica's GPU thread copies it to the device on its stream
            if valued is not None:
                valued.append(t.name)
            return array_from_wire(t.wire)
        raise InvalidArgument(f"input {t.name!r} has neither a ref nor bytes")

    def _outputs(
        self,
        proto: stage_pb2.InferRequest,
        wire_out: bool,
        leases: tuple[str, ...],
        used: set[str],
    ) -> tuple[list[tensor_pb2.TensorRef] | None, list[Any] | None]:
        """Checks caller-allocated output buffers against the model's output specs."""
        given = proto.outputs
        if not given:
            return None, None
        if wire_out:
            raise InvalidArgument("output buffers were given but the transport is wire")
        # the usual case, cheaply: refs named and shaped as the outputs, in their order
        if len(given) == len(self._out_specs):
            for t, (name, dtype, shape) in zip(given, self._out_specs, strict=True):
                if t.name != name or t.WhichOneof("body") != "ref":
                    break
                ref = t.ref
                if ref.dtype != dtype or tuple(ref.shape) != shape:
                    break
            else:
                return [t.ref for t in given], [self._tensor(t, leases, used) for t in given]
        return self._outputs_checked(proto, leases, used)

    def _outputs_checked(
        self, proto: stage_pb2.InferRequest, leases: tuple[str, ...], used: set[str]
    ) -> tuple[list[tensor_pb2.TensorRef], list[Any]]:
        """`_outputs` in any order, naming what is wrong."""
        given = {t.name: t for t in proto.outputs}
        specs = self.replica.model.outputs
        if sorted(given) != sorted(s.name for s in specs) or len(given) != len(proto.outputs):
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
            views.append(self._tensor(t, leases, used))
        return refs, views


_NO_LEASES: frozenset[str] = frozenset()
