"""`a @ b` through cuBLAS called directly, so that a CUDA graph can capture it.

CuPy refuses every cuBLAS call while a stream captures (its `cublas.setStream` raises), although
cuBLAS itself supports stream capture. This module calls `cublasGemmStridedBatchedEx` through
ctypes on CuPy's own cuBLAS handle, after setting the handle's stream and host pointer mode
itself: fp16 or fp32 operands, fp32 accumulation, numpy matmul rules, transposed and broadcast
views without a copy where cuBLAS can address them. `plan` (pure Python, checked on the CPU)
turns two operands into the calls; `gemm` makes them.

Row-major C = A @ B is column-major C^T = B^T A^T: the calls pass B first. A row-major operand
(unit column stride) is its own transpose in column-major with its row stride as leading
dimension (op N); a column-major one (unit row stride, a transposed view) is op T.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.models.operands import operands

OP_N, OP_T = 0, 1
CUDA_R_32F, CUDA_R_16F = 0, 2
COMPUTE_32F = 68
GEMM_DEFAULT = -1
POINTER_MODE_HOST = 0


@dataclass(frozen=True)
class Operand:
    """How cuBLAS reads one operand: op, leading dimension, batch stride (elements)."""

    op: int
    ld: int
    batch_stride: int


@dataclass(frozen=True)
class Call:
    """One cublasGemmStridedBatchedEx, in cuBLAS's (column-major) terms; offsets in elements
    from each operand's first element."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    a_offset: int  # into B (cuBLAS's A)
    b_offset: int  # into A (cuBLAS's B)
    c_offset: int
    stride_a: int
    stride_b: int
    stride_c: int
    count: int


@dataclass(frozen=True)
class Plan:
    out_shape: tuple[int, ...]
    calls: tuple[Call, ...]
    # operands cuBLAS cannot address as they are (neither dimension unit-stride): copy first
    copy_a: bool = False
    copy_b: bool = False


def _matrix(rows: int, cols: int, sr: int, sc: int) -> tuple[int, int] | None:
    """(op, ld) for a rows x cols row-major-indexed operand whose transpose cuBLAS must see as
    a column-major cols x rows matrix; None if it cannot be addressed without a copy."""
    if sc == 1 or cols == 1:
        ld = sr if rows > 1 else cols
        if ld >= max(cols, 1):
            return OP_N, ld
    if sr == 1 or rows == 1:
        ld = sc if cols > 1 else rows
        if ld >= max(rows, 1):
            return OP_T, ld
    return None


def _merged(s0: int, s1: int, b0: int, b1: int) -> int | None:
    """One stride walking the b0 x b1 batch in order, if there is one."""
    if b0 == 1:
        return s1
    if b1 == 1:
        return s0
    return s1 if s0 == s1 * b1 else None


def plan(
    a_shape: Sequence[int],
    a_strides: Sequence[int],
    b_shape: Sequence[int],
    b_strides: Sequence[int],
    itemsize: int,
) -> Plan:
    """The calls for `a @ b` (services/models/operands.py's rules; strides in bytes as numpy
    and CuPy give them). ValueError if the shapes do not multiply."""
    o = operands(a_shape, a_strides, b_shape, b_strides, itemsize)
    m, k, n, b0, b1 = o.m, o.k, o.n, o.b0, o.b1
    a_mat = _matrix(m, k, *o.a_matrix)
    b_mat = _matrix(k, n, *o.b_matrix)
    if a_mat is None or b_mat is None:
        # the caller copies the operand to C order (then it is row-major) and plans again
        return Plan(o.out_shape, (), copy_a=a_mat is None, copy_b=b_mat is None)
    (a0, a1), (c0, c1) = o.a_batch, o.b_batch
    merged_a, merged_b = _merged(a0, a1, b0, b1), _merged(c0, c1, b0, b1)
    mn = m * n
    if merged_a is not None and merged_b is not None:
        groups = [(0, 0, 0, b0 * b1, merged_a, merged_b)]
    else:
        groups = [(i * a0, i * c0, i * b1 * mn, b1, a1, c1) for i in range(b0)]
    calls = tuple(
        Call(
            transa=b_mat[0],
            transb=a_mat[0],
            m=n,
            n=m,
            k=k,
            lda=b_mat[1],
            ldb=a_mat[1],
            ldc=max(n, 1),
            a_offset=b_off,
            b_offset=a_off,
            c_offset=c_off,
            stride_a=stride_b,
            stride_b=stride_a,
            stride_c=mn,
            count=count,
        )
        for a_off, b_off, c_off, count, stride_a, stride_b in groups
    )
    return Plan(o.out_shape, calls)


