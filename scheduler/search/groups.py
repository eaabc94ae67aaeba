"""Disjoint SM-group assignment on one GPU, for nodes in green-context mode.

In green mode each GPU's SMs are split once into `n_groups` equal groups (15 groups of 8 SMs on
an H100, 12 SMs left unused) and every replica on the GPU holds a set of group indices that no
other replica holds. A policy thinks in shares (percent of the GPU, or SMs); this module turns
shares into group counts and counts into index sets.

Rounding: a percentage is of the device's SMs (as an MPS percentage is) and goes to the nearest
whole group; an SM count is a floor and rounds up. Either way a replica gets at least one group,
and at most all of them (asking for more than the device has is an error; asking for more than
the split can give, e.g. 100% when 12 SMs are left over, gets every group).

Assignment keeps replicas where they are: a replica whose size is unchanged keeps its groups, a
shrinking one keeps a contiguous-as-possible subset of them, a growing one keeps all of them and
grows next to them; new replicas take the best-fitting contiguous free run. Moving a group means
its old holder must drain it first, so fewer moves is a cheaper plan change.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import InvalidArgument
from scheduler.policy import GpuInfo

log = logging.getLogger(__name__)

Assignment = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class GroupSplit:
    """One GPU's split: `n_groups` groups of `sms_per_group` SMs, of `total_sms` on the device."""

    n_groups: int
    sms_per_group: int
    total_sms: int = 0

    def __post_init__(self) -> None:
        if self.n_groups < 1 or self.sms_per_group < 1:
            raise InvalidArgument(
                f"a split needs >= 1 group of >= 1 SM, got {self.n_groups} x {self.sms_per_group}"
            )
        if self.total_sms and self.total_sms < self.n_groups * self.sms_per_group:
            raise InvalidArgument(
                f"split of {self.n_groups} x {self.sms_per_group} SMs exceeds the device's "
                f"{self.total_sms}"
            )

    @property
    def device_sms(self) -> int:
        """SMs on the device (the groups' SMs when the total is unknown)."""
        return self.total_sms or self.n_groups * self.sms_per_group

    @classmethod
    def of_gpu(cls, gpu: GpuInfo) -> GroupSplit:
        if gpu.sm_groups < 1 or gpu.sms_per_group < 1:
            raise InvalidArgument(f"GPU {gpu.index} has no green-context split (not in green mode)")
        return cls(gpu.sm_groups, gpu.sms_per_group, gpu.sm_count)


def percent_to_groups(pct: float, split: GroupSplit) -> int:
    """Groups for `pct` percent of the device's SMs: nearest whole group, at least one."""
    if not math.isfinite(pct) or not 0 < pct <= 100:
        raise InvalidArgument(f"SM share must be in (0, 100] percent, got {pct!r}")
    groups = math.floor(pct / 100 * split.device_sms / split.sms_per_group + 0.5)
    return min(max(groups, 1), split.n_groups)


