"""Signing TensorRefs: an HMAC-SHA256 tag, truncated to 16 bytes, under a per-boot random key.

The broker signs every ref it issues; a receiver with the key (served by Describe on the
node-local listeners) refuses a ref the broker never issued, or one whose slab, offset, size,
type, shape or lease was edited, without a round trip. A new broker boot draws a new key, so
old tags stop verifying as well as carrying an old generation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from protos import tensor_pb2

TAG_BYTES = 16
KEY_BYTES = 32


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def _message(ref: tensor_pb2.TensorRef) -> bytes:
    # NUL-separated fields: none of them can contain NUL (ids are checked printable names).
    # One f-string: a ref is signed or checked at every hop, so this is on the query's path.
    shape = ",".join(map(str, ref.shape))
    return (
        f"{ref.slab_id}\0{ref.slab_generation}\0{ref.offset}\0{ref.nbytes}\0"
        f"{int(ref.dtype)}\0{shape}\0{ref.lease_id}"
    ).encode()


def sign(key: bytes, ref: tensor_pb2.TensorRef) -> bytes:
    """The tag of ref under key (ref.tag itself is not covered)."""
    # hmac.digest is the one-shot C path: a third of hmac.new(...).digest()'s cost
    return hmac.digest(key, _message(ref), hashlib.sha256)[:TAG_BYTES]


def verify(key: bytes, ref: tensor_pb2.TensorRef) -> bool:
    """True when ref.tag is the broker's tag for the rest of the ref (constant-time compare)."""
    return hmac.compare_digest(sign(key, ref), bytes(ref.tag))
