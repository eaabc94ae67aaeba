"""CUDA graphs for a reference model's forward pass: captured once per batch bucket, replayed
with one launch.

A launch-bound model (the caption decoder issues ~2,700 small kernels per query batch) spends its
time in Python and the driver, not on the SMs. Capturing `forward` into a CUDA graph turns all of
that into one `cudaGraphLaunch`. How it is kept correct:

- Batches are padded to a power-of-two bucket; each (stream, bucket) has its own graph with
  static input and output arrays. A call copies its inputs into the static inputs (rows past the
  batch keep whatever they held: every reference model treats rows independently), launches, and
  returns copies of the first n output rows, so a caller may keep its outputs across the next call.
- Everything a graph touches comes from its own CuPy memory pool, used by nothing else: memory the
  capture freed cannot be handed to another array and then overwritten by a replay.
- The capture is preceded by one eager run on the same stream and pool (kernels compiled, cuBLAS
  workspace and pool blocks in place), so capturing performs no allocation or compilation.
- A capture that fails (a model that synchronizes with the host, say) disables graphs for the
  model with one warning, and every call runs eagerly from then on; nothing is lost.
- The legacy default stream cannot be captured: calls on it run eagerly.
- CuPy refuses cuBLAS under capture, so a captured forward multiplies through
  `capturable_matmul()`: cuBLAS called directly (services/models/cublas.py) where its library
  loads, else a plain CUDA kernel (services/models/kernels.py, fine for small GEMMs only).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.stage.plugin import TensorSpec

log = logging.getLogger(__name__)

Forward = Callable[[Mapping[str, Any]], dict[str, Any]]


_matmul: Callable[[Any, Any], Any] | None = None


def capturable_matmul() -> Callable[[Any, Any], Any]:
    """The matrix multiply a captured forward uses (chosen once per process)."""
    global _matmul
    if _matmul is None:
        from services.models import cublas, kernels

        try:
            cublas.load_library()
            _matmul = cublas.gemm
        except (ImportError, OSError, RuntimeError, AttributeError) as e:
            log.warning("cuBLAS cannot be called directly (%s); graphs multiply with a kernel", e)
            _matmul = kernels.bmm
    return _matmul


def bucket(n: int) -> int:
    """The batch size a batch of n runs at: the next power of two."""
    if n <= 0:
        raise ValueError(f"batch size must be positive, got {n}")
    return 1 << (n - 1).bit_length()


@dataclass
class Captured:
    graph: Any
    pool: Any  # the graph's private memory: kept alive with it, never used by anything else
    inputs: dict[str, Any]
    outputs: dict[str, Any]


class GraphedForward:
    """`forward` behind CUDA graphs on CuPy; see the module docstring."""

    def __init__(
        self, name: str, xp: Any, forward: Forward, eager: Forward, inputs: Sequence[TensorSpec]
    ) -> None:
        """`forward` is what a graph records (its matmuls capturable); `eager` answers wherever
        no graph runs (the legacy stream, or after a capture failed, whatever its cause)."""
        self.name = name
        self.xp = xp
        self.forward = forward
        self.eager = eager
        self.specs = list(inputs)
        self.graphs: dict[tuple[int, int], Captured] = {}
        self.disabled: str | None = None  # why graphs are off for this model, once they are
        self.launches = 0

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.disabled is not None:
            return self.eager(batch)
        stream = self.xp.cuda.get_current_stream()
        if stream.ptr in (0, getattr(self.xp.cuda.runtime, "streamLegacy", 1)):
            return self.eager(batch)
        n = int(next(iter(batch.values())).shape[0])
        key = (int(stream.ptr), bucket(n))
        captured = self.graphs.get(key)
        if captured is None:
            try:
                captured = self.capture(stream, key[1])
            except Exception as e:  # a model that cannot be captured still serves, eagerly
                self.disabled = f"{type(e).__name__}: {e}"
                self.graphs.clear()
                log.warning("%s: CUDA graph capture failed, running eagerly: %s", self.name, e)
                return self.eager(batch)
            self.graphs[key] = captured
        for spec in self.specs:
            captured.inputs[spec.name][:n] = batch[spec.name]
        captured.graph.launch(stream)
        self.launches += 1
        return {k: v[:n].copy() for k, v in captured.outputs.items()}

    def capture(self, stream: Any, n: int) -> Captured:
        xp = self.xp
        pool = xp.cuda.MemoryPool()
        with xp.cuda.using_allocator(pool.malloc):
            static = {s.name: xp.zeros((n, *s.shape), dtype=s.dtype) for s in self.specs}
            self.forward(static)  # eager: compiles kernels and fills the pool the capture reuses
            stream.synchronize()
            stream.begin_capture()
            try:
                outputs = self.forward(static)
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()  # leaves the stream usable after an invalidated capture
                raise
            graph = stream.end_capture()
        log.info("%s: captured a CUDA graph for batch %d", self.name, n)
        return Captured(graph, pool, static, outputs)
