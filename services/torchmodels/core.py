"""What every PyTorch stage shares: buffers in and out through DLPack, the replica's stream,
the compute dtype, seeded random weights or a local state dict, and CUDA graphs.

A stage replica hands `infer` its batch as CuPy arrays (NumPy on the host backend) on the CUDA
stream it chose for the batch (its own, or a green-context slice). `infer` makes torch run on
that very stream (a `torch.cuda.ExternalStream` over the same handle), so `torch.from_dlpack`
and `cupy.from_dlpack` see producer and consumer on one stream and neither copies nor waits:
the tensors are views of the broker's buffers and the outputs are torch's memory seen by CuPy.
Nothing is kept after `infer` returns: outputs are fresh tensors, which CuPy keeps alive.

Weights are random (seeded from the context's seed and the stage's name: every replica of a
stage holds the same model, nothing is downloaded), or the `weights:` file of the stage's
options, a `state_dict` saved with `torch.save`. On CUDA the module runs in fp16, on the host in
fp32 (as the reference models); specs declare what crosses the wire, and float tensors are cast
to and from the compute dtype at the boundary.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import Backend
from common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.stage.plugin import ModelContext, TensorSpec
from services.torchmodels.graphs import TorchGraphs


def require_torch() -> Any:
    """The torch module; FAILED_PRECONDITION saying how to install it where it is missing."""
    try:
        import torch
    except ImportError:
        raise FailedPrecondition(
            "PyTorch stages need the torch extra: pip install 'camelot[torch]'"
        ) from None
    return torch


def spec(name: str, dtype: Any, shape: Sequence[int]) -> TensorSpec:
    return TensorSpec(name, np.dtype(dtype), tuple(int(d) for d in shape))


def pair(name: str, value: Any) -> tuple[int, int]:
    """An option that is one positive integer or two (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)
    ):
        raise InvalidArgument(f"option {name}={value!r} must be a positive integer or two")
    return int(value[0]), int(value[1])


def positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument(f"option {name}={value!r} must be a positive integer")
    return value


def torch_dtype(torch: Any, dtype: np.dtype[Any]) -> Any:
    try:
        return {"bool": torch.bool}.get(dtype.name) or getattr(torch, dtype.name)
    except AttributeError:
        raise InvalidArgument(f"dtype {dtype} has no torch equivalent") from None