# ---- the library -----------------------------------------------------------------------------

_lib: Any = None


def load_library() -> Any:
    """libcublas as CuPy loaded it (the same copy, so CuPy's handle is valid in it)."""
    global _lib
    if _lib is not None:
        return _lib
    import cupy

    cupy.cuda.device.get_cublas_handle()  # CuPy has loaded and initialised cuBLAS
    path = None
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                name = line.rsplit(maxsplit=1)[-1]
                if "libcublas.so" in name and "libcublasLt" not in name:
                    path = name
                    break
    except OSError:
        pass
    path = path or ctypes.util.find_library("cublas")
    if not path:
        raise RuntimeError("cannot find the cuBLAS library CuPy uses")
    lib = ctypes.CDLL(path)
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasSetStream_v2.restype = i
    lib.cublasSetPointerMode_v2.argtypes = [p, i]
    lib.cublasSetPointerMode_v2.restype = i
    lib.cublasGemmStridedBatchedEx.argtypes = [
        p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll, i, i, i,
    ]  # fmt: skip
    lib.cublasGemmStridedBatchedEx.restype = i
    _lib = lib
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def gemm(a: Any, b: Any) -> Any:
    """`a @ b` for CuPy arrays (two float16 or two float32), capturable in a CUDA graph."""
    import cupy

    if a.dtype != b.dtype or a.dtype not in (np.float16, np.float32):
        raise TypeError(f"gemm needs two float16 or two float32 operands, got {a.dtype}, {b.dtype}")
    p = plan(a.shape, a.strides, b.shape, b.strides, a.dtype.itemsize)
    if p.copy_a or p.copy_b:
        a = cupy.ascontiguousarray(a) if p.copy_a else a
        b = cupy.ascontiguousarray(b) if p.copy_b else b
        p = plan(a.shape, a.strides, b.shape, b.strides, a.dtype.itemsize)
    out = cupy.empty(p.out_shape, dtype=a.dtype)
    if out.size == 0:
        return out
    lib = load_library()
    handle = ctypes.c_void_p(cupy.cuda.device.get_cublas_handle())
    stream = ctypes.c_void_p(cupy.cuda.get_current_stream().ptr)
    _check(lib.cublasSetStream_v2(handle, stream), "cublasSetStream")
    _check(lib.cublasSetPointerMode_v2(handle, POINTER_MODE_HOST), "cublasSetPointerMode")
    dtype = CUDA_R_16F if a.dtype == np.float16 else CUDA_R_32F
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    size = a.dtype.itemsize
    for c in p.calls:
        _check(
            lib.cublasGemmStridedBatchedEx(
                handle,
                c.transa,
                c.transb,
                c.m,
                c.n,
                c.k,
                ctypes.byref(one),
                ctypes.c_void_p(b.data.ptr + c.a_offset * size),
                dtype,
                c.lda,
                c.stride_a,
                ctypes.c_void_p(a.data.ptr + c.b_offset * size),
                dtype,
                c.ldb,
                c.stride_b,
                ctypes.byref(zero),
                ctypes.c_void_p(out.data.ptr + c.c_offset * size),
                dtype,
                c.ldc,
                c.stride_c,
                c.count,
                COMPUTE_32F,
                GEMM_DEFAULT,
            ),
            "cublasGemmStridedBatchedEx",
        )
    return out
