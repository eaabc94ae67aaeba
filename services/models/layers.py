"""The reference layers, written once against the array namespace (NumPy or CuPy).

Every function takes arrays of one backend and finds its namespace from them, so the same code
runs on the host and on the GPU. Convolutions are im2col + one batched GEMM per chunk of the
batch; reductions that lose precision in fp16 (layer norm, softmax) run in fp32 and cast back.

Weights come from `Init`: drawn on the host by `np.random.default_rng` from (seed, model name),
then moved to the backend in the compute dtype, so both backends see identical weights.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from types import ModuleType
from typing import Any

import numpy as np

from services.stage.plugin import ModelContext

Array = Any

# im2col is chunked over the batch so that one chunk's columns stay under this many bytes.
MAX_COLS_BYTES = 256 << 20
# A convolution whose output has at least this many pixels per image multiplies image by image:
# one such GEMM (here 16k-65k columns) fills the GPU alone, so batching them saves nothing, and
# the batched form (cublasGemmStridedBatchedEx, weights broadcast, 8 images of 65,536 columns)
# killed the process with SIGFPE inside cuBLAS at 8-9% MPS shares on the H100, while the same GEMM
# one image at a time ran at every share (docs/results/peak-load.md).
PER_IMAGE_PIXELS = 16384


def namespace(a: Array) -> ModuleType:
    """NumPy or CuPy, whichever `a` belongs to (CuPy is imported only for its own arrays)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy  # type: ignore[no-any-return]
    return np


class Init:
    """Seeded weights for one model: host draws in a fixed order, then moved to `ctx.xp`."""

    def __init__(self, ctx: ModelContext, name: str) -> None:
        self.xp = ctx.xp
        self.dtype = np.dtype(ctx.compute_dtype)
        self.rng = np.random.default_rng([ctx.seed, zlib.crc32(name.encode())])

    def normal(self, shape: Sequence[int], std: float) -> Array:
        host = self.rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(std)
        return self.xp.asarray(host.astype(self.dtype))

    def zeros(self, shape: Sequence[int], dtype: Any = None) -> Array:
        return self.xp.zeros(tuple(shape), dtype=dtype or self.dtype)

    def ones(self, shape: Sequence[int], dtype: Any = None) -> Array:
        return self.xp.ones(tuple(shape), dtype=dtype or self.dtype)

    def host(self, array: np.ndarray, dtype: Any = None) -> Array:
        """A host-computed constant (filterbank, window, positions) on the backend."""
        return self.xp.asarray(np.asarray(array).astype(dtype or self.dtype))


# ---- activations --------------------------------------------------------------------------


def relu(x: Array) -> Array:
    return namespace(x).maximum(x, 0)


