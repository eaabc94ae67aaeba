"""The null model: a real plug-in that does no arithmetic, so a mesh of it measures the host path.

A stage that serves it still does everything a stage does (batching, buffers, refs, reports);
`infer` only hands its input on. Each output takes the input at its position (output i reads
input i mod len(inputs)):

- same dtype and shape: forwarded as it is (`copy: false`, the default; the stage copies it into
  the output buffer anyway) or copied first (`copy: true`, one extra device or host copy);
- otherwise its bytes are reinterpreted: the input's first bytes, zero-padded when short, viewed
  as the output's dtype and shape. A copy, still no arithmetic.

Specs come from the pipeline config, so a null pipeline can take any shape of the reference ones:

    model: services.models.null:null
    options:
      inputs: [{name: frame, dtype: uint8, shape: [4096]}]
      outputs: [{name: boxes, dtype: float32, shape: [1024]}]

Both lists default to one 4 KiB tensor `x` (uint8 [4096]); outputs default to the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import InvalidArgument
from contract.pipeline_config import DTYPES
from services.models.base import positive
from services.stage.plugin import ModelContext, TensorSpec

DEFAULT_SPECS: tuple[dict[str, Any], ...] = ({"name": "x", "dtype": "uint8", "shape": [4096]},)
# the null pipelines' input (services/pipelines/null/*.yaml): 4 KiB
PAYLOAD_BYTES = 4096


def parse_specs(option: str, raw: Any) -> list[TensorSpec]:
    """`[{name, dtype, shape}, ...]` into specs; INVALID_ARGUMENT naming the option and entry."""
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidArgument(f"option {option}={raw!r} must be a non-empty list of specs")
    specs: list[TensorSpec] = []
    for i, entry in enumerate(raw):
        where = f"option {option}[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != {"name", "dtype", "shape"}:
            raise InvalidArgument(f"{where}={entry!r} must be {{name, dtype, shape}}")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{where}.name={name!r} must be a non-empty string")
        if dtype not in DTYPES:
            raise InvalidArgument(f"{where}.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list | tuple) or not shape:
            raise InvalidArgument(f"{where}.shape={shape!r} must be a non-empty list")
        dims = tuple(positive(f"{option}[{i}].shape", d) for d in shape)
        specs.append(TensorSpec(name, np.dtype(dtype), dims))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"option {option} names a tensor twice: {names}")
    return specs


def nbytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * spec.dtype.itemsize


class Null:
    """Inputs to outputs with no arithmetic (see the module docstring)."""

    def __init__(
        self, ctx: ModelContext, inputs: list[TensorSpec], outputs: list[TensorSpec], copy: bool
    ):
        self.xp = ctx.xp
        self.inputs = inputs
        self.outputs = outputs
        self.copy = copy
        # (output, the input it reads, whether the two have the same dtype and shape)
        self._plan = [
            (out, src, out.dtype == src.dtype and out.shape == src.shape)
            for out, src in ((o, inputs[i % len(inputs)]) for i, o in enumerate(outputs))
        ]

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec, src, same in self._plan:
            array = batch[src.name]
            if not same:
                out[spec.name] = self._recast(array, spec)
            elif self.copy:
                out[spec.name] = self.xp.copy(array)
            else:
                out[spec.name] = array
        return out

    def _recast(self, array: Any, spec: TensorSpec) -> Any:
        """The batch's items' leading bytes, zero-padded, as items of `spec`."""
        xp = self.xp
        n = int(array.shape[0])
        raw = xp.ascontiguousarray(array).reshape(n, -1).view(np.uint8)
        want = nbytes(spec)
        if raw.shape[1] >= want:
            body = xp.ascontiguousarray(raw[:, :want])
        else:
            body = xp.zeros((n, want), dtype=np.uint8)
            body[:, : raw.shape[1]] = raw
        return body.view(spec.dtype).reshape(n, *spec.shape)


def null(
    ctx: ModelContext,
    inputs: Sequence[Mapping[str, Any]] = DEFAULT_SPECS,
    outputs: Sequence[Mapping[str, Any]] | None = None,
    copy: bool = False,
) -> Null:
    if not isinstance(copy, bool):
        raise InvalidArgument(f"option copy={copy!r} must be true or false")
    ins = parse_specs("inputs", inputs)
    outs = parse_specs("outputs", outputs) if outputs is not None else list(ins)
    return Null(ctx, ins, outs, copy)


def payload(size: str, rng: np.random.Generator) -> np.ndarray:
    """The null pipelines' query input at every size: 4 KiB of random uint8 (a null pipeline
    with another input spec names a generator of its own)."""
    return rng.integers(0, 256, PAYLOAD_BYTES, dtype=np.uint8)
