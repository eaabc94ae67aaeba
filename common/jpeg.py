"""Compressed images in a fixed-size tensor: how a JPEG of any length rides a pipeline whose input
spec is one fixed shape.

A pipeline's query input has one dtype and shape, but JPEG files differ in length. A JPEG input
is therefore a `uint8 [max_bytes]` vector framed as

    bytes 0..3   the JPEG's length n, unsigned 32-bit little-endian
    bytes 4..    the n bytes of the JPEG file, then zeros up to max_bytes

so the receiver reads exactly the file (no guessing where padding starts; decoders differ in
how they treat bytes after the end-of-image marker). An all-zero vector (n = 0) is "no image":
decoders give a black image for it, which is what warm-ups and readiness probes send.

The pipeline's input spec is named `jpeg` or `jpeg_<H>x<W>`; the second form tells load
generators the resolution of the frames to encode (a camera's, say), since the spec alone only
bounds the compressed size. Shared by the load generators, the pipelines' input generators and
the decoding stages; nothing here needs torch (encoding needs Pillow).
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from common.errors import InvalidArgument

HEADER_BYTES = 4
DEFAULT_QUALITY = 85
# what a load generator encodes for a spec named plain `jpeg`
DEFAULT_FRAME = (224, 224)
_NAME = re.compile(r"^jpeg(?:_(\d+)x(\d+))?$")


def is_jpeg_input(name: str, dtype: Any, shape: tuple[int, ...]) -> bool:
    """Whether a spec is a framed JPEG by this module's naming rule."""
    return bool(_NAME.match(name)) and np.dtype(dtype) == np.uint8 and len(shape) == 1


def frame_size(name: str) -> tuple[int, int] | None:
    """(height, width) named by `jpeg_<H>x<W>`, None for plain `jpeg` or another name."""
    m = _NAME.match(name)
    if m is None or m.group(1) is None:
        return None
    h, w = int(m.group(1)), int(m.group(2))
    if h <= 0 or w <= 0:
        raise InvalidArgument(f"input {name!r} names an empty frame size")
    return h, w


def encode(image: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    """A JPEG file of an HWC uint8 RGB (or HW grayscale) image."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise InvalidArgument(f"cannot encode a {image.dtype}{list(image.shape)} array as JPEG")
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pack(data: bytes, max_bytes: int) -> np.ndarray:
    """`data` framed into a fresh `uint8 [max_bytes]`; INVALID_ARGUMENT when it does not fit."""
    room = max_bytes - HEADER_BYTES
    if len(data) > room:
        raise InvalidArgument(
            f"a JPEG of {len(data)} bytes does not fit a {max_bytes}-byte input "
            f"({room} after the {HEADER_BYTES}-byte length)"
        )
    out = np.zeros(max_bytes, dtype=np.uint8)
    out[:HEADER_BYTES] = np.frombuffer(len(data).to_bytes(HEADER_BYTES, "little"), np.uint8)
    out[HEADER_BYTES : HEADER_BYTES + len(data)] = np.frombuffer(data, np.uint8)
    return out


def lengths(head: np.ndarray, max_bytes: int) -> np.ndarray:
    """The framed length of every row of a `uint8 [n, >= 4]` batch (its headers at least) of
    `max_bytes` vectors, as int64 [n]; INVALID_ARGUMENT naming a row whose length overruns."""
    if head.ndim != 2 or head.dtype != np.uint8 or head.shape[1] < HEADER_BYTES:
        raise InvalidArgument(
            f"JPEG headers must be uint8 [n, >= {HEADER_BYTES}], got {head.shape}"
        )
    n = np.ascontiguousarray(head[:, :HEADER_BYTES]).view("<u4").reshape(-1).astype(np.int64)
    room = max_bytes - HEADER_BYTES
    bad = np.flatnonzero(n > room)
    if bad.size:
        raise InvalidArgument(
            f"JPEG input row {int(bad[0])} claims {int(n[bad[0]])} bytes; at most {room} fit"
        )
    return n


def unpack(vector: np.ndarray) -> bytes:
    """The JPEG file in one framed vector (b"" for no image)."""
    n = int(lengths(vector[None], len(vector))[0])
    return vector[HEADER_BYTES : HEADER_BYTES + n].tobytes()


def encoded_frame(image: np.ndarray, max_bytes: int, quality: int = DEFAULT_QUALITY) -> np.ndarray:
    """`image` as a framed JPEG vector (the input a client of a JPEG pipeline sends)."""
    return pack(encode(image, quality), max_bytes)


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 HWC RGB with structure a codec and a detector can work on: a smooth random field,
    a few bright rectangles, mild noise (pure noise would compress to nearly its raw size)."""
    coarse = rng.uniform(20, 200, (height // 16 + 1, width // 16 + 1, 3))
    img = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :width]
    for _ in range(int(rng.integers(2, 6))):
        bh = int(rng.integers(max(1, height // 8), max(2, height // 3)))
        bw = int(rng.integers(max(1, width // 8), max(2, width // 3)))
        y, x = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
        img[y : y + bh, x : x + bw] = rng.uniform(120, 255, 3)
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
