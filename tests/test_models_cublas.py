"""The capturable cuBLAS GEMM's plan, checked on the CPU: each planned call is carried out as
cuBLAS defines it (column-major, op, leading dimension, batch stride, from each operand's first
element) and must give numpy's matmul. The library calls themselves: tests/gpu."""

from __future__ import annotations

import numpy as np
import pytest

from services.models.cublas import OP_N, Call, plan


def memory(x: np.ndarray) -> np.ndarray:
    """Flat elements from x's first element on (its base has room after it)."""
    size = x.base.size if x.base is not None else x.size
    return np.lib.stride_tricks.as_strided(x, (size,), (x.itemsize,), writeable=False)


def column_major(mem: np.ndarray, offset: int, rows: int, cols: int, ld: int) -> np.ndarray:
    return np.array([[mem[offset + i + j * ld] for j in range(cols)] for i in range(rows)])


def run_call(c: Call, a_mem: np.ndarray, b_mem: np.ndarray, c_mem: np.ndarray) -> None:
    for t in range(c.count):
        # cuBLAS's A is our B; stored m x k (op N) or k x m (op T), column-major
        if c.transa == OP_N:
            opa = column_major(b_mem, c.a_offset + t * c.stride_a, c.m, c.k, c.lda)
        else:
            opa = column_major(b_mem, c.a_offset + t * c.stride_a, c.k, c.m, c.lda).T
        if c.transb == OP_N:
            opb = column_major(a_mem, c.b_offset + t * c.stride_b, c.k, c.n, c.ldb)
        else:
            opb = column_major(a_mem, c.b_offset + t * c.stride_b, c.n, c.k, c.ldb).T
        prod = opa @ opb  # m x n, column-major into C
        base = c.c_offset + t * c.stride_c
        for i in range(c.m):
            for j in range(c.n):
                c_mem[base + i + j * c.ldc] = prod[i, j]


def emulate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    p = plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    if p.copy_a or p.copy_b:  # as gemm does
        a = np.ascontiguousarray(a) if p.copy_a else a
        b = np.ascontiguousarray(b) if p.copy_b else b
        p = plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    assert p.calls and not (p.copy_a or p.copy_b)
    out = np.zeros(p.out_shape, dtype=a.dtype)
    flat = out.reshape(-1)
    for c in p.calls:
        run_call(c, memory(a), memory(b), flat)
    return out


def padded(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A C-order array with spare room after it in its base (so strided reads stay inside)."""
    n = int(np.prod(shape))
    base = rng.standard_normal(n + 64).astype(np.float32)
    return base[:n].reshape(shape)


CASES = {
    "2-D": ((5, 7), (7, 3), None),
    "batch against shared weights": ((4, 2, 6), (6, 5), None),
    "per-head scores against transposed keys": ((2, 3, 1, 4), (2, 3, 5, 4), "swap_b"),
    "per-head weights against values": ((2, 3, 1, 5), (2, 3, 5, 4), None),
    "sliced cache (strided batch)": ((2, 3, 1, 4), (2, 3, 9, 4), "slice_b"),
    "broadcast on both sides": ((2, 1, 3, 4), (5, 4, 6), None),
    "transposed a": ((6, 3), (6, 4), "swap_a"),
    "one row": ((1, 8), (8, 8), None),
    "one column out": ((3, 8), (8, 1), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_planned_calls_compute_matmul(name: str) -> None:
    rng = np.random.default_rng(0)
    a_shape, b_shape, how = CASES[name]
    a, b = padded(a_shape, rng), padded(b_shape, rng)
    if how == "swap_b":
        b = b.swapaxes(-1, -2)
    elif how == "swap_a":
        a = a.swapaxes(-1, -2)
    elif how == "slice_b":
        b = b[:, :, :6]  # keys[:, :, : t + 1] of a longer cache
        a = padded((2, 3, 1, 4), rng)
        b = b.swapaxes(-1, -2)
    np.testing.assert_allclose(emulate(a, b), np.matmul(a, b), rtol=1e-5, atol=1e-5)


def test_unaddressable_operands_are_copied_and_bad_shapes_refused() -> None:
    rng = np.random.default_rng(1)
    a = padded((4, 6), rng)[:, ::2]  # neither dimension unit-stride
    b = padded((3, 5), rng)
    p = plan(a.shape, a.strides, b.shape, b.strides, 4)
    assert p.copy_a and not p.copy_b and not p.calls
    np.testing.assert_allclose(emulate(a, b), a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="align"):
        plan((2, 3), (12, 4), (4, 5), (20, 4), 4)
    with pytest.raises(ValueError, match="two batch"):
        plan((2, 2, 2, 2, 3), (96, 48, 24, 12, 4), (3, 4), (16, 4), 4)
