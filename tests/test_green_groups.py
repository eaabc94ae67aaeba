"""Scheduler-side SM-group assignment for green mode: disjoint, stable, refuses oversubscription."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from scheduler.policy import GpuInfo
from scheduler.search.groups import (
    GroupSplit,
    assign_groups,
    assign_percent,
    check_assignment,
    groups_to_percent,
    moved_groups,
    percent_to_groups,
    sms_to_groups,
)

H100 = GroupSplit(n_groups=15, sms_per_group=8, total_sms=132)


@st.composite
def requests_within(draw: st.DrawFn, max_groups: int = 20) -> tuple[int, dict[str, int]]:
    n = draw(st.integers(1, max_groups))
    sizes = draw(st.lists(st.integers(1, n), max_size=n))
    out: dict[str, int] = {}
    left = n
    for i, size in enumerate(sizes):
        if size > left:
            break
        out[f"r{i}"] = size
        left -= size
    return n, out


@st.composite
def plan_change(draw: st.DrawFn) -> tuple[int, dict[str, tuple[int, ...]], dict[str, int]]:
    """A GPU, a valid current assignment on it, and new requests that fit."""
    n, first = draw(requests_within())
    current = assign_groups(first, n)
    # shuffle the holdings so the current assignment is not the allocator's own layout
    perm = draw(st.permutations(range(n)))
    current = {r: tuple(sorted(perm[g] for g in gs)) for r, gs in current.items()}
    new: dict[str, int] = {}
    left = n
    for r in sorted(current):
        choice = draw(st.sampled_from(["keep", "drop", "resize"]))
        size = len(current[r]) if choice == "keep" else draw(st.integers(1, n))
        if choice != "drop" and size <= left:
            new[r] = size
            left -= size
    extra = draw(st.lists(st.integers(1, n), max_size=3))
    for i, size in enumerate(extra):
        if size <= left:
            new[f"new{i}"] = size
            left -= size
    return n, current, new


@settings(max_examples=300, deadline=None)
@given(requests_within())
def test_assignment_is_disjoint_exact_and_in_range(case):
    n, requests = case
    out = assign_groups(requests, n)
    check_assignment(out, n)
    assert set(out) == set(requests)
    assert all(len(out[r]) == requests[r] for r in requests)


@settings(max_examples=300, deadline=None)
@given(plan_change())
def test_replicas_keep_their_groups_across_a_change(case):
    n, current, requests = case
    out = assign_groups(requests, n, current)
    check_assignment(out, n)
    assert all(len(out[r]) == requests[r] for r in requests)
    for r, size in requests.items():
        if r not in current:
            continue
        before, after = set(current[r]), set(out[r])
        if size == len(before):
            assert after == before
        elif size < len(before):
            assert after < before
        else:
            assert after > before
    # nobody who stays loses a group it still needs
    assert moved_groups(current, out) == sum(
        max(0, len(current[r]) - requests[r]) for r in requests if r in current
    )


def test_unchanged_replica_keeps_groups_when_a_neighbour_leaves_and_a_new_one_comes():
    current = {"a": (0, 1, 2, 3, 4, 5), "b": (6, 7, 8, 9, 10, 11)}
    out = assign_groups({"b": 6, "c": 9}, 15, current)
    assert out["b"] == current["b"]
    assert set(out["c"]) == set(range(15)) - set(current["b"])


def test_new_replica_takes_the_best_fitting_contiguous_run():
    current = {"a": (0,), "b": (4, 5)}
    # free runs: 1..3 (3 groups) and 6..14 (9 groups); c needs 3 -> the run it fills exactly
    out = assign_groups({"a": 1, "b": 2, "c": 3, "d": 9}, 15, current)
    assert out["c"] == (1, 2, 3)
    assert out["d"] == tuple(range(6, 15))


def test_growing_replica_grows_next_to_its_groups():
    out = assign_groups({"a": 4, "b": 2}, 15, {"a": (5, 6), "b": (0, 1)})
    assert out["b"] == (0, 1)
    assert out["a"] in {(3, 4, 5, 6), (4, 5, 6, 7), (5, 6, 7, 8)}


def test_shrinking_replica_keeps_a_tight_subset():
    out = assign_groups({"a": 3}, 15, {"a": (0, 4, 5, 6, 12)})
    assert out["a"] == (4, 5, 6)


def test_oversubscription_is_refused_with_invalid_argument():
    with pytest.raises(InvalidArgument) as info:
        assign_groups({"a": 8, "b": 8}, 15)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        assign_groups({"a": 0}, 15)
    with pytest.raises(InvalidArgument):
        assign_percent({"a": 60.0, "b": 50.0}, H100)  # 60% -> 10 groups, 50% -> 8: 18 > 15


def test_bad_current_groups_are_dropped_not_trusted():
    out = assign_groups({"a": 2, "b": 2}, 4, {"a": (0, 1, 9), "b": (1, 2)})
    check_assignment(out, 4)
    assert out["a"] == (0, 1)
    assert 2 in out["b"]


def test_check_assignment_catches_overlap_and_range():
    with pytest.raises(InvalidArgument):
        check_assignment({"a": (0, 1), "b": (1, 2)}, 15)
    with pytest.raises(InvalidArgument):
        check_assignment({"a": (15,)}, 15)
    with pytest.raises(InvalidArgument):
        check_assignment({"a": ()}, 15)


def test_percent_rounds_to_nearest_group_with_at_least_one():
    assert percent_to_groups(50.0, H100) == 8  # 66 SMs -> 8.25 groups
    assert percent_to_groups(1.0, H100) == 1
    assert percent_to_groups(100.0, H100) == 15  # the 12 left-over SMs are not a group
    assert percent_to_groups(30.0, H100) == 5  # 39.6 SMs -> 4.95 groups
    for bad in (0.0, -5.0, 100.5, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument):
            percent_to_groups(bad, H100)


@given(st.floats(0.01, 100.0), st.floats(0.01, 100.0))
def test_percent_to_groups_is_monotone_and_bounded(a, b):
    lo, hi = sorted((a, b))
    assert 1 <= percent_to_groups(lo, H100) <= percent_to_groups(hi, H100) <= H100.n_groups


def test_sms_round_up_and_are_bounded():
    assert sms_to_groups(8, H100) == 1
    assert sms_to_groups(9, H100) == 2
    assert sms_to_groups(132, H100) == 15
    for bad in (0, 133, True, 1.5):
        with pytest.raises(InvalidArgument):
            sms_to_groups(bad, H100)  # type: ignore[arg-type]
    assert groups_to_percent(15, H100) == pytest.approx(120 / 132 * 100)


def test_split_of_gpu_needs_green_mode():
    gpu = GpuInfo(index=0, sm_count=132, memory_bytes=80 << 30, sm_groups=15, sms_per_group=8)
    assert GroupSplit.of_gpu(gpu) == H100
    with pytest.raises(InvalidArgument):
        GroupSplit.of_gpu(GpuInfo(index=1, sm_count=132, memory_bytes=80 << 30))
    with pytest.raises(InvalidArgument):
        GroupSplit(n_groups=20, sms_per_group=8, total_sms=132)
