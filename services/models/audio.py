"""Log-mel features: framing, Hann window, DFT power, mel filterbank, log.

Frames are taken without centre padding: T = 1 + (samples - n_fft) // hop. The spectrum is one
matrix multiply of the frames by a windowed real DFT basis (cos and sin side by side), in fp32
on both backends (the caller casts after): for frames of a few hundred samples that is cheap
work on a GPU, and unlike cuFFT it runs inside a CUDA graph.
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


def stft_basis(window: np.ndarray) -> np.ndarray:
    """(n_fft, 2 * bins) host fp32: the window times cos and times -sin of the real DFT's
    n_fft // 2 + 1 bins, so `frames @ basis` is [real | imaginary] of the windowed spectrum."""
    n_fft = len(window)
    k = np.arange(n_fft // 2 + 1)[None, :]
    phase = 2.0 * np.pi * np.arange(n_fft)[:, None] * k / n_fft
    w = np.asarray(window, dtype=np.float64)[:, None]
    return np.concatenate([w * np.cos(phase), -w * np.sin(phase)], axis=1).astype(np.float32)


def log_mel(wave: Array, n_fft: int, hop: int, basis: Array, filters: Array) -> Array:
    """(n, samples) float -> (n, T, n_mels) fp32 log-mel power; `basis` from `stft_basis` and
    `filters` on xp, fp32."""
    xp = namespace(wave)
    spec = matmul(frames(wave.astype(np.float32), n_fft, hop), basis)  # (n, T, 2 * bins)
    bins = basis.shape[1] // 2
    re, im = spec[..., :bins], spec[..., bins:]
    power = re * re + im * im
    return xp.log(matmul(power, filters.T) + np.float32(LOG_FLOOR))


def normalize(features: Array, eps: float = 1e-5) -> Array:
    """Per-utterance mean and variance normalisation of (n, T, F) over time, per bin (CMVN)."""
    xp = namespace(features)
    mean = features.mean(axis=1, keepdims=True)
    std = xp.sqrt(((features - mean) ** 2).mean(axis=1, keepdims=True) + np.float32(eps))
    return (features - mean) / std
