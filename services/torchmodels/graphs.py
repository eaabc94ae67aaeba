"""CUDA graphs for a torch stage's graph-safe forward: captured once per batch bucket, replayed
with one launch (the torch counterpart of services/models/graphs.py).

- Batches are padded to a power-of-two bucket; each bucket has its own `torch.cuda.CUDAGraph`
  with static inputs and outputs in the graph's private memory pool (torch's default for a
  capture). A call copies its rows into the static inputs (rows past the batch keep what they
  held: every stage treats rows independently), replays, and returns clones of the first n
  output rows, so outputs outlive the next replay.
- A graph is not tied to a stream: it is captured on torch's side stream after two eager
  warm-up runs there (cuDNN and cuBLAS pick their kernels and workspaces, lazy modules
  initialise), and replayed on the caller's current stream, the replica's. A replica runs one
  batch at a time, so one graph per bucket serves every stream, green slices included.
- A capture that fails (a forward that waits on the host, say) turns graphs off for that part of
  the stage with one warning; it runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.models.graphs import bucket
from services.stage.plugin import TensorSpec

log = logging.getLogger(__name__)


@dataclass
class Captured:
    graph: Any
    inputs: list[Any]
    outputs: list[Any]


class TorchGraphs:
    """`fn(*tensors) -> tensor or sequence of tensors` behind CUDA graphs; see the module
    docstring. `specs` are the per-item inputs (their dtypes as `fn` receives them)."""

    def __init__(
        self, name: str, fn: Callable[..., Any], specs: Sequence[TensorSpec], device: Any
    ) -> None:
        import torch

        self.torch = torch
        self.name = name
        self.fn = fn
        self.specs = list(specs)
        self.device = device
        self.graphs: dict[int, Captured] = {}
        self.disabled: str | None = None  # why graphs are off, once they are
        self.replays = 0
        self._single = False  # whether fn returns one tensor (else a sequence)

    def __call__(self, *xs: Any) -> Any:
        if self.disabled is not None:
            return self.fn(*xs)
        n = int(xs[0].shape[0])
        b = bucket(n)
        captured = self.graphs.get(b)
        if captured is None:
            try:
                captured = self.capture(b, [x.dtype for x in xs])
            except Exception as e:  # a forward that cannot be captured still serves, eagerly
                self.disabled = f"{type(e).__name__}: {e}"
                self.graphs.clear()
                log.warning("%s: CUDA graph capture failed, running eagerly: %s", self.name, e)
                return self.fn(*xs)
            self.graphs[b] = captured
        for static, x in zip(captured.inputs, xs, strict=True):
            static[:n].copy_(x)
        captured.graph.replay()
        self.replays += 1
        outs = [y[:n].clone() for y in captured.outputs]
        return outs[0] if self._single else outs

    def capture(self, n: int, dtypes: Sequence[Any]) -> Captured:
        torch = self.torch
        static = [
            torch.zeros((n, *s.shape), dtype=dt, device=self.device)
            for s, dt in zip(self.specs, dtypes, strict=True)
        ]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: another thread's CUDA calls (the event loop opening IPC handles) must
        # not invalidate this capture, nor fail for it
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.fn(*static)
        self._single = isinstance(out, torch.Tensor)
        outputs = [out] if self._single else list(out)
        log.info("%s: captured a CUDA graph for batch %d", self.name, n)
        return Captured(graph, static, outputs)
