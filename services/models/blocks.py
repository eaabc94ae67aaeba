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
    """Multi-head attention with its four projections; keys/values may come from a context."""

    def __init__(self, init: Init, d: int, heads: int, sharpness: float = 1.0) -> None:
        # sharpness > 1 scales the query weights: random weights otherwise give near-uniform
        # attention that averages the context away
        self.q = Dense(init, d, d, gain=sharpness**2)
        self.k, self.v, self.o = (Dense(init, d, d) for _ in range(3))
        self.heads = heads

    def kv(self, context: Array) -> tuple[Array, Array]:
        return self.k(context), self.v(context)

    def __call__(
        self, x: Array, kv: tuple[Array, Array] | None = None, causal: bool = False
    ) -> Array:
        k, v = kv if kv is not None else self.kv(x)
        return self.o(L.attention(self.q(x), k, v, self.heads, causal))


class TransformerBlock:
    """Pre-norm block: self-attention, optional cross-attention, GELU MLP."""

    def __init__(self, init: Init, d: int, heads: int, cross: bool = False, mlp: int = 4) -> None:
        self.n1, self.attn = Norm(init, d), Attention(init, d, heads)
        self.cross = (Norm(init, d), Attention(init, d, heads, sharpness=4.0)) if cross else None
        self.n3, self.up, self.down = (
            Norm(init, d),
            Dense(init, d, mlp * d),
            Dense(init, mlp * d, d),
        )

    def __call__(
        self, x: Array, causal: bool = False, context_kv: tuple[Array, Array] | None = None
    ) -> Array:
        x = x + self.attn(self.n1(x), causal=causal)
        if self.cross is not None:
            if context_kv is None:
                raise ValueError("cross-attention block called without a context")
            norm, cross = self.cross
            x = x + cross(norm(x), kv=context_kv)
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


def image_to_float(frames: Array, dtype: np.dtype[np.generic]) -> Array:
    """uint8 (n, h, w, 3) -> normalised float (n, 3, h, w) with ImageNet mean and std."""
    xp = L.namespace(frames)
    mean = xp.asarray(np.array([0.485, 0.456, 0.406], dtype=np.float32)).reshape(1, 3, 1, 1)
    std = xp.asarray(np.array([0.229, 0.224, 0.225], dtype=np.float32)).reshape(1, 3, 1, 1)
    x = frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return ((x - mean) / std).astype(dtype)
