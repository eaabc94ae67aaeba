"""Signing TensorRefs: an HMAC-SHA256 tag, truncated to 16 bytes, under a per-boot random key.

The broker signs every ref it issues; a receiver with the key (served only on the broker's key
socket, to processes of its user: `keys.py`) refuses a ref the broker never issued, or one whose
slab, offset, size, type, shape or lease was edited, without a round trip. A new broker boot
draws a new key, so old tags stop verifying as well as carrying an old generation.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Any

from protos import tensor_pb2

TAG_BYTES = 16
KEY_BYTES = 32
_BLOCK = 64  # SHA-256's block size


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def tag_of(
    key: bytes,
    slab_id: str,
    generation: int,
    offset: int,
    nbytes: int,
    dtype: int,
    shape: Sequence[int],
    lease_id: str,
) -> bytes:
    """The tag of a ref's fields under key: for callers that hold the fields as plain values
    (a protobuf field read costs about as much as formatting it, and a ref is signed or checked
    at every hop, so the query's path reads each field once)."""
    # NUL-separated fields: none of them can contain NUL (ids are checked printable names)
    message = (
        f"{slab_id}\0{generation}\0{offset}\0{nbytes}\0{dtype}\0{','.join(map(str, shape))}"
        f"\0{lease_id}"
    ).encode()
    inner, outer = _pads(key)
    h = inner.copy()
    h.update(message)
    o = outer.copy()
    o.update(h.digest())
    tag: bytes = o.digest()
    return tag[:TAG_BYTES]


@functools.lru_cache(maxsize=8)
def _pads(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) with its two padded-key blocks hashed once per key: a tag is then
    two hash copies and updates, about half of `hmac.digest`'s cost, which sets up OpenSSL's
    HMAC afresh on every call (a test checks the two agree)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


def sign(key: bytes, ref: tensor_pb2.TensorRef) -> bytes:
    """The tag of ref under key (ref.tag itself is not covered)."""
    return tag_of(
        key,
        ref.slab_id,
        ref.slab_generation,
        ref.offset,
        ref.nbytes,
        int(ref.dtype),
        ref.shape,
        ref.lease_id,
    )


def verify(key: bytes, ref: tensor_pb2.TensorRef) -> bool:
    """True when ref.tag is the broker's tag for the rest of the ref (constant-time compare)."""
    return hmac.compare_digest(sign(key, ref), ref.tag)
