"""Stage profiles: what one stage costs alone, and how it behaves beside others.

A profile is measured once per device by `python -m services.profiler` (or generated from a
roofline model, marked `synthetic`) and is the only thing the predictor knows about a stage:

- `latency_ms[share%][batch]`: solo batch latency on that share of the SMs;
- memory: weights plus activations per item (a replica needs `weights + batch * per_item`);
- `sensitivity`: slowdown factor (>= 1) at each co-runner bandwidth-pressure level;
- `pressure`: the pressure this stage exerts at full share and its largest batch, on the same
  scale (achieved memory bandwidth over the device peak, so a co-runner at pressure 0.5 is a
  stream that takes half the device bandwidth);
- `output_bytes_per_item`: what one item hands to the next stage (for copy and wire costs).

Interpolation is monotone: the measured table is first made non-increasing in share and
non-decreasing in batch (measurement noise must not make more SMs look slower), then
interpolated log-linearly in share and linearly in batch. Below the smallest measured share
latency grows as 1/share (never optimistic); above the largest, it stays flat.

A profile reads and writes its per-stage JSON object (`to_json`, `from_json`); whole sets of
profiles (documents on disk, the bundled default set, Redis) are `profilestore`'s.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from common.errors import InvalidArgument


@dataclass(frozen=True)
class StageProfile:
    pipeline: str
    stage: str
    shares: tuple[float, ...]  # SM percent, ascending
    batches: tuple[int, ...]  # ascending
    latency_ms: tuple[tuple[float, ...], ...]  # [share index][batch index], solo
    weights_bytes: int
    activation_bytes_per_item: int
    pressure_levels: tuple[float, ...]  # ascending, starting at 0
    slowdown: tuple[float, ...]  # factor >= 1 at each pressure level
    pressure: float
    output_bytes_per_item: int = 0
    # what the measured pressure is multiplied by to price this stage as a co-runner: fitted on
    # real co-locations (loadgen.contention_fit), since a stage's pull on a copy kernel's
    # bandwidth understates what it does to a compute-heavy neighbour
    pressure_scale: float = 1.0
    # "pow2" where the stage replays CUDA graphs: a batch of n runs padded to the next power of
    # two, so it costs what that bucket costs (batch 12 as much as 16), not a point between
    batch_buckets: str = ""
    device: str = ""
    date: str = ""
    synthetic: bool = False
    # online correction (measured p99 / predicted), set by bias.BiasCorrector; not stored
    bias: float = 1.0
    # the host's part of a batch as a replica runs it, added to every latency (the node's, not
    # the profile's: `with_host_ms`, from the scheduler's `stage_host_ms`; not stored). A profile
    # is the GPU time of `infer` alone (CUDA events); a replica's batch is also its inputs
    # stacked, its outputs copied to their buffers, a blocking-sync wait and two thread
    # hand-offs. On the H100 host the mesh's stages took 0.25-2.5 ms (median 0.97) longer a batch
    # of one than their profiles, at 150 qps (docs/results/stage-host-fit-h100-1731d70.md).
    host_ms: float = 0.0
    _table: tuple[tuple[float, ...], ...] = field(default=(), repr=False, compare=False)
    _memo: dict[tuple[float, float], float] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        _validate(self)
        object.__setattr__(self, "_table", monotone_table(self.latency_ms))
        object.__setattr__(self, "_memo", {})

    @property
    def key(self) -> str:
        return f"{self.pipeline}/{self.stage}"

    @property
    def max_batch(self) -> int:
        return self.batches[-1]

    def memory_bytes(self, batch: int) -> int:
        return self.weights_bytes + batch * self.activation_bytes_per_item

    def latency(self, share: float, batch: float) -> float:
        """Solo batch latency in ms at `share` percent of the SMs and `batch` items (>= 1)."""
        memo = self._memo.get((share, batch))
        if memo is not None:
            return memo
        if share <= 0:
            raise InvalidArgument(f"{self.key}: share must be > 0, got {share}")
        value = self._latency(share, self.padded(batch)) + self.host_ms
        if len(self._memo) < 100_000:
            self._memo[(share, batch)] = value
        return value

    def _latency(self, share: float, batch: float) -> float:
        shares = self.shares
        if share <= shares[0]:
            return self._at_batch(0, batch) * shares[0] / share
        if share >= shares[-1]:
            return self._at_batch(len(shares) - 1, batch)
        j = bisect.bisect_right(shares, share) - 1
        t = math.log(share / shares[j]) / math.log(shares[j + 1] / shares[j])
        lo, hi = self._at_batch(j, batch), self._at_batch(j + 1, batch)
        return math.exp((1 - t) * math.log(lo) + t * math.log(hi))

    def padded(self, batch: float) -> float:
        """The batch size a batch of `batch` items costs. With power-of-two buckets a fractional
        (mean) batch moves linearly between the buckets of its neighbouring whole sizes, so the
        cost stays continuous and non-decreasing in the batch."""
        if self.batch_buckets != "pow2" or batch <= 1:
            return batch
        lo, hi = math.floor(batch), math.ceil(batch)
        blo, bhi = _pow2(lo), _pow2(hi)
        return blo if lo == hi else blo + (batch - lo) * (bhi - blo)

    def padded_many(self, batch: np.ndarray) -> np.ndarray:
        """`padded` elementwise."""
        batch = np.asarray(batch, dtype=float)
        return pow2_padded(batch) if self.batch_buckets == "pow2" else batch

    def latency_many(self, share: np.ndarray, batch: np.ndarray) -> np.ndarray:
        """`latency` elementwise over arrays (batches within the measured range), same formula."""
        return self.service_at(share)(batch)

    def service_at(self, share: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Batch -> latency for a fixed array of shares: the share part is worked out once."""
        shares = np.asarray(self.shares)
        bs = np.asarray(self.batches, dtype=float)
        table = np.log(np.asarray(self._table))
        share = np.asarray(share, dtype=float)
        ns, nb = len(shares), len(bs)
        log_scale = np.log(np.maximum(shares[0] / share, 1.0))
        j = np.minimum(np.searchsorted(shares, share, side="right") - 1, max(ns - 2, 0))
        j = np.maximum(j, 0)
        j1 = np.minimum(j + 1, ns - 1)
        t = np.zeros_like(share)
        if ns > 1:
            t = np.log(share / shares[j]) / np.log(shares[j1] / shares[j])
            t = np.minimum(np.maximum(t, 0.0), 1.0)
        lin = np.exp(table)
        lo_row, hi_row = lin[j], lin[j1]  # (n, nb)
        host_ms = self.host_ms
        rows = np.arange(len(share))

        def latency(batch: np.ndarray) -> np.ndarray:
            batch = self.padded_many(batch)
            if nb == 1:
                lo, hi = lo_row[:, 0], hi_row[:, 0]
            else:
                k = np.minimum(np.searchsorted(bs, batch, side="right") - 1, nb - 2)
                k = np.maximum(k, 0)
                w = np.minimum(np.maximum((batch - bs[k]) / (bs[k + 1] - bs[k]), 0.0), 1.0)
                lo = lo_row[rows, k] * (1 - w) + lo_row[rows, k + 1] * w
                hi = hi_row[rows, k] * (1 - w) + hi_row[rows, k + 1] * w
            out = np.exp((1 - t) * np.log(lo) + t * np.log(hi) + log_scale) + host_ms
            return out  # type: ignore[no-any-return]

        return latency

    def _at_batch(self, i: int, batch: float) -> float:
        bs, row = self.batches, self._table[i]
        if batch <= bs[0]:
            return row[0]
        if batch >= bs[-1]:
            if len(bs) == 1:
                return row[0] * batch / bs[0]
            slope = (row[-1] - row[-2]) / (bs[-1] - bs[-2])
            return row[-1] + slope * (batch - bs[-1])
        j = bisect.bisect_right(bs, batch) - 1
        t = (batch - bs[j]) / (bs[j + 1] - bs[j])
        return (1 - t) * row[j] + t * row[j + 1]

    def throughput(self, share: float, batch: float) -> float:
        """Solo items per second with back-to-back batches of `batch`."""
        return 1000.0 * batch / self.latency(share, batch)

    @property
    def exerted_pressure(self) -> float:
        """The pressure this stage puts on its co-runners, as the predictor prices it."""
        return self.pressure * self.pressure_scale

    def slowdown_at(self, pressure: float) -> float:
        """Slowdown factor (>= 1) beside co-runners whose pressures sum to `pressure`."""
        lv, sd = self.pressure_levels, self.slowdown
        if pressure <= lv[0]:
            return sd[0]
        if pressure >= lv[-1]:
            slope = (sd[-1] - sd[-2]) / (lv[-1] - lv[-2]) if len(lv) > 1 else 0.0
            return sd[-1] + slope * (pressure - lv[-1])
        j = bisect.bisect_right(lv, pressure) - 1
        t = (pressure - lv[j]) / (lv[j + 1] - lv[j])
        return (1 - t) * sd[j] + t * sd[j + 1]

    def to_json(self) -> dict[str, Any]:
        return {
            "shares": list(self.shares),
            "batches": list(self.batches),
            "latency_ms": {
                number_key(s): {str(b): round(v, 6) for b, v in zip(self.batches, row, strict=True)}
                for s, row in zip(self.shares, self.latency_ms, strict=True)
            },
            "weights_bytes": self.weights_bytes,
            "activation_bytes_per_item": self.activation_bytes_per_item,
            "output_bytes_per_item": self.output_bytes_per_item,
            "sensitivity": {
                "pressure": list(self.pressure_levels),
                "slowdown": [round(v, 6) for v in self.slowdown],
            },
            "pressure": round(self.pressure, 6),
            **({"pressure_scale": self.pressure_scale} if self.pressure_scale != 1.0 else {}),
            **({"batch_buckets": self.batch_buckets} if self.batch_buckets else {}),
        }

    @classmethod
    def from_json(
        cls, key: str, obj: Mapping[str, Any], *, device: str = "", date: str = ""
    ) -> StageProfile:
        pipeline, sep, stage = key.partition("/")
        if not sep or not pipeline or not stage:
            raise InvalidArgument(f"profile key {key!r} is not <pipeline>/<stage>")
        try:
            table = obj["latency_ms"]
            shares = sorted(float(s) for s in table)
            batches = sorted({int(b) for row in table.values() for b in row})
            latency = tuple(
                tuple(float(_lookup(table, s)[str(b)]) for b in batches) for s in shares
            )
            sens = obj["sensitivity"]
            return cls(
                pipeline=pipeline,
                stage=stage,
                shares=tuple(shares),
                batches=tuple(batches),
                latency_ms=latency,
                weights_bytes=int(obj["weights_bytes"]),
                activation_bytes_per_item=int(obj["activation_bytes_per_item"]),
                output_bytes_per_item=int(obj.get("output_bytes_per_item", 0)),
                pressure_levels=tuple(float(p) for p in sens["pressure"]),
                slowdown=tuple(float(v) for v in sens["slowdown"]),
                pressure=float(obj["pressure"]),
                pressure_scale=float(obj.get("pressure_scale", 1.0)),
                batch_buckets=str(obj.get("batch_buckets", "")),
                device=str(obj.get("device", device)),
                date=str(obj.get("date", date)),
                synthetic=bool(obj.get("synthetic", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidArgument(f"profile {key!r} is malformed: {e!r}") from e

    def with_bias(self, bias: float) -> StageProfile:
        return replace(self, bias=bias)

    def with_host_ms(self, host_ms: float) -> StageProfile:
        if not (math.isfinite(host_ms) and host_ms >= 0):
            raise InvalidArgument(f"{self.key}: host_ms must be >= 0, got {host_ms}")
        return self if host_ms == self.host_ms else replace(self, host_ms=host_ms)


def number_key(x: float) -> str:
    """A share or batch as a JSON key: "50" for 50.0, "12.5" for 12.5."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _lookup(table: Mapping[str, Any], share: float) -> Mapping[str, Any]:
    for k, row in table.items():
        if float(k) == share:
            return row  # type: ignore[no-any-return]
    raise KeyError(share)


def _validate(p: StageProfile) -> None:
    where = f"profile {p.pipeline}/{p.stage}"
    if not p.shares or not p.batches:
        raise InvalidArgument(f"{where}: needs at least one share and one batch")
    if list(p.shares) != sorted(set(p.shares)) or p.shares[0] <= 0 or p.shares[-1] > 100:
        raise InvalidArgument(f"{where}: shares must be ascending, distinct, in (0, 100]")
    if list(p.batches) != sorted(set(p.batches)) or p.batches[0] < 1:
        raise InvalidArgument(f"{where}: batches must be ascending, distinct, >= 1")
    if len(p.latency_ms) != len(p.shares) or any(len(r) != len(p.batches) for r in p.latency_ms):
        raise InvalidArgument(f"{where}: latency table is not shares x batches (missing points)")
    if any(not (v > 0 and math.isfinite(v)) for r in p.latency_ms for v in r):
        raise InvalidArgument(f"{where}: latencies must be finite and > 0")
    lv = p.pressure_levels
    if not lv or len(lv) != len(p.slowdown) or list(lv) != sorted(set(lv)) or lv[0] < 0:
        raise InvalidArgument(f"{where}: sensitivity levels must be ascending, one slowdown each")
    if any(not (s >= 1.0 and math.isfinite(s)) for s in p.slowdown):
        raise InvalidArgument(f"{where}: slowdown factors must be finite and >= 1")
    if any(b < a for a, b in zip(p.slowdown, p.slowdown[1:], strict=False)):
        raise InvalidArgument(f"{where}: slowdown must not fall as pressure rises")
    if not (p.pressure >= 0 and math.isfinite(p.pressure)):
        raise InvalidArgument(f"{where}: pressure must be finite and >= 0")
    if not (p.pressure_scale > 0 and math.isfinite(p.pressure_scale)):
        raise InvalidArgument(f"{where}: pressure_scale must be finite and > 0")
    if p.batch_buckets not in ("", "pow2"):
        raise InvalidArgument(f"{where}: batch_buckets must be 'pow2' or absent")
    if min(p.weights_bytes, p.activation_bytes_per_item, p.output_bytes_per_item) < 0:
        raise InvalidArgument(f"{where}: byte counts must be >= 0")
    if not (p.bias > 0 and math.isfinite(p.bias)):
        raise InvalidArgument(f"{where}: bias must be finite and > 0")


def _pow2(n: int) -> int:
    """The power-of-two bucket a whole batch of n >= 1 runs in (services/models/graphs.bucket)."""
    return 1 << (max(1, n) - 1).bit_length()


def _pow2_many(n: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.exp2(np.ceil(np.log2(np.maximum(n, 1.0)) - 1e-9))
    return out


def pow2_padded(batch: np.ndarray) -> np.ndarray:
    """`StageProfile.padded` of a power-of-two-bucketed stage, elementwise."""
    b = np.maximum(batch, 1.0)
    lo, hi = np.floor(b), np.ceil(b)
    blo, bhi = _pow2_many(lo), _pow2_many(hi)
    return np.where(batch <= 1, batch, blo + (b - lo) * (bhi - blo))


def monotone_table(table: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """Non-decreasing along batch, then non-increasing along share (from the top share down)."""
    rows = [list(r) for r in table]
    for r in rows:
        for j in range(1, len(r)):
            r[j] = max(r[j], r[j - 1])
    for i in range(len(rows) - 2, -1, -1):
        rows[i] = [max(a, b) for a, b in zip(rows[i], rows[i + 1], strict=True)]
    return tuple(tuple(r) for r in rows)


def as_profiles(raw: Mapping[str, Any]) -> dict[str, StageProfile]:
    """PolicyInput.profiles as StageProfiles (values may already be profiles, or JSON objects)."""
    out = {}
    for key, value in raw.items():
        out[key] = value if isinstance(value, StageProfile) else StageProfile.from_json(key, value)
    return out
