"""What every reference model shares: its specs, the compute dtype, the seeded initialiser."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import InvalidArgument
from services.models.layers import Init
from services.stage.plugin import ModelContext, Spec


def spec(name: str, dtype: Any, shape: Sequence[int]) -> Spec:
    return Spec(name, np.dtype(dtype), tuple(int(d) for d in shape))


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
    `infer` = `forward` with C-contiguous outputs (stages copy them into buffers as they are)."""

    inputs: list[Spec]
    outputs: list[Spec]

    def __init__(self, ctx: ModelContext, name: str) -> None:
        self.ctx = ctx
        self.xp = ctx.xp
        self.dtype = np.dtype(ctx.compute_dtype)
        self.init = Init(ctx, name)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: self.xp.ascontiguousarray(v) for k, v in self.forward(batch).items()}
