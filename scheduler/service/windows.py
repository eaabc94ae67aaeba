"""Sliding windows of latency and load per pipeline and per stage, built from time buckets.

Every report lands in the bucket of its end time (`bucket_s` wide, wall clock, so reports from
many processes line up). A bucket holds a latency histogram, completions, errors, and arrivals
(counted in the bucket of the request's start, end - total). A window of `window_s` merges the
buckets that overlap the last `window_s` seconds; histograms merge exactly, so the windowed p99
is as good as one histogram over all the samples. Buckets older than `horizon_s` are dropped.

Keys are (pipeline, stage); stage "" holds the end-to-end query records of a pipeline.

A stage record that timed its GPU work (`gpu_us` > 0, the CUDA backend) also lands its host part
(`compute_us - gpu_us`: inputs stacked, outputs copied, the wait and the hand-offs) in a second
histogram, whose median (`host_parts`) is the `host_ms` the policies add to the profiles
(World.observe_host_parts).
`admin_stats` is one window as the admin Status reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from common.clock import wall_us
from protos import admin_pb2, plan_pb2, report_pb2
from scheduler.service.histogram import Histogram

Key = tuple[str, str]


@dataclass
class _Bucket:
    latency: Histogram = field(default_factory=Histogram)
    completions: int = 0
    arrivals: int = 0
    errors: int = 0
    # compute - GPU time of the records that timed their GPU work (stages, CUDA)
    host: Histogram = field(default_factory=Histogram)


@dataclass(frozen=True)
class WindowStat:
    """What one window saw for one pipeline (stage "") or stage. Latencies in milliseconds."""

    pipeline: str
    stage: str
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    arrival_qps: float
    service_qps: float
    errors: int


class Windows:
    """Per-key time buckets; `add` records, `snapshot` reads a window."""

    def __init__(
        self,
        bucket_s: float = 0.25,
        horizon_s: float = 120.0,
        clock_us: Callable[[], int] = wall_us,
    ) -> None:
        if bucket_s <= 0 or horizon_s < bucket_s:
            raise ValueError(f"need 0 < bucket_s <= horizon_s, got {bucket_s}, {horizon_s}")
        self.bucket_us = int(bucket_s * 1_000_000)
        self.horizon_us = int(horizon_s * 1_000_000)
        self.clock_us = clock_us
        self._buckets: dict[Key, dict[int, _Bucket]] = {}
        self.records_total = 0
        self.stale_total = 0

    def add(self, report: report_pb2.LatencyReport) -> None:
        stage = report.stage if report.kind == report_pb2.REPORT_KIND_STAGE else ""
        key = (report.pipeline, stage)
        total = max(0, report.total_us)
        now = self.clock_us()
        oldest = (now - self.horizon_us) // self.bucket_us
        end_slot = report.end_unix_us // self.bucket_us
        self.records_total += 1
        if end_slot < oldest:
            self.stale_total += 1
            return
        slots = self._buckets.setdefault(key, {})
        b = slots.get(end_slot)
        if b is None:
            b = slots[end_slot] = _Bucket()
        b.latency.add(total)
        b.completions += 1
        if report.status_code != 0:
            b.errors += 1
        if report.gpu_us > 0:
            b.host.add(max(0, report.compute_us - report.gpu_us))
        start_slot = (report.end_unix_us - total) // self.bucket_us
        if start_slot >= oldest:
            a = slots.get(start_slot)
            if a is None:
                a = slots[start_slot] = _Bucket()
            a.arrivals += 1

    def add_all(self, reports: Iterable[report_pb2.LatencyReport]) -> None:
        for r in reports:
            self.add(r)

    def prune(self) -> None:
        """Drops buckets older than the horizon (and keys left empty)."""
        oldest = (self.clock_us() - self.horizon_us) // self.bucket_us
        for key in list(self._buckets):
            slots = self._buckets[key]
            for s in [s for s in slots if s < oldest]:
                del slots[s]
            if not slots:
                del self._buckets[key]

    def keys(self) -> list[Key]:
        return sorted(self._buckets)

    def histogram(self, key: Key, window_s: float) -> Histogram:
        """The merged latency histogram of one key over the last window_s seconds."""
        first, last = self._slot_range(window_s)
        slots = self._buckets.get(key, {})
        return Histogram.merged(b.latency for s, b in slots.items() if first <= s <= last)

    def snapshot(self, window_s: float) -> dict[Key, WindowStat]:
        """Statistics per (pipeline, stage) over the last window_s seconds (keys with data only)."""
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.prune()
        now = self.clock_us()
        first, last = self._slot_range(window_s, now)
        # the window starts at a bucket boundary and ends now, inside the newest bucket
        span_s = max(1, now - first * self.bucket_us) / 1_000_000
        out: dict[Key, WindowStat] = {}
        for key, slots in self._buckets.items():
            hist = Histogram()
            completions = arrivals = errors = 0
            for s, b in slots.items():
                if first <= s <= last:
                    hist.merge(b.latency)
                    completions += b.completions
                    arrivals += b.arrivals
                    errors += b.errors
            if completions == 0 and arrivals == 0:
                continue
            p50, p95, p99 = hist.quantiles((0.5, 0.95, 0.99))
            out[key] = WindowStat(
                pipeline=key[0],
                stage=key[1],
                count=hist.count,
                p50_ms=p50 / 1000,
                p95_ms=p95 / 1000,
                p99_ms=p99 / 1000,
                arrival_qps=arrivals / span_s,
                service_qps=(completions - errors) / span_s,
                errors=errors,
            )
        return out

    def host_parts(self, window_s: float) -> dict[Key, tuple[float, int]]:
        """Per stage key with any: the median host part of a batch over the last window_s
        seconds, in ms, and how many records it is the median of. Only the host histograms are
        merged (a long window of every key's latencies costs tens of ms)."""
        first, last = self._slot_range(window_s)
        out: dict[Key, tuple[float, int]] = {}
        for key, slots in self._buckets.items():
            if not key[1]:
                continue
            host = Histogram.merged(b.host for s, b in slots.items() if first <= s <= last)
            if host.count:
                out[key] = (host.quantile(0.5) / 1000, host.count)
        return out

    def _slot_range(self, window_s: float, now: int | None = None) -> tuple[int, int]:
        now = self.clock_us() if now is None else now
        # from the bucket holding now - window_s (whole, so up to one bucket more) to now's
        return (now - int(window_s * 1_000_000)) // self.bucket_us, now // self.bucket_us


def admin_stats(
    s: WindowStat | None,
    pipeline: str,
    stage: str,
    replicas: list[plan_pb2.ReplicaPlan],
    qos_p99_ms: float,
) -> admin_pb2.WindowStats:
    """One row of the admin Status: a window (None: no data) beside its planned replicas."""
    out = admin_pb2.WindowStats(
        pipeline=pipeline,
        stage=stage,
        qos_p99_ms=qos_p99_ms,
        replicas=len(replicas),
        sm_percent=sum(r.sm_percent for r in replicas),
    )
    if s is not None:
        out.count = s.count
        out.p50_ms, out.p95_ms, out.p99_ms = s.p50_ms, s.p95_ms, s.p99_ms
        out.arrival_qps, out.service_qps, out.errors = s.arrival_qps, s.service_qps, s.errors
    return out