def sms_to_groups(sms: int, split: GroupSplit) -> int:
    """Groups holding at least `sms` SMs (as many as the split has, at most)."""
    if isinstance(sms, bool) or not isinstance(sms, numbers.Integral):
        raise InvalidArgument(f"SM share must be a whole number of SMs, got {sms!r}")
    if not 0 < sms <= split.device_sms:
        raise InvalidArgument(f"SM share must be 1..{split.device_sms} SMs, got {sms!r}")
    return min(-(-int(sms) // split.sms_per_group), split.n_groups)


def groups_to_percent(groups: int, split: GroupSplit) -> float:
    """The share `groups` groups really give, in percent of the device's SMs."""
    return 100.0 * groups * split.sms_per_group / split.device_sms


def check_assignment(assignment: Mapping[str, Sequence[int]], n_groups: int) -> None:
    """INVALID_ARGUMENT unless every replica holds >= 1 in-range group and none is shared."""
    owner: dict[int, str] = {}
    for replica, groups in assignment.items():
        if not groups:
            raise InvalidArgument(f"replica {replica!r} holds no SM group")
        for g in groups:
            if not 0 <= g < n_groups:
                raise InvalidArgument(f"replica {replica!r}: group {g} outside 0..{n_groups - 1}")
            if g in owner:
                raise InvalidArgument(f"group {g} given to both {owner[g]!r} and {replica!r}")
            owner[g] = replica


def moved_groups(before: Mapping[str, Sequence[int]], after: Mapping[str, Sequence[int]]) -> int:
    """Groups that replicas present in both assignments had before and hold no longer."""
    return sum(len(set(before[r]) - set(after[r])) for r in before.keys() & after.keys())


def assign_groups(
    requests: Mapping[str, int],
    n_groups: int,
    current: Mapping[str, Sequence[int]] | None = None,
) -> Assignment:
    """Disjoint group indices for each replica of one GPU, `requests[replica]` groups each.

    `current` is the assignment in force (replicas absent from `requests` give theirs back).
    Raises INVALID_ARGUMENT when a request is < 1 or the requests add up to more than
    `n_groups`.
    """
    if n_groups < 1:
        raise InvalidArgument(f"n_groups must be >= 1, got {n_groups}")
    for replica, want in requests.items():
        if isinstance(want, bool) or not isinstance(want, numbers.Integral) or want < 1:
            raise InvalidArgument(f"replica {replica!r} must ask for >= 1 group, got {want!r}")
    requests = {r: int(n) for r, n in requests.items()}
    total = sum(requests.values())
    if total > n_groups:
        raise InvalidArgument(
            f"replicas ask for {total} SM groups, the GPU has {n_groups}: "
            + ", ".join(f"{r}={n}" for r, n in sorted(requests.items()))
        )
    held = _valid_current(current or {}, requests, n_groups)
    free = set(range(n_groups))
    out: dict[str, set[int]] = {}
    # 1. replicas already placed keep what they need of what they hold
    for replica, groups in held.items():
        keep = _tightest(sorted(groups), requests[replica])
        out[replica] = set(keep)
        free -= out[replica]
    # 2. growing replicas grow next to their groups
    for replica in sorted(held):
        mine = out[replica]
        for _ in range(requests[replica] - len(mine)):
            g = min(free, key=lambda f: (min(abs(f - m) for m in mine), f))
            mine.add(g)
            free.discard(g)
    # 3. new replicas, largest first, into the best-fitting free run
    new = sorted((r for r in requests if r not in held), key=lambda r: (-requests[r], r))
    for replica in new:
        taken = _best_fit(free, requests[replica])
        out[replica] = set(taken)
        free -= out[replica]
    return {r: tuple(sorted(out[r])) for r in requests}


def assign_percent(
    shares_pct: Mapping[str, float],
    split: GroupSplit,
    current: Mapping[str, Sequence[int]] | None = None,
) -> Assignment:
    """`assign_groups` for shares given in percent of the device."""
    requests = {r: percent_to_groups(p, split) for r, p in shares_pct.items()}
    return assign_groups(requests, split.n_groups, current)


def _valid_current(
    current: Mapping[str, Sequence[int]], requests: Mapping[str, int], n_groups: int
) -> dict[str, set[int]]:
    """The current holdings of requested replicas, in range and disjoint (first holder wins)."""
    claimed: set[int] = set()
    out: dict[str, set[int]] = {}
    for replica in sorted(current):
        if replica not in requests:
            continue
        groups = {g for g in current[replica] if 0 <= g < n_groups}
        outside = sorted({g for g in current[replica]} - groups)
        if outside:
            log.warning("replica %s held groups %s outside the split: dropped", replica, outside)
        if groups & claimed:
            log.warning("replica %s shared groups %s: dropped", replica, sorted(groups & claimed))
            groups -= claimed
        if groups:
            out[replica] = groups
            claimed |= groups
    return out


def _tightest(groups: list[int], want: int) -> list[int]:
    """The `want` of the sorted `groups` with the smallest span (all of them if fewer)."""
    if len(groups) <= want:
        return groups
    start = min(range(len(groups) - want + 1), key=lambda i: (groups[i + want - 1] - groups[i], i))
    return groups[start : start + want]


def _runs(free: set[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for g in sorted(free):
        if runs and runs[-1][-1] == g - 1:
            runs[-1].append(g)
        else:
            runs.append([g])
    return runs


def _best_fit(free: set[int], want: int) -> list[int]:
    """`want` free groups: the shortest free run that holds them all, else the longest runs."""
    runs = _runs(free)
    fitting = [run for run in runs if len(run) >= want]
    if fitting:
        return min(fitting, key=lambda run: (len(run), run[0]))[:want]
    taken: list[int] = []
    for run in sorted(runs, key=lambda run: (-len(run), run[0])):
        taken += run[: want - len(taken)]
        if len(taken) == want:
            break
    return taken
