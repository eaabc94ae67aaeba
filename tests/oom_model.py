"""A model plug-in whose weights do not fit its GPU: its factory raises what CuPy raises then (a
class named OutOfMemoryError, no Camelot error), so the stage's own mapping is what is tested."""

from __future__ import annotations

from typing import Any


class OutOfMemoryError(MemoryError):
    """Named as cupy.cuda.memory.OutOfMemoryError and torch.OutOfMemoryError are."""


def too_big(ctx: Any, **options: Any) -> Any:
    raise OutOfMemoryError("Out of memory allocating 10,737,418,240 bytes (allocated so far: 0)")
