"""The shape side of `a @ b` that both capturable matrix multiplies share (services/models/
kernels.py, services/models/cublas.py): numpy's matmul rules, with the broadcast batch padded to
exactly two dimensions and every stride in elements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Operands:
    m: int
    k: int
    n: int
    batch: tuple[int, ...]  # as broadcast (0 to 2 dimensions): the output is (*batch, m, n)
    b0: int  # the batch padded to two dimensions
    b1: int
    a_batch: tuple[int, int]  # a's element strides over (b0, b1); 0 where broadcast
    b_batch: tuple[int, int]
    a_matrix: tuple[int, int]  # a's element strides over (row, column)
    b_matrix: tuple[int, int]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.batch, self.m, self.n)


def _batch_strides(
    shape: tuple[int, ...], steps: tuple[int, ...], batch: tuple[int, ...]
) -> tuple[int, int]:
    dims, st = list(shape[:-2]), list(steps[:-2])
    pad = len(batch) - len(dims)
    dims, st = [1] * pad + dims, [0] * pad + st
    out = [0 if d == 1 else s for d, s in zip(dims, st, strict=True)]
    s0, s1 = [0] * (2 - len(out)) + out
    return s0, s1


def operands(
    a_shape: Sequence[int],
    a_strides: Sequence[int],
    b_shape: Sequence[int],
    b_strides: Sequence[int],
    itemsize: int,
) -> Operands:
    """`a @ b`'s dimensions and element strides (strides given in bytes, as numpy and CuPy
    give them); ValueError if the shapes do not multiply, the broadcast batch has more than two
    dimensions, or a stride is negative."""
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ValueError(f"matmul needs matrices, got shapes {a_shape} and {b_shape}")
    m, k = a_shape[-2:]
    k2, n = b_shape[-2:]
    if k != k2:
        raise ValueError(f"matmul shapes {a_shape} and {b_shape} do not align")
    batch = tuple(int(d) for d in np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    if len(batch) > 2:
        raise ValueError(f"matmul supports at most two batch dimensions, got {batch}")
    if min(*a_strides, *b_strides) < 0:
        raise ValueError("matmul does not take negative strides")
    sa = tuple(s // itemsize for s in a_strides)
    sb = tuple(s // itemsize for s in b_strides)
    b0, b1 = (1,) * (2 - len(batch)) + batch
    return Operands(
        m=m,
        k=k,
        n=n,
        batch=batch,
        b0=b0,
        b1=b1,
        a_batch=_batch_strides(a_shape, sa, batch),
        b_batch=_batch_strides(b_shape, sb, batch),
        a_matrix=(sa[-2], sa[-1]),
        b_matrix=(sb[-2], sb[-1]),
    )
