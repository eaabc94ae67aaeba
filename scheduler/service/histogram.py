"""A mergeable log-linear histogram of non-negative integer microseconds (HDR-style).

Values below 2**PRECISION_BITS get a bucket each (exact). Above, every power-of-two range is
cut into 2**(PRECISION_BITS - 1) equal buckets, so a bucket is never wider than
1 / 2**(PRECISION_BITS - 1) of its lower bound, and its midpoint is within RELATIVE_ERROR of any
value in it. Buckets are fixed (no configuration, no rescaling), so merging is adding counts:
merge(h(a), h(b)) == h(a + b) exactly, across replicas and across time buckets.

Quantiles follow numpy's default ("linear") definition over the bucket midpoints: the result is
a convex combination of two order statistics, each within RELATIVE_ERROR, so the quantile is
within RELATIVE_ERROR of numpy.percentile over the raw samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

PRECISION_BITS = 7
_EXACT = 1 << PRECISION_BITS  # values below this are stored exactly
_HALF = 1 << (PRECISION_BITS - 1)  # buckets per power of two above _EXACT
# bound on |quantile - numpy.percentile| / numpy.percentile: 1/128 < 0.8%
RELATIVE_ERROR = 1.0 / (1 << PRECISION_BITS)


def bucket_index(value: int) -> int:
    """The bucket of a non-negative integer."""
    if value < _EXACT:
        return value
    shift = value.bit_length() - PRECISION_BITS
    mantissa = value >> shift  # in [_HALF, _EXACT)
    return _EXACT + (shift - 1) * _HALF + (mantissa - _HALF)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The smallest and largest integer of a bucket."""
    if index < _EXACT:
        return index, index
    shift = (index - _EXACT) // _HALF + 1
    mantissa = (index - _EXACT) % _HALF + _HALF
    low = mantissa << shift
    return low, low + (1 << shift) - 1


def bucket_value(index: int) -> float:
    """The representative of a bucket: its midpoint."""
    low, high = bucket_bounds(index)
    return (low + high) / 2


class Histogram:
    """Counts per log-linear bucket; sparse, so an idle stage costs nothing."""

    __slots__ = ("_counts", "_total")

    def __init__(self, values: Iterable[int] = ()) -> None:
        self._counts: dict[int, int] = {}
        self._total = 0
        for v in values:
            self.add(v)

    def add(self, value: int, count: int = 1) -> None:
        if value < 0:
            raise ValueError(f"histogram values are non-negative microseconds, got {value}")
        if count <= 0:
            raise ValueError(f"count must be > 0, got {count}")
        i = bucket_index(int(value))
        self._counts[i] = self._counts.get(i, 0) + count
        self._total += count

    def merge(self, other: Histogram) -> Histogram:
        """Adds other's counts into this one (exact); returns self."""
        for i, n in other._counts.items():
            self._counts[i] = self._counts.get(i, 0) + n
        self._total += other._total
        return self

    def copy(self) -> Histogram:
        return Histogram().merge(self)

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        out = cls()
        for h in parts:
            out.merge(h)
        return out

    @property
    def count(self) -> int:
        return self._total

    def __len__(self) -> int:
        return self._total

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self._counts == other._counts

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Histogram(count={self._total}, buckets={len(self._counts)})"

    def quantile(self, q: float) -> float:
        """The q-quantile (q in [0, 1]) in microseconds, numpy's linear definition; 0 if empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        """Several quantiles in one pass over the buckets."""
        wanted = list(qs)
        for q in wanted:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self._total == 0:
            return [0.0 for _ in wanted]
        # ranks (0-based order statistics) each quantile needs: floor and ceil of q*(n-1)
        needed: set[int] = set()
        for q in wanted:
            pos = q * (self._total - 1)
            needed.update((math.floor(pos), math.ceil(pos)))
        at = self._values_at_ranks(sorted(needed))
        out = []
        for q in wanted:
            pos = q * (self._total - 1)
            lo, hi = math.floor(pos), math.ceil(pos)
            frac = pos - lo
            out.append(at[lo] + (at[hi] - at[lo]) * frac)
        return out

    def _values_at_ranks(self, ranks: list[int]) -> dict[int, float]:
        out: dict[int, float] = {}
        seen = 0
        r = 0
        for i in sorted(self._counts):
            seen += self._counts[i]
            while r < len(ranks) and ranks[r] < seen:
                out[ranks[r]] = bucket_value(i)
                r += 1
            if r == len(ranks):
                break
        return out

    def max(self) -> float:
        return bucket_value(max(self._counts)) if self._counts else 0.0

    def min(self) -> float:
        return bucket_value(min(self._counts)) if self._counts else 0.0
