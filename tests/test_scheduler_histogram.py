"""The log-linear histogram and the windows built on it, against numpy over the raw samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import report_pb2
from scheduler.service.histogram import RELATIVE_ERROR, Histogram, bucket_bounds, bucket_index
from scheduler.service.windows import Windows

samples = st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=400)


@given(st.integers(min_value=0, max_value=10**12))
def test_bucket_contains_value_and_is_narrow(v: int) -> None:
    low, high = bucket_bounds(bucket_index(v))
    assert low <= v <= high
    # the midpoint is within the stated error of every value in the bucket
    assert abs((low + high) / 2 - v) <= RELATIVE_ERROR * v


def test_buckets_are_contiguous() -> None:
    prev_high = -1
    for i in range(5000):
        low, high = bucket_bounds(i)
        assert low == prev_high + 1
        assert bucket_index(low) == i and bucket_index(high) == i
        prev_high = high


@given(samples, samples)
def test_merge_is_exact(a: list[int], b: list[int]) -> None:
    merged = Histogram(a).merge(Histogram(b))
    assert merged == Histogram(a + b)
    assert merged.count == len(a) + len(b)
    assert merged.quantiles((0.5, 0.99)) == Histogram(a + b).quantiles((0.5, 0.99))


@given(samples, st.sampled_from([0.0, 0.5, 0.95, 0.99, 1.0]))
def test_quantile_within_relative_error_of_numpy(values: list[int], q: float) -> None:
    got = Histogram(values).quantile(q)
    want = float(np.percentile(np.array(values, dtype=np.float64), q * 100))
    assert abs(got - want) <= RELATIVE_ERROR * want + 1e-9


def test_rejects_negative_and_empty_is_zero() -> None:
    with pytest.raises(ValueError):
        Histogram().add(-1)
    assert Histogram().quantile(0.99) == 0.0
    with pytest.raises(ValueError):
        Histogram([1]).quantile(1.5)


class Clock:
    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


def report(
    end_us: int, total_us: int, stage: str = "", status: int = 0
) -> report_pb2.LatencyReport:
    kind = report_pb2.REPORT_KIND_STAGE if stage else report_pb2.REPORT_KIND_QUERY
    return report_pb2.LatencyReport(
        kind=kind, pipeline="p", stage=stage, end_unix_us=end_us, total_us=total_us,
        status_code=status,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 9_999_999), st.integers(0, 5_000_000)), min_size=1, max_size=300
    )
)
def test_windowed_p99_matches_numpy(points: list[tuple[int, int]]) -> None:
    """Samples spread over 10 s land in many buckets; the window's p99 is numpy's within error."""
    now = 1_700_000_000_000_000
    clock = Clock(now)
    w = Windows(bucket_s=0.25, horizon_s=60, clock_us=clock)
    for offset, total in points:
        w.add(report(now - offset, total))
    stat = w.snapshot(window_s=11)[("p", "")]
    values = np.array([t for _, t in points], dtype=np.float64)
    assert stat.count == len(points)
    for got, q in ((stat.p50_ms, 50), (stat.p95_ms, 95), (stat.p99_ms, 99)):
        want = float(np.percentile(values, q)) / 1000
        assert abs(got - want) <= RELATIVE_ERROR * want + 1e-12


def test_window_rates_errors_and_expiry() -> None:
    now = 1_700_000_000_000_000
    clock = Clock(now)
    w = Windows(bucket_s=0.5, horizon_s=30, clock_us=clock)
    # 100 stage requests over the last 5 s, 10 of them failed, each 1 ms long
    for i in range(100):
        w.add(report(now - 50_000 * i - 1, 1000, stage="s", status=4 if i % 10 == 0 else 0))
    # an old one, outside a 5 s window but inside the horizon
    w.add(report(now - 20_000_000, 9_000_000, stage="s"))
    stat = w.snapshot(window_s=5)[("p", "s")]
    assert stat.count == 100
    assert stat.errors == 10
    assert stat.service_qps == pytest.approx(90 / 5, rel=0.15)
    assert stat.arrival_qps == pytest.approx(100 / 5, rel=0.15)
    assert stat.p99_ms == pytest.approx(1.0, rel=RELATIVE_ERROR)
    # the old sample is in a wider window, then gone once the horizon passes it
    assert w.snapshot(window_s=25)[("p", "s")].count == 101
    clock.now_us += 40_000_000
    assert w.snapshot(window_s=25) == {}
    assert w.keys() == []
    # a record already older than the horizon is counted as stale, not stored
    w.add(report(clock.now_us - 31_000_000, 10, stage="s"))
    assert w.stale_total == 1 and w.keys() == []
