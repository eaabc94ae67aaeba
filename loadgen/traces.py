"""Arrival-rate traces and the arrival schedules drawn from them.

A trace is a piecewise-linear rate curve: a list of `(t_s, rate_qps)` points with non-decreasing
times, linear between points and held flat before the first and after the last. Two points at the
same time make a step. Trace files are JSON lists of `[t_s, rate_qps]` pairs.

Schedules are arrival offsets in seconds from the start of a run, made by mapping arrivals of a
unit-rate process through the inverse of the cumulative rate Λ(t) = ∫ rate: exponential gaps give
a (non-homogeneous) Poisson process, unit gaps give evenly spaced arrivals. Either way the expected
number of arrivals in [0, T) is Λ(T), which is what `integral` returns.
"""

from __future__ import annotations

import bisect
import enum
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InvalidArgument


class Arrivals(enum.Enum):
    POISSON = "poisson"
    UNIFORM = "uniform"


@dataclass(frozen=True)
class Trace:
    """A rate curve over `[0, duration_s)`; build with `constant`, `step`, `diurnal` or `load`."""

    points: tuple[tuple[float, float], ...]
    duration_s: float

    def __post_init__(self) -> None:
        if not self.points:
            raise InvalidArgument("a trace needs at least one (t_s, rate) point")
        if not math.isfinite(self.duration_s) or self.duration_s <= 0:
            raise InvalidArgument(f"trace duration must be > 0 s, got {self.duration_s!r}")
        last = -math.inf
        for t, rate in self.points:
            if not (math.isfinite(t) and math.isfinite(rate)):
                raise InvalidArgument(f"trace point ({t!r}, {rate!r}) is not finite")
            if t < last:
                raise InvalidArgument(f"trace times must not decrease: {t} after {last}")
            if rate < 0:
                raise InvalidArgument(f"trace rate must be >= 0, got {rate} at t={t}")
            last = t

    def rate_at(self, t_s: float) -> float:
        """The rate at `t_s` (right-continuous: at a step, the rate after it)."""
        return self._rate(t_s, after=True)

    def _rate(self, t_s: float, *, after: bool) -> float:
        times = [p[0] for p in self.points]
        i = bisect.bisect_right(times, t_s) if after else bisect.bisect_left(times, t_s)
        if i == 0:
            return self.points[0][1]
        if i == len(self.points):
            return self.points[-1][1]
        (t0, r0), (t1, r1) = self.points[i - 1], self.points[i]
        return r0 if t1 == t0 else r0 + (r1 - r0) * (t_s - t0) / (t1 - t0)

    def segments(self) -> list[tuple[float, float, float, float]]:
        """`(t0, t1, r0, r1)` linear pieces covering exactly `[0, duration_s)`."""
        inner = (t for t, _ in self.points if 0 < t < self.duration_s)
        knots = sorted({0.0, self.duration_s, *inner})
        # A step at a knot belongs to the piece that starts there.
        return [
            (t0, t1, self._rate(t0, after=True), self._rate(t1, after=False))
            for t0, t1 in zip(knots, knots[1:], strict=False)
        ]

    def integral(self) -> float:
        """Expected arrivals over the whole trace: ∫ rate dt on `[0, duration_s)`."""
        return sum((t1 - t0) * (r0 + r1) / 2 for t0, t1, r0, r1 in self.segments())

    def peak_qps(self) -> float:
        return max(max(r0, r1) for _, _, r0, r1 in self.segments())

    def to_json(self) -> list[list[float]]:
        return [[t, r] for t, r in self.points]


def constant(rate_qps: float, duration_s: float) -> Trace:
    return Trace(((0.0, rate_qps), (duration_s, rate_qps)), duration_s)


def step(rates_qps: Sequence[float], step_s: float) -> Trace:
    """Holds each rate for `step_s` seconds in turn."""
    if not rates_qps:
        raise InvalidArgument("step trace needs at least one rate")
    points: list[tuple[float, float]] = []
    for i, rate in enumerate(rates_qps):
        points += [(i * step_s, rate), ((i + 1) * step_s, rate)]
    return Trace(tuple(points), step_s * len(rates_qps))


def diurnal(min_qps: float, max_qps: float, duration_s: float, points: int = 97) -> Trace:
    """One day compressed to `duration_s`: a trough before dawn, a peak mid-afternoon.

    The day curve is a raised cosine with its minimum at 04:00 and maximum at 16:00, plus a
    smaller second harmonic that flattens the night and sharpens the daytime, rescaled to span
    exactly `[min_qps, max_qps]`.
    """
    if not 0 <= min_qps <= max_qps:
        raise InvalidArgument(f"diurnal needs 0 <= min <= max, got {min_qps}, {max_qps}")
    hours = np.linspace(0.0, 24.0, points)
    phase = 2 * np.pi * (hours - 4.0) / 24.0
    shape = (1 - np.cos(phase)) / 2 + 0.15 * np.sin(2 * phase - np.pi / 2)
    shape = (shape - shape.min()) / (shape.max() - shape.min())
    rates = min_qps + (max_qps - min_qps) * shape
    times = hours / 24.0 * duration_s
    return Trace(tuple(zip(times.tolist(), rates.tolist(), strict=True)), duration_s)


def load(path: str | Path, duration_s: float | None = None) -> Trace:
    """A trace from a JSON file of `[t_s, rate_qps]` pairs; duration defaults to the last time."""
    try:
        raw = json.loads(Path(path).read_text())
        pts = tuple((float(t), float(r)) for t, r in raw)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidArgument(f"trace file {path}: {e}") from e
    if not pts:
        raise InvalidArgument(f"trace file {path} holds no points")
    return Trace(pts, duration_s if duration_s is not None else pts[-1][0])


def schedule(trace: Trace, rng: np.random.Generator, arrivals: Arrivals) -> list[float]:
    """Arrival offsets (seconds, ascending) over the trace: Poisson or evenly spaced in Λ."""
    total = trace.integral()
    if arrivals is Arrivals.POISSON:
        # Draw a few more gaps than expected; the tail beyond Λ(T) is dropped.
        n = int(total + 10 * math.sqrt(total + 1) + 10)
        marks = np.cumsum(rng.exponential(1.0, n))
        while marks[-1] < total:
            marks = np.concatenate([marks, marks[-1] + np.cumsum(rng.exponential(1.0, n))])
        marks = marks[marks < total]
    else:
        marks = np.arange(0.5, total, 1.0)
    return _invert(trace, marks.tolist())


def poisson(rate_qps: float, duration_s: float, rng: np.random.Generator) -> list[float]:
    return schedule(constant(rate_qps, duration_s), rng, Arrivals.POISSON)


def _invert(trace: Trace, marks: list[float]) -> list[float]:
    """Maps ascending values of Λ back to times, piece by piece (quadratic on a linear piece)."""
    out: list[float] = []
    acc = 0.0
    pieces = iter(trace.segments())
    piece = next(pieces, None)
    for m in marks:
        while piece is not None:
            t0, t1, r0, r1 = piece
            area = (t1 - t0) * (r0 + r1) / 2
            if m < acc + area:
                break
            acc += area
            piece = next(pieces, None)
        if piece is None:
            break
        t0, t1, r0, r1 = piece
        need = m - acc
        slope = (r1 - r0) / (t1 - t0)
        if abs(slope) < 1e-12:
            x = need / r0
        else:
            # r0 x + slope x^2 / 2 = need, the root inside the piece (stable form).
            x = 2 * need / (r0 + math.sqrt(max(r0 * r0 + 2 * slope * need, 0.0)))
        out.append(min(t0 + x, t1))
    return out