def load_weights(module: Any, path: str | None, what: str) -> None:
    """Loads a local state dict into `module` (strictly: every key, every shape)."""
    if not path:
        return
    torch = require_torch()
    file = Path(path)
    if not file.is_file():
        raise NotFound(f"{what}: weights file {path} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError, EOFError) as e:
        raise InvalidArgument(f"{what}: cannot load weights from {path}: {e}") from e


def calibrate_batchnorm(torch: Any, module: Any, forward: Callable[[], Any]) -> None:
    """BatchNorm's running statistics set from the network's own activations on `forward()`'s
    inputs, as training leaves them. Random weights with the default statistics (mean 0,
    variance 1) shrink or grow activations layer after layer: SSDlite's backbone loses ~10x a
    stage and reaches fp16 zeros, so every box would score alike. Runs in train mode with a
    cumulative average (one pass: each layer's statistics from already-normalised inputs)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    with torch.no_grad():
        forward()
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    module.eval()


class TorchStage:
    """Base of the PyTorch plug-ins. A subclass builds its modules between `seeded()` and
    `place()`, and implements `forward(*inputs) -> outputs` on torch batches (inputs in spec
    order, on the device; float inputs already in the compute dtype); a graph-safe part of it
    goes through `self.graphed(...)`."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def __init__(self, ctx: ModelContext, name: str) -> None:
        self.torch = torch = require_torch()
        self.ctx = ctx
        self.name = name
        self.cuda = ctx.backend is Backend.CUDA
        if self.cuda and not torch.cuda.is_available():
            raise FailedPrecondition(f"{name}: the cuda backend, but torch sees no CUDA device")
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        )
        self.dtype = torch_dtype(torch, np.dtype(ctx.compute_dtype))
        self._graphs: dict[str, TorchGraphs] = {}
        self._streams: dict[int, Any] = {}

    # -- building ----------------------------------------------------------------------------

    def seeded(self) -> None:
        """Seeds torch's generator for this stage's initialisation (stable across processes)."""
        self.torch.manual_seed(self._seed())

    def generator(self) -> Any:
        """A CPU generator seeded as `seeded()` seeds torch (calibration inputs and the like)."""
        return self.torch.Generator().manual_seed(self._seed())

    def _seed(self) -> int:
        return (self.ctx.seed * 1_000_003 + zlib.crc32(self.name.encode())) % 2**63

    def place(self, module: Any, weights: str | None = None) -> Any:
        """`module` with its weights loaded (if a file is given), in eval mode, on the device, in
        the compute dtype."""
        load_weights(module, weights, self.name)
        return module.eval().to(device=self.device, dtype=self.dtype)

    def graphed(
        self, key: str, fn: Callable[..., Any], specs: Sequence[TensorSpec]
    ) -> Callable[..., Any]:
        """`fn` replayed as a CUDA graph per batch bucket where graphs are on (CUDA, the context
        asks for them); `fn` itself elsewhere. `specs` give the per-item inputs of `fn` as they
        reach it (their dtype is the torch dtype `fn` receives)."""
        if not self.ctx.cuda_graphs or not self.cuda:
            return fn
        graphs = self._graphs.get(key)
        if graphs is None:
            graphs = TorchGraphs(f"{self.name}.{key}", fn, specs, self.device)
            self._graphs[key] = graphs
        return graphs

    @property
    def uses_graphs(self) -> bool:
        """Whether some part of `infer` replays CUDA graphs (a batch costs its bucket's time)."""
        return any(g.disabled is None for g in self._graphs.values())

    # -- running -----------------------------------------------------------------------------

    def forward(self, *inputs: Any) -> Sequence[Any]:
        raise NotImplementedError

    def _stream(self) -> Any:
        """torch on the stream the replica made current for this batch (CuPy's)."""
        if not self.cuda:
            return contextlib.nullcontext()
        ptr = int(self.ctx.xp.cuda.get_current_stream().ptr)
        stream = self._streams.get(ptr)
        if stream is None:
            torch = self.torch
            # the device named: the replica's GPU thread may have another current device
            stream = (
                torch.cuda.default_stream(self.device)
                if ptr == 0
                else torch.cuda.ExternalStream(ptr, device=self.device)
            )
            self._streams[ptr] = stream
        return self.torch.cuda.stream(stream)

    def to_torch(self, array: Any, want: TensorSpec) -> Any:
        if isinstance(array, np.ndarray) and not array.flags.writeable:
            array = array.copy()  # DLPack cannot export a read-only NumPy array
        t = self.torch.from_dlpack(array)
        if want.dtype.kind == "f" and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def from_torch(self, tensor: Any, want: TensorSpec) -> Any:
        t = tensor.to(torch_dtype(self.torch, want.dtype)).contiguous()
        if self.cuda:
            return self.ctx.xp.from_dlpack(t)
        return np.from_dlpack(t)

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        torch = self.torch
        with self._stream(), torch.inference_mode():
            xs = [self.to_torch(batch[s.name], s) for s in self.inputs]
            ys = self.forward(*xs)
            return {s.name: self.from_torch(y, s) for s, y in zip(self.outputs, ys, strict=True)}

    def zeros(self, n: int) -> list[Any]:
        """A batch of zeros for every input, as `forward` receives them (probes, tests)."""
        return [
            self.torch.zeros(
                (n, *s.shape),
                dtype=self.dtype if s.dtype.kind == "f" else torch_dtype(self.torch, s.dtype),
                device=self.device,
            )
            for s in self.inputs
        ]
