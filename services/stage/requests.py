"""What a stage replica is asked and what it answers: checked requests, results, and the check of
tensors against a model's specs; and what the replica needs from the broker client.

Plain data, shared by the intake (which builds requests from protos), the replica (which
batches them) and its GPU thread (which computes them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.errors import CamelotError, InvalidArgument
from protos import tensor_pb2
from services.stage.plugin import TensorSpec


class BufferSource(Protocol):
    """What the replica needs from the broker client."""

    async def allocate(
        self, items: Sequence[tuple[str, Any, tuple[int, ...]]], device: int = 0
    ) -> list[tensor_pb2.TensorRef]: ...

    async def view(self, ref: tensor_pb2.TensorRef) -> Any: ...

    def view_cached(self, ref: tensor_pb2.TensorRef) -> Any: ...

    def pool_of(self, slab_id: str) -> str: ...

    async def warm_pool(self, pool: str, device: int = 0) -> bool: ...

    async def closed_leases(self, lease_ids: Sequence[str]) -> dict[str, CamelotError]: ...


@dataclass
class Request:
    """One validated request: inputs are per-item arrays on the replica's backend."""

    query_id: str
    pipeline: str
    lease_id: str
    inputs: dict[str, Any]
    wire_out: bool
    # a tensor went by value (an input's bytes, or the outputs as bytes): the batch's copies
    # through the host are the wire transport's, which the predictor prices per hop, not the
    # stage's host part (LatencyReport.gpu_us is 0 for it)
    by_value: bool = False
    deadline_us: int | None = None
    # output buffers the caller allocated (refs and their views), in model output order
    out_refs: list[tensor_pb2.TensorRef] | None = None
    out_views: list[Any] | None = None
    # broker leases its refs (inputs, given outputs) lie under, checked open before the batch
    ref_leases: frozenset[str] = frozenset()

    @property
    def allocates(self) -> bool:
        """The replica allocates this request's outputs (ref transport, none given)."""
        return not self.wire_out and self.out_refs is None


@dataclass
class Result:
    outputs: list[tensor_pb2.Tensor]
    queue_us: int
    batch_wait_us: int
    compute_us: int
    batch_size: int
    # the GPU's part of compute_us (StageTimings.gpu_us; 0: not measured)
    gpu_us: int = 0


def check_inputs(
    specs: Sequence[TensorSpec],
    given: Mapping[str, tuple[np.dtype[Any], tuple[int, ...]]],
    what: str = "input",
) -> None:
    """INVALID_ARGUMENT unless the tensors are exactly the declared ones, in dtype and shape;
    `what` names them in the message ("input", or "output buffer" for caller-given outputs)."""
    want = {s.name: s for s in specs}
    extra = sorted(set(given) - set(want))
    if extra:
        raise InvalidArgument(f"unexpected {what}s {extra}; the model takes {sorted(want)}")
    for name, spec in want.items():
        if name not in given:
            raise InvalidArgument(f"missing {what} {name!r}")
        dtype, shape = given[name]
        if np.dtype(dtype) != spec.dtype:
            raise InvalidArgument(
                f"{what} {name!r} has dtype {np.dtype(dtype)}, expected {spec.dtype}"
            )
        if tuple(shape) != tuple(spec.shape):
            raise InvalidArgument(
                f"{what} {name!r} has shape {list(shape)}, expected {list(spec.shape)}"
            )
