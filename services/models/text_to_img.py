"""text-to-img: text encoder -> image generator -> ×2 super-resolution.

tokens int32 (L,) -> text_encoder -> text (L, d) -> generator -> image (3, S, S) in [-1, 1]
                  -> super_resolution -> image uint8 (2S, 2S, 3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from services.models import layers as L
from services.models.base import ReferenceModel, divisible, positive, spec
from services.models.base import channels as channel_list
from services.models.blocks import Conv, Dense, Norm, TransformerBlock
from services.stage.plugin import ModelContext


class TextEncoder(ReferenceModel):
    """Token embeddings + positions -> bidirectional transformer -> final layer norm."""

    graph_safe = True

    def __init__(
        self, ctx: ModelContext, length: int, vocab: int, d_model: int, heads: int, layers: int
    ) -> None:
        super().__init__(ctx, "text-to-img/text-encoder")
        divisible(d_model, heads)
        self.embed = self.init.normal((vocab, d_model), 1.0)
        self.pos = self.init.host(L.sinusoidal_positions(length, d_model))
        self.blocks = [TransformerBlock(self.init, d_model, heads) for _ in range(layers)]
        self.norm = Norm(self.init, d_model)
        self.inputs = [spec("tokens", np.int32, (length,))]
        self.outputs = [spec("text", self.dtype, (length, d_model))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        x = L.embedding(batch["tokens"], self.embed) + self.pos
        for block in self.blocks:
            x = block(x)
        return {"text": self.norm(x)}


class Generator(ReferenceModel):
    """Pooled text -> latent grid -> [nearest ×2, conv 3×3, ReLU] per width -> RGB via tanh.

    Each up-block also gets a per-channel bias projected from the pooled text (conditioning)."""

    graph_safe = True

    def __init__(
        self,
        ctx: ModelContext,
        length: int,
        d_model: int,
        base: int,
        widths: Sequence[int],
    ) -> None:
        super().__init__(ctx, "text-to-img/generator")
        self.base, self.c0 = base, widths[0]
        self.latent = Dense(self.init, d_model, widths[0] * base * base)
        self.ups = [
            (Conv(self.init, cin, cout, 3), Dense(self.init, d_model, cout, gain=0.1))
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        ]
        self.rgb = Conv(self.init, widths[-1], 3, 3, gain=1.0)
        side = base * 2 ** (len(widths) - 1)
        self.inputs = [spec("text", self.dtype, (length, d_model))]
        self.outputs = [spec("image", self.dtype, (3, side, side))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        text = batch["text"]
        pooled = text.astype(np.float32).mean(axis=1).astype(self.dtype)
        x = L.relu(self.latent(pooled)).reshape(-1, self.c0, self.base, self.base)
        for conv, cond in self.ups:
            x = L.relu(conv(L.upsample_nearest2x(x)) + cond(pooled)[:, :, None, None])
        return {"image": self.xp.tanh(self.rgb(x))}


class SuperResolution(ReferenceModel):
    """conv -> bilinear ×2 -> conv -> conv to RGB, added to the bilinear ×2 of the input;
    quantised to uint8 HWC."""

    graph_safe = True

    def __init__(self, ctx: ModelContext, size: int, width: int) -> None:
        super().__init__(ctx, "text-to-img/super-resolution")
        self.c1 = Conv(self.init, 3, width, 3)
        self.c2 = Conv(self.init, width, width, 3)
        self.c3 = Conv(self.init, width, 3, 3, gain=0.1)
        self.inputs = [spec("image", self.dtype, (3, size, size))]
        self.outputs = [spec("image", np.uint8, (2 * size, 2 * size, 3))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        xp = self.xp
        x = batch["image"]
        y = L.upsample_bilinear2x(L.relu(self.c1(x)))
        y = self.c3(L.relu(self.c2(y))) + L.upsample_bilinear2x(x)
        pixels = (y.astype(np.float32) + 1) * np.float32(127.5)
        image = xp.rint(xp.clip(pixels, 0, 255)).astype(np.uint8)
        return {"image": image.transpose(0, 2, 3, 1)}


def text_encoder(
    ctx: ModelContext,
    length: int = 8,
    vocab: int = 128,
    d_model: int = 32,
    heads: int = 2,
    layers: int = 1,
) -> TextEncoder:
    return TextEncoder(
        ctx,
        positive("length", length),
        positive("vocab", vocab),
        positive("d_model", d_model),
        positive("heads", heads),
        positive("layers", layers),
    )


def generator(
    ctx: ModelContext,
    length: int = 8,
    d_model: int = 32,
    base: int = 4,
    widths: Sequence[int] = (32, 16, 8),
) -> Generator:
    return Generator(
        ctx,
        positive("length", length),
        positive("d_model", d_model),
        positive("base", base),
        channel_list("widths", widths),
    )


def super_resolution(ctx: ModelContext, size: int = 16, width: int = 8) -> SuperResolution:
    return SuperResolution(ctx, positive("size", size), positive("width", width))
