"""Weighted building blocks over `layers`: conv, dense, transformer block, a ResNet-ish backbone.

Initialisation keeps activations near unit scale through depth (He for convs feeding a ReLU,
1/sqrt(fan_in) for dense layers, residual sums scaled by 1/sqrt(2)), so random weights stay far
from fp16 overflow on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from services.models import layers as L
from services.models.layers import Array, Init

_HALF_SQRT2 = 1.0 / math.sqrt(2.0)


class Conv:
    def __init__(
        self, init: Init, cin: int, cout: int, k: int, stride: int = 1, gain: float = 2.0
    ) -> None:
        self.w = init.normal((cout, cin, k, k), math.sqrt(gain / (cin * k * k)))
        self.b = init.zeros((cout,))
        self.stride, self.pad = stride, k // 2

    def __call__(self, x: Array) -> Array:
        return L.conv2d(x, self.w, self.b, self.stride, self.pad)


class Dense:
    def __init__(self, init: Init, din: int, dout: int, gain: float = 1.0) -> None:
        self.w = init.normal((din, dout), math.sqrt(gain / din))
        self.b = init.zeros((dout,))

    def __call__(self, x: Array) -> Array:
        return L.linear(x, self.w, self.b)


class Norm:
    def __init__(self, init: Init, d: int) -> None:
        self.gain = init.ones((d,), dtype=np.float32)
        self.bias = init.zeros((d,), dtype=np.float32)

    def __call__(self, x: Array) -> Array:
        return L.layer_norm(x, self.gain, self.bias)


class Attention:
    """Multi-head attention with its four projections, laid out for few kernels per call.

    Self-attention projects q, k and v with ONE GEMM ([q|k|v] weights side by side);
    cross-attention projects the context's k and v with one GEMM, once per query batch
    (`context`). The query weights carry the 1/sqrt(head width) scale, which saves a multiply
    per call and is exact when the head width is a power of 4 (16, 64, 256)."""

    def __init__(
        self, init: Init, d: int, heads: int, sharpness: float = 1.0, cross: bool = False
    ) -> None:
        # sharpness > 1 scales the query weights: random weights otherwise give near-uniform
        # attention that averages the context away
        q = Dense(init, d, d, gain=sharpness**2)
        k, v, self.o = (Dense(init, d, d) for _ in range(3))  # drawn in the same order as q
        xp, scale = init.xp, q.w.dtype.type(1.0 / math.sqrt(d // heads))
        self.heads, self.dh = heads, d // heads
        wq, bq = q.w * scale, q.b * scale
        if cross:
            self.wq, self.bq = wq, bq
            self.wkv, self.bkv = xp.concatenate([k.w, v.w], axis=1), xp.concatenate([k.b, v.b])
        else:
            self.wqkv = xp.concatenate([wq, k.w, v.w], axis=1)
            self.bqkv = xp.concatenate([bq, k.b, v.b])

    def __call__(self, x: Array, causal: bool = False) -> Array:
        """Self-attention over x (n, l, d)."""
        n, length, _ = x.shape
        qkv = L.linear(x, self.wqkv, self.bqkv).reshape(n, length, 3, self.heads, self.dh)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (n, heads, l, dh), views
        return self.o(L.merge_heads(L.attend(q, k.transpose(0, 1, 3, 2), v, causal)))

    def context(self, context: Array) -> tuple[Array, Array]:
        """A context (n, lc, d) -> its keys transposed (n, h, dh, lc) and values (n, h, lc, dh),
        contiguous, for `cross` to reuse on every call."""
        xp = L.namespace(context)
        n, length, _ = context.shape
        kv = L.linear(context, self.wkv, self.bkv).reshape(n, length, 2, self.heads, self.dh)
        return (
            xp.ascontiguousarray(kv[:, :, 0].transpose(0, 2, 3, 1)),
            xp.ascontiguousarray(kv[:, :, 1].transpose(0, 2, 1, 3)),
        )

    def cross(self, x: Array, context: tuple[Array, Array]) -> Array:
        """x (n, l, d) attends to a context prepared by `context`."""
        q = L.split_heads(L.linear(x, self.wq, self.bq), self.heads)
        return self.o(L.merge_heads(L.attend(q, *context)))

    def cache(self, n: int, length: int, dtype: np.dtype[np.generic]) -> tuple[Array, Array]:
        """Empty key and value caches (n, h, length, dh) for `step`."""
        xp = L.namespace(self.wqkv)
        shape = (n, self.heads, length, self.dh)
        return xp.zeros(shape, dtype=dtype), xp.zeros(shape, dtype=dtype)

    def step(self, x: Array, cache: tuple[Array, Array], t: int) -> Array:
        """Causal self-attention for ONE new position t, x (n, 1, d): its key and value go into
        the cache, and it attends to positions 0..t (the same result as the last row of
        `__call__(prefix, causal=True)`, without recomputing the prefix)."""
        n = x.shape[0]
        qkv = L.linear(x, self.wqkv, self.bqkv).reshape(n, 3, self.heads, self.dh)
        keys, values = cache
        keys[:, :, t] = qkv[:, 1]
        values[:, :, t] = qkv[:, 2]
        k, v = keys[:, :, : t + 1], values[:, :, : t + 1]
        out = L.attend(qkv[:, 0, :, None], k.transpose(0, 1, 3, 2), v)  # (n, h, 1, dh)
        return self.o(out.reshape(n, 1, self.heads * self.dh))


class TransformerBlock:
    """Pre-norm block: self-attention, optional cross-attention, GELU MLP."""

    def __init__(self, init: Init, d: int, heads: int, cross: bool = False, mlp: int = 4) -> None:
        self.n1, self.attn = Norm(init, d), Attention(init, d, heads)
        self.cross = (
            (Norm(init, d), Attention(init, d, heads, sharpness=4.0, cross=True)) if cross else None
        )
        self.n3, self.up, self.down = (
            Norm(init, d),
            Dense(init, d, mlp * d),
            Dense(init, mlp * d, d),
        )

    def __call__(
        self, x: Array, causal: bool = False, context: tuple[Array, Array] | None = None
    ) -> Array:
        """x (n, l, d); `context` from `self.context(features)` for a cross-attention block."""
        return self._cross_mlp(x + self.attn(self.n1(x), causal=causal), context)

    def context(self, features: Array) -> tuple[Array, Array]:
        """The cross-attention keys and values of `features`, computed once per query batch."""
        if self.cross is None:
            raise ValueError("block has no cross-attention")
        norm, cross = self.cross
        return cross.context(norm(features))

    def step(
        self,
        x: Array,
        cache: tuple[Array, Array],
        t: int,
        context: tuple[Array, Array] | None = None,
    ) -> Array:
        """One greedy-decoding position x (n, 1, d) at index t, with the self-attention cache."""
        return self._cross_mlp(x + self.attn.step(self.n1(x), cache, t), context)

    def _cross_mlp(self, x: Array, context: tuple[Array, Array] | None) -> Array:
        if self.cross is not None:
            if context is None:
                raise ValueError("cross-attention block called without a context")
            norm, cross = self.cross
            x = x + cross.cross(norm(x), context)
        return x + self.down(L.gelu(self.up(self.n3(x))))


class ResBlock:
    """Basic residual block (two 3×3 convs), projection shortcut when the shape changes."""

    def __init__(self, init: Init, cin: int, cout: int, stride: int) -> None:
        self.c1, self.c2 = Conv(init, cin, cout, 3, stride), Conv(init, cout, cout, 3, 1, gain=1.0)
        self.skip = (
            Conv(init, cin, cout, 1, stride, gain=1.0) if (cin, stride) != (cout, 1) else None
        )

    def __call__(self, x: Array) -> Array:
        y = self.c2(L.relu(self.c1(x)))
        s = x if self.skip is None else self.skip(x)
        return L.relu((y + s) * y.dtype.type(_HALF_SQRT2))


class ResNet:
    """Stem conv (+ optional 3×3/2 max-pool), then stages of residual blocks, each but the first
    halving the resolution. (n, cin, h, w) -> (n, channels[-1], h/stride, w/stride)."""

    def __init__(
        self,
        init: Init,
        cin: int,
        channels: Sequence[int],
        blocks: int = 1,
        stem_kernel: int = 3,
        stem_stride: int = 2,
        stem_pool: bool = False,
    ) -> None:
        self.stem = Conv(init, cin, channels[0], stem_kernel, stem_stride)
        self.pool = stem_pool
        self.blocks: list[ResBlock] = []
        prev = channels[0]
        for i, c in enumerate(channels):
            for b in range(blocks):
                self.blocks.append(ResBlock(init, prev, c, 2 if i > 0 and b == 0 else 1))
                prev = c
        self.stride = stem_stride * (2 if stem_pool else 1) * 2 ** (len(channels) - 1)
        self.out_channels = prev

    def __call__(self, x: Array) -> Array:
        x = L.relu(self.stem(x))
        if self.pool:
            x = L.max_pool2d(x, 3, 2, 1)
        for block in self.blocks:
            x = block(x)
        return x

    def out_size(self, size: int) -> int:
        """Spatial size of the output for an input side of `size` (padding 'same' everywhere)."""
        k = int(self.stem.w.shape[2])
        s = (size + 2 * self.stem.pad - k) // self.stem.stride + 1
        if self.pool:
            s = (s - 1) // 2 + 1
        for block in self.blocks:
            s = (s - 1) // block.c1.stride + 1
        return s


class ImageStats:
    """ImageNet mean and std per channel, shaped (3, 1, 1) so they broadcast over (..., 3, h, w);
    made once per model on its device, so a forward copies nothing from the host."""

    def __init__(self, init: Init) -> None:
        self.mean = init.host(np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1), np.float32)
        self.std = init.host(np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1), np.float32)

    def normalise(self, pixels: Array, dtype: np.dtype[np.generic]) -> Array:
        """fp32 pixels in 0..255, channels third from last -> normalised, in `dtype`."""
        return ((pixels / np.float32(255.0) - self.mean) / self.std).astype(dtype)


def image_to_float(frames: Array, dtype: np.dtype[np.generic], stats: ImageStats) -> Array:
    """uint8 (n, h, w, 3) -> normalised float (n, 3, h, w) with ImageNet mean and std."""
    return stats.normalise(frames.transpose(0, 3, 1, 2).astype(np.float32), dtype)
