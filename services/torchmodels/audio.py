"""Whisper's log-mel front end as a stage: 16 kHz audio -> log-mel spectrogram.

As Whisper computes it: a 400-point STFT with a Hann window and a 160-sample hop (10 ms), power
spectrum, Slaney-style mel filter bank, log10 clamped at 1e-10, floored at 8 below the item's
maximum, then (x + 4) / 4. The filter bank comes from torchaudio where it is installed, else it
is computed here with the same formula (torchaudio is not always installable beside torch).
The STFT runs in float32 (half FFTs are not supported everywhere); the output is the compute
dtype. Graph-safe (cuFFT plans are made in the warm-up runs before capture).

Plug-in factory: `log_mel(ctx, samples, mels)`: audio float32 [samples] -> mel [mels, frames],
frames = samples // 160.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.stage.plugin import ModelContext
from services.torchmodels.core import TorchStage, positive, spec

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp
    )


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 [n_fft // 2 + 1, mels], Slaney-normalised triangles (librosa's and Whisper's)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(8000.0)), mels + 2)
    )
    widths = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    fb = np.maximum(0, np.minimum(down, up))
    fb *= 2.0 / (edges[2 : mels + 2] - edges[:mels])
    return fb.astype(np.float32)


def _filters(mels: int) -> np.ndarray:
    try:
        import torchaudio.functional as taf
    except ImportError:
        return mel_filters(mels)
    fb = taf.melscale_fbanks(
        N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
    )
    out: np.ndarray = fb.numpy().astype(np.float32)
    return out


class LogMel(TorchStage):
    def __init__(self, ctx: ModelContext, samples: int, mels: int) -> None:
        super().__init__(ctx, "log_mel")
        torch = self.torch
        self.samples = positive("samples", samples)
        self.frames = self.samples // HOP
        fb = _filters(positive("mels", mels))
        self.filters = torch.from_numpy(fb.T.copy()).to(self.device)  # [mels, bins]
        self.window = torch.hann_window(N_FFT, device=self.device)
        self.inputs = [spec("audio", np.float32, (self.samples,))]
        self.outputs = [spec("mel", ctx.compute_dtype, (mels, self.frames))]
        self.run = self.graphed("mel", self._mel, [spec("audio", np.float32, (self.samples,))])

    def to_torch(self, array: Any, want: Any) -> Any:
        # the audio stays float32 for the FFT whatever the compute dtype
        t = super().to_torch(array, want)
        return t.float()

    def _mel(self, audio: Any) -> Any:
        torch = self.torch
        stft = torch.stft(
            audio.float(), N_FFT, HOP, window=self.window, center=True, return_complex=True
        )
        power = stft[..., : self.frames].abs() ** 2
        mel = self.filters @ power
        log = torch.clamp(mel, min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return ((log + 4.0) / 4.0).to(self.dtype)

    def forward(self, audio: Any) -> list[Any]:
        return [self.run(audio)]


def log_mel(ctx: ModelContext, samples: int = 480000, mels: int = 80) -> LogMel:
    """Defaults are Whisper's: 30 s at 16 kHz (3000 frames), 80 mel bands."""
    return LogMel(ctx, samples, mels)
