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
from typing import Any

import numpy as np

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


def bmm(a: Any, b: Any) -> Any:
    """`a @ b` for CuPy arrays of float16 or float32 (numpy matmul rules for 2-D and batched
    operands, at most two batch dimensions after broadcasting); no cuBLAS."""
    import cupy

    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"bmm needs matrices, got shapes {a.shape} and {b.shape}")
    if a.dtype != b.dtype or a.dtype not in (np.float16, np.float32):
        raise TypeError(f"bmm needs two float16 or two float32 operands, got {a.dtype}, {b.dtype}")
    m, k = a.shape[-2:]
    k2, n = b.shape[-2:]
    if k != k2:
        raise ValueError(f"bmm shapes {a.shape} and {b.shape} do not align")
    batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    if len(batch) > 2:
        raise ValueError(f"bmm supports at most two batch dimensions, got {batch}")
    a = cupy.broadcast_to(a, (*batch, m, k))
    b = cupy.broadcast_to(b, (*batch, k, n))
    out = cupy.empty((*batch, m, n), dtype=a.dtype)
    if out.size == 0:
        return out
    size = a.dtype.itemsize
    sa = [s // size for s in a.strides]
    sb = [s // size for s in b.strides]
    if min(*sa, *sb) < 0:
        raise ValueError("bmm does not take negative strides")
    if m > 65535 or math.prod(batch) > 65535:
        raise ValueError(f"bmm grid too large for shapes {a.shape} @ {b.shape}")
    pad = 2 - len(batch)
    b0, b1 = (1,) * pad + batch
    sa0, sa1 = [0] * pad + sa[:-2]
    sb0, sb1 = [0] * pad + sb[:-2]
    grid = (math.ceil(n / THREADS), m, b0 * b1)
    i32, i64 = np.int32, np.int64
    _kernel(a.dtype)(
        grid,
        (THREADS,),
        (
            a,
            b,
            out,
            i32(m),
            i32(n),
            i32(k),
            i32(b1),
            i64(sa0),
            i64(sa1),
            i64(sa[-2]),
            i64(sa[-1]),
            i64(sb0),
            i64(sb1),
            i64(sb[-2]),
            i64(sb[-1]),
        ),
    )
    return out
