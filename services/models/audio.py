"""Log-mel features: framing, Hann window, rfft power, mel filterbank, log.

Frames are taken without centre padding: T = 1 + (samples - n_fft) // hop. The spectrum is
computed in fp32 on both backends (cuFFT has no general fp16 path); the caller casts after.
"""

from __future__ import annotations

import numpy as np

from services.models.layers import Array, matmul, namespace

LOG_FLOOR = 1e-6


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular HTK-mel filters, host fp32."""
    fmax = sample_rate / 2 if fmax is None else fmax
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None, :] - lo) / (mid - lo)
    down = (hi - bins[None, :]) / (hi - mid)
    filters: np.ndarray = np.maximum(0.0, np.minimum(up, down)).astype(np.float32)
    return filters


def hann(n: int) -> np.ndarray:
    """Periodic Hann window (as used for STFTs), host fp32."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def num_frames(samples: int, n_fft: int, hop: int) -> int:
    if samples < n_fft:
        raise ValueError(f"{samples} samples is shorter than one frame of {n_fft}")
    return 1 + (samples - n_fft) // hop


def frames(wave: Array, n_fft: int, hop: int) -> Array:
    """(n, samples) -> (n, T, n_fft) by one gather."""
    xp = namespace(wave)
    t = num_frames(wave.shape[1], n_fft, hop)
    idx = xp.arange(t)[:, None] * hop + xp.arange(n_fft)[None, :]
    return wave[:, idx]


def log_mel(wave: Array, n_fft: int, hop: int, window: Array, filters: Array) -> Array:
    """(n, samples) float -> (n, T, n_mels) fp32 log-mel power; window and filters on xp, fp32."""
    xp = namespace(wave)
    spec = xp.fft.rfft(frames(wave.astype(np.float32), n_fft, hop) * window, axis=-1)
    power = (spec.real * spec.real + spec.imag * spec.imag).astype(np.float32)
    return xp.log(matmul(power, filters.T) + np.float32(LOG_FLOOR))


def normalize(features: Array, eps: float = 1e-5) -> Array:
    """Per-utterance mean and variance normalisation of (n, T, F) over time, per bin (CMVN)."""
    xp = namespace(features)
    mean = features.mean(axis=1, keepdims=True)
    std = xp.sqrt(((features - mean) ** 2).mean(axis=1, keepdims=True) + np.float32(eps))
    return (features - mean) / std
