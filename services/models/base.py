"""What every reference model shares: its specs, the compute dtype, the seeded initialiser."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.backend import Backend
from common.errors import InvalidArgument
from services.models import layers as L
from services.models.graphs import GraphedForward, capturable_matmul
from services.models.layers import Init
from services.stage.plugin import ModelContext, TensorSpec


def spec(name: str, dtype: Any, shape: Sequence[int]) -> TensorSpec:
    return TensorSpec(name, np.dtype(dtype), tuple(int(d) for d in shape))


def positive(name: str, value: Any) -> int:
    """An option that must be a positive integer; INVALID_ARGUMENT otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument(f"option {name}={value!r} must be a positive integer")
    return value


def channels(name: str, value: Any) -> list[int]:
    if not isinstance(value, list | tuple) or not value:
        raise InvalidArgument(f"option {name}={value!r} must be a non-empty list of integers")
    return [positive(name, v) for v in value]


def divisible(d: int, heads: int) -> None:
    if d % heads:
        raise InvalidArgument(f"option d_model={d} is not divisible by heads={heads}")


class ReferenceModel:
    """Base of the reference plug-ins: per-item specs, an initialiser named after the model, and
    `infer` = `forward` with C-contiguous outputs (stages copy them into buffers as they are).

    A model whose `forward` never waits on the host (no `.get()`, no host-built arrays, no
    data-dependent shapes) sets `graph_safe`; on CUDA with `ctx.cuda_graphs` its `forward` then
    runs as a CUDA graph per batch bucket (services/models/graphs.py)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    graph_safe = False

    def __init__(self, ctx: ModelContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.xp = ctx.xp
        self.dtype = np.dtype(ctx.compute_dtype)
        self.init = Init(ctx, name)
        self.graphed: GraphedForward | None = None

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def uses_graphs(self) -> bool:
        """Whether `infer` goes through CUDA graphs (which answer eagerly, as with graphs off,
        once a capture has failed)."""
        return self.graph_safe and self.ctx.cuda_graphs and self.ctx.backend is Backend.CUDA

    def forward_capturable(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """`forward` with every matrix multiply on one that CUDA graph capture accepts: what a
        graph records, and (run eagerly) the same kernels as its replay."""
        with L.matmul_with(capturable_matmul()):
            return self.forward(batch)

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.uses_graphs:
            if self.graphed is None:
                self.graphed = GraphedForward(
                    self.name, self.xp, self.forward_capturable, self.forward, self.inputs
                )
            out = self.graphed(batch)
        else:
            out = self.forward(batch)
        return {k: self.xp.ascontiguousarray(v) for k, v in out.items()}
