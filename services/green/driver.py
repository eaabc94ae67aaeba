"""The CUDA driver calls green contexts need, each checked: a failure names the call and CUresult.

`cuda.bindings` functions return a tuple `(CUresult, *outputs)`; `call` raises `CudaCallError` on
anything but success and returns the outputs (none, one, or a tuple). The binding is imported on
first use, so importing this package costs nothing on a machine without CUDA.
"""

from __future__ import annotations

import functools
from typing import Any

from common.errors import CamelotError

# CUresult values whose cause is worth spelling out in the message.
_HINTS = {
    914: "use only the groups the split returned (its count), never the padded list",
    915: (
        "is CUDA_MPS_ACTIVE_THREAD_PERCENTAGE set for this process? green contexts need MPS "
        "at 100%: never mix an MPS percentage with a green-context split"
    ),
}


class CudaCallError(CamelotError):
    """A CUDA driver call failed; `call` names it, `code` is the CUresult value."""

    def __init__(self, call: str, code: int, name: str) -> None:
        hint = _HINTS.get(code)
        message = f"{call} failed: {name} ({code})" + (f"; {hint}" if hint else "")
        super().__init__(message)
        self.call = call
        self.result = code
        self.result_name = name


@functools.cache
def driver() -> Any:
    """The `cuda.bindings.driver` module (cuda-python >= 12.6), else the older `cuda.cuda`."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        from cuda import cuda as cu  # cuda-python < 12.6 spelled it this way
    out = cu.cuInit(0)
    _raise_for(cu, "cuInit", out[0] if isinstance(out, tuple) else out)
    return cu


def call(name: str, *args: Any) -> Any:
    """`driver().<name>(*args)`, checked; returns None, the one output, or a tuple of outputs."""
    cu = driver()
    out = getattr(cu, name)(*args)
    err, *values = out if isinstance(out, tuple) else (out,)
    _raise_for(cu, name, err)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _raise_for(cu: Any, name: str, err: Any) -> None:
    code = int(err)
    if code == 0:
        return
    label = getattr(err, "name", None)
    if not label:
        try:
            label = cu.CUresult(code).name
        except ValueError:
            label = "CUDA_ERROR_UNKNOWN_CODE"
    raise CudaCallError(name, code, str(label))
