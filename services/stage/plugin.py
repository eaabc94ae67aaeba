"""The model plug-in interface a stage replica serves.

A plug-in is named by an import path `package.module:factory` in the pipeline config. The factory
is called once per replica process as `factory(ctx, **options)` and returns an object with:

    inputs:  list[TensorSpec]   per-item specs (no batch dimension), in order
    outputs: list[TensorSpec]   per-item specs
    infer(batch) -> dict        batch maps input name -> array of shape (n, *spec.shape) on
                                ctx.xp; returns output name -> array of shape (n, *spec.shape),
                                same backend

`infer` must be deterministic for a given (seed, input), must not keep references to its inputs
after returning (their buffers go back to the broker), and runs on the replica's one GPU thread.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from common.backend import Backend
from common.errors import InvalidArgument
from contract.pipeline_config import TensorSpec

__all__ = ["Model", "ModelContext", "TensorSpec", "build_model", "load_factory"]


@dataclass(frozen=True)
class ModelContext:
    """What a factory gets: the backend and its array namespace, the size and the weight seed."""

    backend: Backend
    xp: ModuleType
    size: str = "tiny"
    seed: int = 0
    # fp16 on the GPU, fp32 on the CPU (the reference models follow this)
    compute_dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.float32))
    # replay graph-safe models' forward passes as CUDA graphs (CUDA only; see models/graphs.py)
    cuda_graphs: bool = False


class Model(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]: ...


def load_factory(path: str) -> Any:
    """The callable named by `package.module:attr`; INVALID_ARGUMENT for a malformed or bad path."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"model path {path!r} is not of the form package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidArgument(f"cannot import model module {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InvalidArgument(f"module {module_name!r} has no attribute {attr!r}") from None


def build_model(path: str, ctx: ModelContext, options: Mapping[str, Any] | None = None) -> Model:
    factory = load_factory(path)
    model: Model = factory(ctx, **dict(options or {}))
    return model
