"""The fault plug-in: the null model (inputs handed on, no arithmetic) faulting on a poisoned item.

An item is poisoned when its first input's first `poison_len` elements all equal `poison` (the
null pipelines' random 4 KiB payload is poisoned by chance once in 2^64). A batch holding one
faults the way a broken model does:

    CUDA   `fault: illegal_address` (the default) launches a kernel that writes through an
           invalid pointer: a real, sticky cudaErrorIllegalAddress (under MPS, every client of
           the GPU's server is hit); `fault: trap` one that executes `__trap()` (an unspecified
           launch failure). The stream is then synchronized, so the fault surfaces in `infer`.
    host   raises the error PyTorch raises for an illegal address, which the stage recognises
           as a fatal fault (common/devicefault.py): the seam for tests without a GPU.

    model: services.models.fault:fault
    options: {poison: 251, fault: illegal_address}

For tests and the GPU-fault benchmark (loadgen.gpu_faults), through pipelines served only with
--pipelines-dir (services/pipelines/faults/fault2.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.backend import Backend
from common.errors import InvalidArgument
from services.models.null import DEFAULT_SPECS, Null, parse_specs
from services.stage.plugin import ModelContext

FAULTS = ("illegal_address", "trap")
DEFAULT_POISON = 251
DEFAULT_POISON_LEN = 8
# what PyTorch says for cudaErrorIllegalAddress; the host backend's stand-in for the real fault
HOST_FAULT_TEXT = "CUDA error: an illegal memory access was encountered (host-backend fault)"

_KERNELS = r"""
extern "C" __global__ void illegal_address(unsigned long long address) {
    *reinterpret_cast<volatile int*>(address) = 1;
}
extern "C" __global__ void trap() {
    __trap();
}
"""
# an address no allocation has: the first page, never mapped on the device
_BAD_ADDRESS = 0x10


def poison_input(
    item: np.ndarray, poison: int = DEFAULT_POISON, n: int = DEFAULT_POISON_LEN
) -> Any:
    """A copy of one query's input that the fault plug-in faults on."""
    out = np.array(item, copy=True)
    out.reshape(-1)[:n] = poison
    return out


class Fault(Null):
    """Null, plus a real device fault on a poisoned item (see the module docstring)."""

    def __init__(self, ctx: ModelContext, null: Null, poison: int, poison_len: int, fault: str):
        super().__init__(ctx, null.inputs, null.outputs, null.copy)
        self.backend = ctx.backend
        self.poison = poison
        self.poison_len = poison_len
        self.fault = fault
        self._kernel: Any = None
        if ctx.backend is Backend.CUDA:
            self._kernel = ctx.xp.RawModule(code=_KERNELS).get_function(fault)

    def poisoned(self, batch: Mapping[str, Any]) -> bool:
        first = batch[self.inputs[0].name]
        head = first.reshape(first.shape[0], -1)[:, : self.poison_len]
        if self.backend is Backend.CUDA:
            head = self.xp.asnumpy(head)
        return bool(np.any(np.all(head == self.poison, axis=1)))

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.poisoned(batch):
            self._fault()
        return super().infer(batch)

    def _fault(self) -> None:
        if self._kernel is None:
            raise RuntimeError(HOST_FAULT_TEXT)
        args = (np.uint64(_BAD_ADDRESS),) if self.fault == "illegal_address" else ()
        self._kernel((1,), (1,), args)
        # the fault is asynchronous: wait for it here, so the batch that caused it reports it
        self.xp.cuda.get_current_stream().synchronize()
        raise RuntimeError(f"the {self.fault} kernel did not fault")


def fault(
    ctx: ModelContext,
    inputs: Sequence[Mapping[str, Any]] = DEFAULT_SPECS,
    outputs: Sequence[Mapping[str, Any]] | None = None,
    copy: bool = False,
    poison: int = DEFAULT_POISON,
    poison_len: int = DEFAULT_POISON_LEN,
    fault: str = "illegal_address",
) -> Fault:
    if fault not in FAULTS:
        raise InvalidArgument(f"option fault={fault!r} is not one of {', '.join(FAULTS)}")
    if not isinstance(poison_len, int) or poison_len < 1:
        raise InvalidArgument(f"option poison_len={poison_len!r} must be a positive integer")
    ins = parse_specs("inputs", inputs)
    outs = parse_specs("outputs", outputs) if outputs is not None else list(ins)
    return Fault(ctx, Null(ctx, ins, outs, copy), int(poison), poison_len, fault)
