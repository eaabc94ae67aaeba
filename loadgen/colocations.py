"""Co-locations for the predictor benchmark: which stages share one GPU, at what share and batch.

A co-location is two or more stages of different pipelines, each its own process on one GPU
under MPS at its own SM share and batch size. Two built-in sets: the held-out one the accuracy
is reported on, and the training one `loadgen.contention_fit` calibrates from; no pair of
stages appears in both (`check_disjoint`), so the accuracy is measured on pairs the
calibration never saw. `parse_colocation` reads one from the command line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import InvalidArgument
from scheduler.perfmodel.profiles import StageProfile


@dataclass(frozen=True)
class Member:
    """One stage's process in a co-location: its SM share (percent) and batch size."""

    pipeline: str
    stage: str
    share: float
    batch: int

    @property
    def key(self) -> str:
        return f"{self.pipeline}/{self.stage}"


@dataclass(frozen=True)
class Colocation:
    name: str
    members: tuple[Member, ...]


def _co(*members: tuple[str, float, int]) -> Colocation:
    ms = tuple(Member(*_split(k), share, batch) for k, share, batch in members)
    return Colocation("+".join(f"{m.key}@{m.share:g}%b{m.batch}" for m in ms), ms)


def _split(key: str) -> tuple[str, str]:
    pipeline, sep, stage = key.partition("/")
    if not sep or not pipeline or not stage or "/" in stage:
        raise InvalidArgument(f"{key!r} is not <pipeline>/<stage>")
    return pipeline, stage


# Held out: no profile saw two real stages together, and the contention calibration
# (`TRAINING`, `loadgen.contention_fit`) never saw these stage pairs. Shares are mostly off the
# profiled grid (10, 30, 50, 100) and some batches off theirs (1, 8, 16 or 32), so interpolation
# is tested too.
COLOCATIONS: tuple[Colocation, ...] = (
    _co(("text-to-img/generate", 30, 8), ("video-analytics/classify", 50, 8)),
    _co(("text-to-img/upscale", 40, 8), ("video-analytics/crop", 40, 16)),
    _co(("speech-to-text/acoustic", 40, 16), ("text-to-img/generate", 40, 8)),
    _co(("video-analytics/detect", 35, 16), ("text-to-img/upscale", 45, 4)),
    _co(("img-to-text/encode", 40, 16), ("text-to-img/upscale", 40, 16)),
    _co(("video-analytics/classify", 25, 16), ("text-to-img/generate", 45, 12)),
    _co(("speech-to-text/features", 20, 32), ("video-analytics/crop", 60, 24)),
    _co(("img-to-text/preprocess", 20, 32), ("video-analytics/classify", 60, 12)),
    _co(("text-to-img/encode", 35, 16), ("speech-to-text/decode", 35, 16)),
    _co(
        ("text-to-img/generate", 20, 8),
        ("video-analytics/classify", 30, 8),
        ("img-to-text/encode", 40, 8),
    ),
)


# Fitted on: the co-locations `loadgen.contention_fit` calibrates the pressure scale from.
# No pair of stages here is also a pair in COLOCATIONS (`check_disjoint`).
TRAINING: tuple[Colocation, ...] = (
    _co(("img-to-text/encode", 50, 8), ("video-analytics/detect", 50, 8)),
    _co(("speech-to-text/acoustic", 30, 8), ("video-analytics/classify", 70, 16)),
    _co(("text-to-img/upscale", 50, 16), ("speech-to-text/features", 50, 32)),
    _co(
        ("video-analytics/crop", 30, 32),
        ("img-to-text/preprocess", 50, 8),
        ("text-to-img/encode", 20, 8),
    ),
    _co(("text-to-img/generate", 60, 16), ("img-to-text/decode", 40, 8)),
    _co(("video-analytics/detect", 60, 32), ("speech-to-text/acoustic", 40, 8)),
    _co(("img-to-text/encode", 30, 32), ("speech-to-text/features", 70, 8)),
    _co(("speech-to-text/decode", 20, 32), ("video-analytics/classify", 80, 8)),
    _co(("text-to-img/encode", 50, 32), ("video-analytics/crop", 50, 8)),
    _co(
        ("img-to-text/preprocess", 30, 32),
        ("speech-to-text/acoustic", 30, 16),
        ("video-analytics/detect", 40, 8),
    ),
)
SETS = {"held-out": COLOCATIONS, "training": TRAINING}


def stage_pairs(colocations: Sequence[Colocation]) -> set[frozenset[str]]:
    """Every pair of stages that run side by side in some co-location."""
    return {
        frozenset((a.key, b.key))
        for c in colocations
        for i, a in enumerate(c.members)
        for b in c.members[i + 1 :]
    }


def check_disjoint(held_out: Sequence[Colocation], training: Sequence[Colocation]) -> None:
    """INVALID_ARGUMENT if a held-out co-location pairs two stages the training set paired."""
    shared = stage_pairs(held_out) & stage_pairs(training)
    if shared:
        raise InvalidArgument(
            "held-out co-locations pair stages the calibration was fitted on: "
            + ", ".join(sorted(" + ".join(sorted(p)) for p in shared))
        )


def check(colocations: Sequence[Colocation], profiles: Mapping[str, StageProfile]) -> None:
    """INVALID_ARGUMENT unless each co-location is held out and fits one GPU under MPS."""
    for c in colocations:
        if len(c.members) < 2:
            raise InvalidArgument(f"{c.name}: a co-location needs at least two stages")
        pipes = [m.pipeline for m in c.members]
        if len(set(pipes)) != len(pipes):
            raise InvalidArgument(f"{c.name}: stages must come from different pipelines")
        if sum(m.share for m in c.members) > 100.0:
            raise InvalidArgument(f"{c.name}: MPS shares sum above 100%")
        for m in c.members:
            if m.key not in profiles:
                raise InvalidArgument(f"{c.name}: no profile for {m.key}")
            if not 0 < m.share <= 100 or m.batch < 1:
                raise InvalidArgument(f"{c.name}: {m.key} needs a share in (0, 100] and batch >= 1")


def parse_colocation(text: str) -> Colocation:
    """`pipe/stage@share:batch,pipe/stage@share:batch[,...]`, e.g. `a/x@30:8,b/y@50:8`."""
    members = []
    for part in text.split(","):
        key, _, rest = part.strip().partition("@")
        share, _, batch = rest.partition(":")
        try:
            members.append((key, float(share), int(batch)))
        except ValueError:
            raise InvalidArgument(
                f"co-location part {part!r} is not pipe/stage@share:batch"
            ) from None
        if key.count("/") != 1:
            raise InvalidArgument(f"co-location part {part!r} is not pipe/stage@share:batch")
    return _co(*members)
