"""Input generators: `fn(size, rng) -> one query input` per pipeline, shaped as its config says.

The shapes here must agree with each config's `sizes.<size>.input` (a test checks every pair;
`runner.make_input` checks at run time). Inputs have some structure (smooth images, bright
objects, tones) so the reference models see more than white noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common import jpeg
from common.errors import InvalidArgument

IMAGE = {"tiny": (40, 40, 3), "full": (768, 768, 3)}
TOKENS = {"tiny": (8, 128), "full": (32, 8192)}  # (length, vocab)
SAMPLES = {"tiny": 4096, "full": 32000}
FRAME = {"tiny": (64, 64, 3), "full": (720, 1280, 3)}  # full: a 720p camera frame
SAMPLE_RATE = 16000
# JPEG pipelines (common/jpeg.py): (height, width) of the encoded image, framed vector length
JPEG_FRAME = {"tiny": ((64, 64), 8192), "full": ((720, 1280), 262144)}  # a 720p camera
JPEG_IMAGE = {"tiny": ((64, 64), 8192), "full": ((480, 640), 131072)}  # a VGA photo
SPEECH = {"tiny": 8000, "full": 480000}  # full: Whisper's 30 s window at 16 kHz


def _size(table: Mapping[str, object], size: str) -> None:
    if size not in table:
        raise InvalidArgument(f"no input generator for size {size!r} (has {', '.join(table)})")


def image(size: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 HWC: a smooth random field (coarse noise upsampled) plus fine noise."""
    _size(IMAGE, size)
    h, w, c = IMAGE[size]
    coarse = rng.uniform(0, 255, (h // 8 + 1, w // 8 + 1, c))
    smooth = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
    noisy = smooth + rng.normal(0, 12, (h, w, c))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def tokens(size: str, rng: np.random.Generator) -> np.ndarray:
    """int32 token ids in [2, vocab) (0 and 1 are reserved: padding, begin)."""
    _size(TOKENS, size)
    length, vocab = TOKENS[size]
    return rng.integers(2, vocab, length, dtype=np.int32)


def waveform(size: str, rng: np.random.Generator) -> np.ndarray:
    """float32 mono audio at 16 kHz in [-1, 1]: three tones with a fade, plus noise."""
    _size(SAMPLES, size)
    return _tones(SAMPLES[size], rng)


def _tones(n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    tones = np.zeros(n)
    for _ in range(3):
        amp, hz, phase = rng.uniform(0.1, 0.3), rng.uniform(100, 3000), rng.uniform(0, 6)
        tones += amp * np.sin(2 * np.pi * hz * t + phase)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) * 50)
    wave = tones * fade + rng.normal(0, 0.01, n)
    out: np.ndarray = np.clip(wave, -1, 1).astype(np.float32)
    return out


def frame(size: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 HWC video frame: dark noisy background with a few bright coloured rectangles."""
    _size(FRAME, size)
    h, w, c = FRAME[size]
    out = rng.normal(30, 8, (h, w, c))
    for _ in range(int(rng.integers(2, 6))):
        bh, bw = int(rng.integers(h // 8, h // 3)), int(rng.integers(w // 8, w // 3))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        out[y : y + bh, x : x + bw] = rng.uniform(120, 255, c)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _jpeg(
    table: Mapping[str, tuple[tuple[int, int], int]], size: str, rng: np.random.Generator
) -> np.ndarray:
    _size(table, size)
    (h, w), max_bytes = table[size]
    return jpeg.encoded_frame(jpeg.synthetic_image(rng, h, w), max_bytes)


def jpeg_frame(size: str, rng: np.random.Generator) -> np.ndarray:
    """A camera frame as a framed JPEG (uint8 [max_bytes], common/jpeg.py)."""
    return _jpeg(JPEG_FRAME, size, rng)


def jpeg_image(size: str, rng: np.random.Generator) -> np.ndarray:
    """A photo as a framed JPEG (uint8 [max_bytes], common/jpeg.py)."""
    return _jpeg(JPEG_IMAGE, size, rng)


def speech(size: str, rng: np.random.Generator) -> np.ndarray:
    """float32 mono audio at 16 kHz, as `waveform`, over Whisper-style windows."""
    _size(SPEECH, size)
    return _tones(SPEECH[size], rng)
