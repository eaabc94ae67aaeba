"""speech-to-text: log-mel features -> acoustic model -> CTC greedy decode.

waveform float32 (samples,) -> features -> mel (T, n_mels) -> acoustic -> logits (T', V)
                            -> ctc_decode -> tokens int32 (T',), padded with -1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common.errors import InvalidArgument
from services.models import audio
from services.models import layers as L
from services.models.base import ReferenceModel, divisible, positive, spec
from services.models.blocks import Conv, Dense, Norm, TransformerBlock
from services.models.layers import Array
from services.stage.plugin import ModelContext

BLANK = 0
PAD = -1


class Features(ReferenceModel):
    """Waveform -> log-mel features; the spectrum is a matrix multiply (audio.stft_basis), so
    the stage is graph-safe."""

    graph_safe = True

    def __init__(
        self, ctx: ModelContext, samples: int, sample_rate: int, n_fft: int, hop: int, n_mels: int
    ) -> None:
        super().__init__(ctx, "speech-to-text/features")
        self.n_fft, self.hop = n_fft, hop
        self.basis = self.init.host(audio.stft_basis(audio.hann(n_fft)), np.float32)
        self.filters = self.init.host(audio.mel_filterbank(n_fft, n_mels, sample_rate), np.float32)
        frames = audio.num_frames(samples, n_fft, hop)
        self.inputs = [spec("waveform", np.float32, (samples,))]
        self.outputs = [spec("mel", self.dtype, (frames, n_mels))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        mel = audio.log_mel(batch["waveform"], self.n_fft, self.hop, self.basis, self.filters)
        return {"mel": audio.normalize(mel).astype(self.dtype)}


class Acoustic(ReferenceModel):
    """Two 3×3/2 convs over (time, mel) -> per-frame projection -> transformer -> vocab logits."""

    graph_safe = True

    def __init__(
        self,
        ctx: ModelContext,
        frames: int,
        n_mels: int,
        conv_width: int,
        d_model: int,
        heads: int,
        layers: int,
        vocab: int,
    ) -> None:
        super().__init__(ctx, "speech-to-text/acoustic")
        divisible(d_model, heads)
        self.c1 = Conv(self.init, 1, conv_width, 3, stride=2)
        self.c2 = Conv(self.init, conv_width, conv_width, 3, stride=2)
        t_out, f_out = _quarter(frames), _quarter(n_mels)
        self.proj = Dense(self.init, conv_width * f_out, d_model)
        self.pos = self.init.host(L.sinusoidal_positions(t_out, d_model))
        self.blocks = [TransformerBlock(self.init, d_model, heads) for _ in range(layers)]
        self.norm, self.head = Norm(self.init, d_model), Dense(self.init, d_model, vocab)
        self.inputs = [spec("mel", self.dtype, (frames, n_mels))]
        self.outputs = [spec("logits", self.dtype, (t_out, vocab))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        mel = batch["mel"]
        x = L.relu(self.c2(L.relu(self.c1(mel[:, None]))))  # (n, c, t', f')
        n, c, t, f = x.shape
        x = self.proj(x.transpose(0, 2, 1, 3).reshape(n, t, c * f)) + self.pos
        for block in self.blocks:
            x = block(x)
        # centring over time removes the common mode random weights put on every frame, which
        # would otherwise decide the argmax (per utterance, so batch-independent)
        x = x - x.astype(np.float32).mean(axis=1, keepdims=True).astype(x.dtype)
        return {"logits": self.head(self.norm(x))}


class CtcDecode(ReferenceModel):
    """Greedy CTC: argmax per frame, collapse repeats, drop blanks, left-align, pad with -1."""

    graph_safe = True

    def __init__(self, ctx: ModelContext, frames: int, vocab: int) -> None:
        super().__init__(ctx, "speech-to-text/ctc")
        self.inputs = [spec("logits", self.dtype, (frames, vocab))]
        self.outputs = [spec("tokens", np.int32, (frames,))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"tokens": ctc_greedy(batch["logits"])}


def ctc_greedy(logits: Array) -> Array:
    """(n, T, V) -> (n, T) int32, computed without leaving the device (no sync on a mask)."""
    xp = L.namespace(logits)
    ids = xp.argmax(logits, axis=-1).astype(np.int32)
    n, t = ids.shape
    prev = xp.concatenate([xp.full((n, 1), -1, dtype=np.int32), ids[:, :-1]], axis=1)
    keep = (ids != BLANK) & (ids != prev)
    slot = xp.cumsum(keep, axis=1) - 1  # where each kept id lands in its row
    # dropped ids all go to a spare last column, cut off after the scatter
    out = xp.full((n, t + 1), PAD, dtype=np.int32)
    rows = xp.broadcast_to(xp.arange(n)[:, None], (n, t))
    out[rows, xp.where(keep, slot, t)] = ids
    return out[:, :t].copy()


def _quarter(size: int) -> int:
    """Output size of two 3×3, stride-2, padding-1 convs."""
    return ((size - 1) // 2) // 2 + 1


def features(
    ctx: ModelContext,
    samples: int = 4096,
    sample_rate: int = 16000,
    n_fft: int = 256,
    hop: int = 128,
    n_mels: int = 32,
) -> Features:
    samples, n_fft = positive("samples", samples), positive("n_fft", n_fft)
    if samples < n_fft:
        raise InvalidArgument(f"option samples={samples} is shorter than n_fft={n_fft}")
    return Features(
        ctx, samples, positive("sample_rate", sample_rate), n_fft, positive("hop", hop),
        positive("n_mels", n_mels),
    )  # fmt: skip


def acoustic(
    ctx: ModelContext,
    frames: int = 31,
    n_mels: int = 32,
    conv_width: int = 8,
    d_model: int = 32,
    heads: int = 2,
    layers: int = 1,
    vocab: int = 16,
) -> Acoustic:
    return Acoustic(
        ctx, positive("frames", frames), positive("n_mels", n_mels),
        positive("conv_width", conv_width), positive("d_model", d_model),
        positive("heads", heads), positive("layers", layers), positive("vocab", vocab),
    )  # fmt: skip


def ctc_decode(ctx: ModelContext, frames: int = 8, vocab: int = 16) -> CtcDecode:
    return CtcDecode(ctx, positive("frames", frames), positive("vocab", vocab))
