"""A batched matrix multiply that a CUDA graph can capture, for graph-safe models on CuPy.

CuPy refuses every cuBLAS call while a stream is capturing (`cublas.setStream` raises
"calling cuBLAS API during stream capture is currently unsupported"), so a captured model cannot
use `@`. This kernel stands in for it: one thread per output element, fp32 accumulation, any
strides (transposed and broadcast views need no copy), fp16 converted with the PTX `cvt`
instructions so that no CUDA header is needed at compile time. It is built for the decoding step's
shapes (a handful of rows against weights read from L2), not for large GEMMs: the encoder keeps
cuBLAS and runs eagerly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.models.operands import operands

_SOURCE = r"""
__device__ __forceinline__ float load(const unsigned short* p, long long i) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i])); return f;
}
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ void store(unsigned short* p, long long i, float v) {
  unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); p[i] = h;
}
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }

// c[z0, z1, i, j] = sum_t a[z0, z1, i, t] * b[z0, z1, t, j]; c is contiguous (B0, B1, m, n),
// a and b are addressed through element strides (0 for a broadcast dimension).
template <typename T>
__device__ void bmm(const T* a, const T* b, T* c, int m, int n, int k, int b1,
                    long long sa0, long long sa1, long long sam, long long sak,
                    long long sb0, long long sb1, long long sbk, long long sbn) {
  int j = blockIdx.x * blockDim.x + threadIdx.x;
  int i = blockIdx.y;
  int z = blockIdx.z;
  if (j >= n) return;
  int z0 = z / b1, z1 = z % b1;
  const T* ap = a + z0 * sa0 + z1 * sa1 + i * sam;
  const T* bp = b + z0 * sb0 + z1 * sb1 + j * sbn;
  float acc = 0.f;
  for (int t = 0; t < k; ++t) acc += load(ap, t * sak) * load(bp, t * sbk);
  store(c, ((long long)z * m + i) * n + j, acc);
}

#define BMM_ARGS int m, int n, int k, int b1, long long sa0, long long sa1, long long sam, \
  long long sak, long long sb0, long long sb1, long long sbk, long long sbn
#define BMM_PASS m, n, k, b1, sa0, sa1, sam, sak, sb0, sb1, sbk, sbn

extern "C" __global__ void bmm_f16(const unsigned short* a, const unsigned short* b,
                                   unsigned short* c, BMM_ARGS) {
  bmm<unsigned short>(a, b, c, BMM_PASS);
}
extern "C" __global__ void bmm_f32(const float* a, const float* b, float* c, BMM_ARGS) {
  bmm<float>(a, b, c, BMM_PASS);
}
"""

THREADS = 128
_module: Any = None


def _kernel(dtype: np.dtype[Any]) -> Any:
    global _module
    import cupy

    if _module is None:
        _module = cupy.RawModule(code=_SOURCE, options=("--std=c++14",))
    return _module.get_function("bmm_f16" if dtype == np.float16 else "bmm_f32")


@dataclass(frozen=True)
class Plan:
    """How `bmm` launches for two operands: the output shape, the grid and every argument after
    the three pointers, exactly as the kernel reads them (strides in elements)."""

    out_shape: tuple[int, ...]
    grid: tuple[int, int, int]
    m: int
    n: int
    k: int
    b1: int
    a_strides: tuple[int, int, int, int]  # batch 0, batch 1, row, column
    b_strides: tuple[int, int, int, int]


def plan(
    a_shape: tuple[int, ...],
    a_strides: tuple[int, ...],
    b_shape: tuple[int, ...],
    b_strides: tuple[int, ...],
    itemsize: int,
) -> Plan:
    """The launch for `a @ b` (services/models/operands.py's rules; strides in bytes as numpy
    and CuPy give them). ValueError if it cannot run."""
    o = operands(a_shape, a_strides, b_shape, b_strides, itemsize)
    if o.m > 65535 or o.b0 * o.b1 > 65535:
        raise ValueError(f"bmm grid too large for shapes {a_shape} @ {b_shape}")
    return Plan(
        out_shape=o.out_shape,
        grid=(math.ceil(o.n / THREADS), o.m, o.b0 * o.b1),
        m=o.m,
        n=o.n,
        k=o.k,
        b1=o.b1,
        a_strides=(*o.a_batch, *o.a_matrix),
        b_strides=(*o.b_batch, *o.b_matrix),
    )


def bmm(a: Any, b: Any) -> Any:
    """`a @ b` for CuPy arrays of float16 or float32 (numpy matmul rules for 2-D and batched
    operands, at most two batch dimensions after broadcasting); no cuBLAS."""
    import cupy

    if a.dtype != b.dtype or a.dtype not in (np.float16, np.float32):
        raise TypeError(f"bmm needs two float16 or two float32 operands, got {a.dtype}, {b.dtype}")
    p = plan(a.shape, a.strides, b.shape, b.strides, a.dtype.itemsize)
    out = cupy.empty(p.out_shape, dtype=a.dtype)
    if out.size == 0:
        return out
    i32, i64 = np.int32, np.int64
    args = (i32(p.m), i32(p.n), i32(p.k), i32(p.b1))
    strides = tuple(i64(s) for s in (*p.a_strides, *p.b_strides))
    _kernel(a.dtype)(p.grid, (THREADS,), (a, b, out, *args, *strides))
    return out
