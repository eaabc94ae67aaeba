"""img-to-text: preprocess -> CNN encoder -> greedy transformer caption decoder.

image uint8 (H, W, 3) -> preprocess -> image (3, S, S) -> encoder -> features (T, d)
                      -> decoder -> tokens int32 (max_len,)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from services.models import layers as L
from services.models.base import ReferenceModel, divisible, positive, spec
from services.models.base import channels as channel_list
from services.models.blocks import (
    Dense,
    ImageStats,
    Norm,
    ResNet,
    TransformerBlock,
    image_to_float,
)
from services.stage.plugin import ModelContext

BOS = 1


class Preprocess(ReferenceModel):
    """uint8 HWC image -> normalised float CHW, bilinear resize to out_size × out_size."""

    graph_safe = True

    def __init__(self, ctx: ModelContext, in_size: Sequence[int], out_size: int) -> None:
        super().__init__(ctx, "img-to-text/preprocess")
        h, w = (positive("in_size", v) for v in in_size)
        self.out_size = positive("out_size", out_size)
        self.stats = ImageStats(self.init)
        self.inputs = [spec("image", np.uint8, (h, w, 3))]
        self.outputs = [spec("image", self.dtype, (3, out_size, out_size))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        x = image_to_float(batch["image"], np.dtype(np.float32), self.stats)
        x = L.resize_bilinear(x, self.out_size, self.out_size)
        return {"image": x.astype(self.dtype)}


class Encoder(ReferenceModel):
    """ResNet-ish backbone; the final feature map's cells become tokens projected to d_model.
    Graph-safe: im2col copies, GEMMs and elementwise kernels, no host reads."""

    graph_safe = True

    def __init__(
        self,
        ctx: ModelContext,
        image_size: int,
        widths: Sequence[int],
        blocks: int,
        stem_kernel: int,
        stem_stride: int,
        stem_pool: bool,
        d_model: int,
    ) -> None:
        super().__init__(ctx, "img-to-text/encoder")
        self.net = ResNet(self.init, 3, widths, blocks, stem_kernel, stem_stride, stem_pool)
        self.proj, self.norm = (
            Dense(self.init, self.net.out_channels, d_model),
            Norm(self.init, d_model),
        )
        side = self.net.out_size(image_size)
        self.inputs = [spec("image", self.dtype, (3, image_size, image_size))]
        self.outputs = [spec("features", self.dtype, (side * side, d_model))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        fmap = self.net(batch["image"])
        n, c = fmap.shape[:2]
        tokens = self.proj(fmap.reshape(n, c, -1).transpose(0, 2, 1))
        # centred over the image's tokens so the decoder sees what differs between regions,
        # not the common mode of random ReLU features
        tokens = tokens - tokens.astype(np.float32).mean(axis=1, keepdims=True).astype(self.dtype)
        return {"features": self.norm(tokens)}


class Decoder(ReferenceModel):
    """Greedy decoding of max_len tokens from BOS, cross-attending to the image features.

    Built to launch few kernels per step (on a GPU each step is launch-bound, not FLOP-bound):
    the features' cross-attention keys and values are computed once per query batch, each
    self-attention layer keeps a key/value cache and computes only the new position, q/k/v come
    from one GEMM, and the argmax stays on the device (written straight into the token buffer),
    so the loop never waits on the host. That makes it graph-safe: on CUDA the whole decode of a
    batch is one CUDA graph launch instead of ~2,700 kernel launches from Python."""

    graph_safe = True

    def __init__(
        self,
        ctx: ModelContext,
        context_tokens: int,
        d_model: int,
        heads: int,
        layers: int,
        vocab: int,
        max_len: int,
    ) -> None:
        super().__init__(ctx, "img-to-text/decoder")
        divisible(d_model, heads)
        self.max_len, self.bos = max_len, min(BOS, vocab - 1)
        self.embed = self.init.normal((vocab, d_model), 1.0)
        self.pos = self.init.host(L.sinusoidal_positions(max_len + 1, d_model))
        self.blocks = [
            TransformerBlock(self.init, d_model, heads, cross=True) for _ in range(layers)
        ]
        self.norm, self.head = Norm(self.init, d_model), Dense(self.init, d_model, vocab)
        self.inputs = [spec("features", self.dtype, (context_tokens, d_model))]
        self.outputs = [spec("tokens", np.int32, (max_len,))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        xp = self.xp
        features = batch["features"]
        n = features.shape[0]
        contexts = [block.context(features) for block in self.blocks]
        caches = [block.attn.cache(n, self.max_len, self.dtype) for block in self.blocks]
        # row t holds every query's token at position t; int64 so argmax can write it in place
        seq = xp.empty((self.max_len + 1, n), dtype=np.int64)
        seq[0] = self.bos
        for t in range(self.max_len):
            x = (self.embed[seq[t]] + self.pos[t])[:, None]  # (n, 1, d)
            for block, cache, context in zip(self.blocks, caches, contexts, strict=True):
                x = block.step(x, cache, t, context)
            logits = self.head(self.norm(x[:, 0]))
            xp.argmax(logits, axis=-1, out=seq[t + 1])
        return {"tokens": xp.ascontiguousarray(seq[1:].T).astype(np.int32)}


def preprocess(
    ctx: ModelContext, in_size: Sequence[int] = (40, 40), out_size: int = 32
) -> Preprocess:
    return Preprocess(ctx, in_size, out_size)


def encoder(
    ctx: ModelContext,
    image_size: int = 32,
    channels: Sequence[int] = (8, 16),
    blocks: int = 1,
    stem_kernel: int = 3,
    stem_stride: int = 2,
    stem_pool: bool = False,
    d_model: int = 32,
) -> Encoder:
    return Encoder(
        ctx,
        positive("image_size", image_size),
        channel_list("channels", channels),
        positive("blocks", blocks),
        positive("stem_kernel", stem_kernel),
        positive("stem_stride", stem_stride),
        bool(stem_pool),
        positive("d_model", d_model),
    )


def decoder(
    ctx: ModelContext,
    context_tokens: int = 64,
    d_model: int = 32,
    heads: int = 2,
    layers: int = 1,
    vocab: int = 64,
    max_len: int = 8,
) -> Decoder:
    return Decoder(
        ctx,
        positive("context_tokens", context_tokens),
        positive("d_model", d_model),
        positive("heads", heads),
        positive("layers", layers),
        positive("vocab", vocab),
        positive("max_len", max_len),
    )