def gelu(x: Array) -> Array:
    """tanh approximation (as in GPT-2 and BERT)."""
    xp = namespace(x)
    c = x.dtype.type(math.sqrt(2.0 / math.pi))
    return x * x.dtype.type(0.5) * (1 + xp.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


def softmax(x: Array, axis: int = -1) -> Array:
    """Softmax computed in fp32 whatever the input dtype; returns the input dtype."""
    xp = namespace(x)
    x32 = x.astype(np.float32, copy=False)  # no copy (no kernel) when already fp32
    e = xp.exp(x32 - x32.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype, copy=False)


# ---- dense layers ---------------------------------------------------------------------------

# The matrix multiply every layer uses: `@` unless a graph-safe model's forward installs one that
# CUDA graph capture accepts (services/models/graphs.py: capturable_matmul).
_MATMUL: ContextVar[Callable[[Array, Array], Array] | None] = ContextVar("matmul", default=None)


def matmul(a: Array, b: Array) -> Array:
    mm = _MATMUL.get()
    return a @ b if mm is None else mm(a, b)


@contextlib.contextmanager
def matmul_with(mm: Callable[[Array, Array], Array] | None) -> Iterator[None]:
    """Within the block (on this thread), `matmul` is `mm` (None: `@`)."""
    token = _MATMUL.set(mm)
    try:
        yield
    finally:
        _MATMUL.reset(token)


def linear(x: Array, w: Array, b: Array | None = None) -> Array:
    """x (..., din) @ w (din, dout) + b."""
    y = matmul(x, w)
    return y if b is None else y + b


def layer_norm(x: Array, gain: Array, bias: Array, eps: float = 1e-5) -> Array:
    xp = namespace(x)
    x32 = x.astype(np.float32, copy=False)
    centred = x32 - x32.mean(axis=-1, keepdims=True)
    var = (centred * centred).mean(axis=-1, keepdims=True)
    y = centred / xp.sqrt(var + np.float32(eps)) * gain + bias
    return y.astype(x.dtype, copy=False)


def embedding(ids: Array, table: Array) -> Array:
    """Rows of `table` for integer `ids`; out-of-range ids are clipped (no device sync to check)."""
    xp = namespace(table)
    return table[xp.clip(ids, 0, table.shape[0] - 1)]


def attention(q: Array, k: Array, v: Array, heads: int, causal: bool = False) -> Array:
    """Multi-head scaled dot-product attention: q (n, lq, d), k and v (n, lk, d) -> (n, lq, d).

    With `causal`, query i sees keys j <= i + (lk - lq) (the last lq positions of the keys).
    """
    d = q.shape[2]
    if d % heads:
        raise ValueError(f"width {d} is not divisible by {heads} heads")
    dh = d // heads
    qh = split_heads(q * q.dtype.type(1.0 / math.sqrt(dh)), heads)
    kt = split_heads(k, heads).transpose(0, 1, 3, 2)
    return merge_heads(attend(qh, kt, split_heads(v, heads), causal))


def split_heads(t: Array, heads: int) -> Array:
    """(n, l, d) -> (n, heads, l, d / heads), a view."""
    n, length, d = t.shape
    return t.reshape(n, length, heads, d // heads).transpose(0, 2, 1, 3)


def merge_heads(t: Array) -> Array:
    """(n, heads, l, dh) -> (n, l, heads * dh); a view when l == 1 (one decoding step)."""
    n, h, length, dh = t.shape
    return t.transpose(0, 2, 1, 3).reshape(n, length, h * dh)


def attend(qh: Array, kt: Array, vh: Array, causal: bool = False) -> Array:
    """The attention core on split heads: qh (n, h, lq, dh) already scaled, kt (n, h, dh, lk)
    (keys transposed), vh (n, h, lk, dh) -> (n, h, lq, dh). `causal` as in `attention`."""
    scores = matmul(qh, kt)  # (n, h, lq, lk)
    if causal:
        xp = namespace(qh)
        lq, lk = scores.shape[-2:]
        allowed = xp.arange(lk)[None, :] <= xp.arange(lq)[:, None] + (lk - lq)
        scores = xp.where(allowed, scores, scores.dtype.type(-np.inf))
    return matmul(softmax(scores, axis=-1), vh)


def top_k(x: Array, k: int) -> Array:
    """Indices of the k largest entries along the last axis of (n, c), largest first, ties to
    the lower index: `argsort(-x, kind="stable")[:, :k]`, computed from pairwise ranks with no
    sort and no data-dependent shape, so CUDA graph capture accepts it (CuPy's sorts run on
    Thrust, which synchronizes with the host). O(c²) work and memory per row: for c in the
    hundreds, as a detector's cell grid."""
    xp = namespace(x)
    n, c = x.shape
    if not 0 < k <= c:
        raise ValueError(f"top_k needs 0 < k <= {c}, got {k}")
    idx = xp.arange(c)
    ahead = (x[:, None, :] > x[:, :, None]) | (
        (x[:, None, :] == x[:, :, None]) & (idx[None, :] < idx[:, None])[None]
    )
    rank = ahead.sum(axis=2)  # (n, c): how many entries come before each one
    # each entry goes to its rank; those ranked k or later all land in a spare column k
    out = xp.zeros((n, k + 1), dtype=np.int64)
    rows = xp.broadcast_to(xp.arange(n)[:, None], (n, c))
    out[rows, xp.minimum(rank, k)] = xp.broadcast_to(idx[None, :], (n, c))
    return out[:, :k].copy()


# ---- convolution and pooling (NCHW) --------------------------------------------------------


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def im2col(x: Array, kh: int, kw: int, stride: int, pad: int) -> Array:
    """(n, c, h, w) -> (n, c*kh*kw, ho*wo), column order (c, i, j) to match w.reshape(cout, -1)."""
    xp = namespace(x)
    n, c, h, w = x.shape
    ho, wo = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    if pad:
        x = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = xp.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
    return cols.reshape(n, c * kh * kw, ho * wo)


def conv2d(x: Array, w: Array, b: Array | None = None, stride: int = 1, pad: int = 0) -> Array:
    """x (n, cin, h, w) * w (cout, cin, kh, kw) -> (n, cout, ho, wo), via im2col + GEMM."""
    xp = namespace(x)
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    ho, wo = _out_size(h, kh, stride, pad), _out_size(wd, kw, stride, pad)
    wmat = w.reshape(cout, cin * kh * kw)
    if kh == kw == 1 and pad == 0:
        xs = x[:, :, ::stride, ::stride] if stride > 1 else x
        y = matmul(wmat, xs.reshape(n, cin, ho * wo))
    else:
        per_item = cin * kh * kw * ho * wo * x.dtype.itemsize
        chunk = max(1, MAX_COLS_BYTES // max(per_item, 1))
        per_image = ho * wo >= PER_IMAGE_PIXELS
        if n <= chunk and not (per_image and n > 1):
            y = matmul(wmat, im2col(x, kh, kw, stride, pad))
        else:
            # filled slice by slice: concatenating many parts would copy a pointer table to the
            # GPU, which a CUDA graph capture refuses
            y = xp.empty((n, cout, ho * wo), dtype=x.dtype)
            for s in range(0, n, chunk):
                cols = im2col(x[s : s + chunk], kh, kw, stride, pad)
                if per_image:
                    for i in range(cols.shape[0]):
                        y[s + i] = matmul(wmat, cols[i])
                else:
                    y[s : s + cols.shape[0]] = matmul(wmat, cols)
    y = y.reshape(n, cout, ho, wo)
    return y if b is None else y + b.reshape(1, cout, 1, 1)


def _pool(x: Array, k: int, stride: int, pad: int, op: str) -> Array:
    xp = namespace(x)
    n, c, h, w = x.shape
    ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
    if pad:
        fill = -np.inf if op == "max" else 0
        x = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    out = None
    for i in range(k):
        for j in range(k):
            win = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            if out is None:
                out = win.astype(np.float32) if op == "avg" else win.copy()
            elif op == "max":
                out = xp.maximum(out, win)
            else:
                out = out + win
    assert out is not None
    if op == "avg":
        out = (out / np.float32(k * k)).astype(x.dtype)  # padding counts, as count_include_pad
    return out


def max_pool2d(x: Array, k: int, stride: int | None = None, pad: int = 0) -> Array:
    return _pool(x, k, stride or k, pad, "max")


def avg_pool2d(x: Array, k: int, stride: int | None = None, pad: int = 0) -> Array:
    return _pool(x, k, stride or k, pad, "avg")


def global_avg_pool(x: Array) -> Array:
    """(n, c, h, w) -> (n, c), summed in fp32."""
    return x.astype(np.float32).mean(axis=(2, 3)).astype(x.dtype)


# ---- resampling (NCHW) ---------------------------------------------------------------------


def upsample_nearest2x(x: Array) -> Array:
    n, c, h, w = x.shape
    xp = namespace(x)
    y = xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, 2, w, 2))
    return y.reshape(n, c, 2 * h, 2 * w)


def _bilinear2x_axis(x: Array, axis: int) -> Array:
    """×2 along one axis with half-pixel centres (align_corners=False), edges clamped."""
    xp = namespace(x)
    size = x.shape[axis]
    idx = xp.arange(size)
    prev = xp.take(x, xp.maximum(idx - 1, 0), axis=axis)
    nxt = xp.take(x, xp.minimum(idx + 1, size - 1), axis=axis)
    q, t = x.dtype.type(0.25), x.dtype.type(0.75)
    even, odd = q * prev + t * x, t * x + q * nxt
    out = xp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * size
    return out.reshape(shape)


def upsample_bilinear2x(x: Array) -> Array:
    return _bilinear2x_axis(_bilinear2x_axis(x, 2), 3)


def _bilinear_weights(xp: ModuleType, out: int, size: int) -> tuple[Array, Array, Array]:
    scale = size / out
    src = xp.maximum((xp.arange(out, dtype=np.float32) + 0.5) * np.float32(scale) - 0.5, 0)
    i0 = xp.minimum(xp.floor(src).astype(np.int64), size - 1)
    i1 = xp.minimum(i0 + 1, size - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: Array, out_h: int, out_w: int, dtype: Any = None) -> Array:
    """(n, c, h, w) -> (n, c, out_h, out_w), half-pixel centres, computed in fp32; returned in
    `dtype` (default x's). Rows are gathered before the cast to fp32, so a large uint8 frame is
    never converted whole."""
    xp = namespace(x)
    y0, y1, fy = _bilinear_weights(xp, out_h, x.shape[2])
    x0, x1, fx = _bilinear_weights(xp, out_w, x.shape[3])
    fy = fy[:, None]
    f32 = np.float32
    rows = x[:, :, y0, :].astype(f32) * (1 - fy) + x[:, :, y1, :].astype(f32) * fy
    out = rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx
    return out.astype(dtype or x.dtype, copy=False)


def sinusoidal_positions(length: int, d: int) -> np.ndarray:
    """(length, d) host table of the usual sin/cos position encoding."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    rate = np.exp(-math.log(10000.0) * np.arange(0, d, 2, dtype=np.float64) / d)
    table = np.zeros((length, d), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * rate)
    table[:, 1::2] = np.cos(pos * rate)[:, : d // 2]
    return table.astype(np.float32)
