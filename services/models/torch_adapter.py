"""Any `torch.nn.Module` as a stage plug-in, exchanging tensors through DLPack with no copy.

The batch (a CuPy or NumPy array) becomes a torch tensor over the same memory with
`torch.from_dlpack`; the result goes back the same way (`cupy.from_dlpack` / `np.from_dlpack`).
DLPack's stream argument orders torch's stream after CuPy's and back, so no explicit sync is
needed. Weights are random (`weights=None`: nothing is downloaded), seeded from `ctx.seed`.
torch is an optional extra (`pip install camelot[torch]`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.backend import Backend
from common.errors import FailedPrecondition, InvalidArgument
from services.models.base import spec
from services.stage.plugin import ModelContext, TensorSpec, load_factory

_DTYPES = ("float16", "float32")


class TorchModel:
    """One input, one output; `module` is the wrapped torch module (exposed for tests)."""

    def __init__(
        self, ctx: ModelContext, module: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]
    ) -> None:
        import torch

        self.torch = torch
        self.ctx = ctx
        self.module = module
        self.inputs, self.outputs = inputs, outputs

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        torch = self.torch
        x = batch[self.inputs[0].name]
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            # DLPack cannot export a read-only NumPy array; the host path pays one copy here
            x = x.copy()
        with torch.inference_mode():
            y = self.module(torch.from_dlpack(x))
        y = y.contiguous()
        if self.ctx.backend is Backend.CUDA:
            return {self.outputs[0].name: self.ctx.xp.from_dlpack(y)}
        return {self.outputs[0].name: np.from_dlpack(y)}


def torch_module(
    ctx: ModelContext,
    module: str = "torchvision.models:resnet50",
    input_shape: Sequence[int] = (3, 224, 224),
    dtype: str = "float16",
    input_name: str = "input",
    output_name: str = "output",
    **kwargs: Any,
) -> TorchModel:
    """Builds `module(**kwargs)` (with `weights=None` where it takes weights), eval mode, on cuda
    in `dtype` when the backend is cuda; on the host it runs in float32 (half convs are slow or
    missing on CPUs). Output spec is found by one forward pass on zeros."""
    try:
        import torch
    except ImportError:
        raise FailedPrecondition(
            "the torch adapter needs PyTorch: pip install 'camelot[torch]'"
        ) from None
    if dtype not in _DTYPES:
        raise InvalidArgument(f"option dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    ctor = load_factory(module)
    if "weights" not in kwargs and _takes(ctor, "weights"):
        kwargs["weights"] = None
    torch.manual_seed(ctx.seed)
    try:
        net = ctor(**kwargs)
    except TypeError as e:
        raise InvalidArgument(f"cannot build {module} with options {sorted(kwargs)}: {e}") from e
    cuda = ctx.backend is Backend.CUDA
    np_dtype = np.dtype(dtype) if cuda else np.dtype(np.float32)
    torch_dtype = getattr(torch, np_dtype.name)
    net = net.eval().to(device="cuda" if cuda else "cpu", dtype=torch_dtype)
    shape = tuple(int(d) for d in input_shape)
    with torch.inference_mode():
        probe = net(torch.zeros((1, *shape), dtype=torch_dtype, device="cuda" if cuda else "cpu"))
    out_dtype = np.dtype(str(probe.dtype).removeprefix("torch."))
    inputs = [spec(input_name, np_dtype, shape)]
    outputs = [spec(output_name, out_dtype, tuple(probe.shape[1:]))]
    return TorchModel(ctx, net, inputs, outputs)


def _takes(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params
