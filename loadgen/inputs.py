"""What a load generator sends: the pipeline mix, and seeded inputs that match a pipeline's spec.

Shared by the Locust users (gevent) and the open-loop generator (asyncio); no gRPC here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common import jpeg
from common.dtypes import to_numpy
from common.errors import InvalidArgument, NotFound
from protos import tensor_pb2


@dataclass(frozen=True)
class Mix:
    """Pipelines and their relative weights (all > 0); `label` names the mix in results."""

    weights: tuple[tuple[str, float], ...]
    label: str = ""

    def __post_init__(self) -> None:
        if not self.weights:
            raise InvalidArgument("a mix needs at least one pipeline")
        for name, weight in self.weights:
            if not name:
                raise InvalidArgument("a mix entry has an empty pipeline name")
            if not (math.isfinite(weight) and weight > 0):
                raise InvalidArgument(f"mix weight for {name!r} must be > 0, got {weight!r}")

    @property
    def pipelines(self) -> list[str]:
        return [name for name, _ in self.weights]

    @property
    def name(self) -> str:
        return self.label or "+".join(self.pipelines)

    def fractions(self) -> dict[str, float]:
        total = sum(w for _, w in self.weights)
        return {name: w / total for name, w in self.weights}

    def draw(self, rng: np.random.Generator, n: int) -> list[str]:
        """`n` pipeline names drawn independently by weight."""
        frac = self.fractions()
        names = list(frac)
        idx = rng.choice(len(names), size=n, p=np.array([frac[k] for k in names]))
        return [names[i] for i in idx]

    def check_served(self, served: Sequence[str]) -> None:
        missing = [p for p in self.pipelines if p not in served]
        if missing:
            raise NotFound(
                f"mix names pipelines the gateway does not serve: {', '.join(missing)} "
                f"(served: {', '.join(served) or 'none'})"
            )

    def spec(self) -> str:
        body = ",".join(f"{n}={w:g}" for n, w in self.weights)
        return f"{self.label}:{body}" if self.label else body


def parse_mix(text: str) -> Mix:
    """`"img-to-text=2,video-analytics=1"`, optionally labelled `"vision:img-to-text=2,..."`.

    A bare name means weight 1.
    """
    label, sep, body = text.partition(":")
    if not sep:
        label, body = "", text
    weights: list[tuple[str, float]] = []
    seen: set[str] = set()
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, raw = part.partition("=")
        name = name.strip()
        try:
            weight = float(raw) if eq else 1.0
        except ValueError:
            raise InvalidArgument(f"mix entry {part!r}: weight {raw!r} is not a number") from None
        if name in seen:
            raise InvalidArgument(f"mix names {name!r} twice")
        seen.add(name)
        weights.append((name, weight))
    return Mix(tuple(weights), label.strip())


def uniform_mix(pipelines: Sequence[str]) -> Mix:
    return Mix(tuple((p, 1.0) for p in pipelines))


def make_input(spec: tensor_pb2.TensorSpec, rng: np.random.Generator) -> tensor_pb2.WireTensor:
    """A random tensor of the spec's dtype and shape: floats in [0, 1), integers in [0, 256); for
    a JPEG input (common/jpeg.py), a generated image of the frame size its name gives, encoded
    and framed, as a camera client would send it."""
    dtype = to_numpy(spec.dtype)
    shape = tuple(int(d) for d in spec.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"spec {spec.name!r} has a negative dimension: {list(shape)}")
    if jpeg.is_jpeg_input(spec.name, dtype, shape):
        h, w = jpeg.frame_size(spec.name) or jpeg.DEFAULT_FRAME
        array = jpeg.encoded_frame(jpeg.synthetic_image(rng, h, w), shape[0])
    elif dtype.kind == "f":
        array = rng.random(shape, dtype=np.float32).astype(dtype)
    elif dtype.kind == "b":
        array = rng.random(shape) < 0.5
    else:
        array = rng.integers(0, 256, size=shape).astype(dtype)
    return tensor_pb2.WireTensor(dtype=spec.dtype, shape=shape, data=array.tobytes())


def make_inputs(
    specs: Mapping[str, tensor_pb2.TensorSpec], seed: int, variants: int = 4
) -> dict[str, list[tensor_pb2.WireTensor]]:
    """A few distinct seeded inputs per pipeline, made once so sending costs no generation."""
    rng = np.random.default_rng(seed)
    return {name: [make_input(spec, rng) for _ in range(variants)] for name, spec in specs.items()}
