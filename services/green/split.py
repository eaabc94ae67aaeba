"""The split of a device's SMs into equal groups, the unit of a green-context share.

`cuDevSmResourceSplitByCount(minCount=8)` on an H100 gives 15 groups of 8 SMs and 12 SMs left
over. The scheduler hands replicas disjoint group *indices*; each replica process repeats the
split and builds its green context on its indices. That only isolates replicas if every process
gets the same split, group for group, which is observed but not documented: `verify_split`
fingerprints the split from inside one process (counts, the device's UUID and, by running a
kernel on each group, the SM ids each group really uses), and `verify_across_processes` runs
it in fresh processes and refuses to go on when they disagree. The agent calls it at start.

Groups from one split may be combined into one green context; groups from different split
calls may not, so a process keeps its `DeviceSplit` for its whole life.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import FailedPrecondition, InvalidArgument

from .driver import call, driver

# Hopper's granularity: a split by 8 SMs gives equal groups that may run large clusters.
DEFAULT_SMS_PER_GROUP = 8


@dataclass(frozen=True)
class SmSplit:
    """What one process's split of device `device` looks like (plain data, comparable)."""

    device: int
    uuid: str
    total_sms: int
    min_count: int
    group_sms: tuple[int, ...]
    remainder_sms: int

    @property
    def n_groups(self) -> int:
        return len(self.group_sms)

    @property
    def sms_per_group(self) -> int:
        return self.group_sms[0] if self.group_sms else 0

    def fingerprint(self) -> dict[str, Any]:
        """JSON-ready facts two processes must agree on (the SM ids are added by `verify_split`)."""
        return {
            "device": self.device,
            "uuid": self.uuid,
            "total_sms": self.total_sms,
            "min_count": self.min_count,
            "n_groups": self.n_groups,
            "sms_per_group": self.sms_per_group,
            "group_sms": list(self.group_sms),
            "remainder_sms": self.remainder_sms,
        }


@dataclass(frozen=True)
class DeviceSplit:
    """A live split in this process: its facts and the driver's resource for each group."""

    info: SmSplit
    cu_device: Any
    resources: tuple[Any, ...]
    remainder: Any

    def resources_for(self, groups: Sequence[int]) -> list[Any]:
        return [self.resources[g] for g in check_groups(groups, self.info.n_groups)]


def check_groups(groups: Iterable[int], n_groups: int) -> tuple[int, ...]:
    """The group indices sorted; INVALID_ARGUMENT when empty, repeated or out of range."""
    out = tuple(sorted(int(g) for g in groups))
    if not out:
        raise InvalidArgument("a green share needs at least one SM group")
    if len(set(out)) != len(out):
        raise InvalidArgument(f"SM groups repeat an index: {list(out)}")
    bad = [g for g in out if not 0 <= g < n_groups]
    if bad:
        raise InvalidArgument(f"SM groups {bad} are outside the split's 0..{n_groups - 1}")
    return out


def split_device(device: int = 0, sms_per_group: int = DEFAULT_SMS_PER_GROUP) -> DeviceSplit:
    """Splits device `device`'s SMs into as many groups of `sms_per_group` as the driver allows."""
    if sms_per_group < 1:
        raise InvalidArgument(f"sms_per_group must be >= 1, got {sms_per_group}")
    cu = driver()
    cu_device = call("cuDeviceGet", device)
    whole = call("cuDeviceGetDevResource", cu_device, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    total = int(whole.sm.smCount)
    if sms_per_group > total:
        raise InvalidArgument(f"sms_per_group {sms_per_group} exceeds the device's {total} SMs")
    # nbGroups=0 passes NULL for the result: the driver only counts the groups it would make
    _, count, _ = call("cuDevSmResourceSplitByCount", 0, whole, 0, sms_per_group)
    result, made, remainder = call(
        "cuDevSmResourceSplitByCount", int(count), whole, 0, sms_per_group
    )
    # the binding returns a list as long as asked; only the first `made` entries are groups
    resources = tuple(result[: int(made)])
    if not resources:
        raise FailedPrecondition(f"device {device}: the split by {sms_per_group} SMs made no group")
    group_sms = tuple(int(r.sm.smCount) for r in resources)
    if len(set(group_sms)) != 1:
        raise FailedPrecondition(f"device {device}: split groups are not equal: {group_sms}")
    info = SmSplit(
        device=device,
        uuid=_uuid(cu_device),
        total_sms=total,
        min_count=sms_per_group,
        group_sms=group_sms,
        remainder_sms=int(remainder.sm.smCount),
    )
    return DeviceSplit(info=info, cu_device=cu_device, resources=resources, remainder=remainder)


def _uuid(cu_device: Any) -> str:
    """The device UUID as NVML writes it (`GPU-xxxxxxxx-xxxx-...`), so NVML can look it up."""
    raw = call("cuDeviceGetUuid", cu_device).bytes
    data = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
    h = data.hex()
    if len(data) != 16:
        return "GPU-" + h
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def verify_split(
    device: int = 0, sms_per_group: int = DEFAULT_SMS_PER_GROUP, probe_sm_ids: bool = True
) -> dict[str, Any]:
    """This process's split fingerprint; with `probe_sm_ids`, the SM ids each group ran on.

    Needs CuPy (for the probe kernel and the primary context). Runs in a child process so the
    caller (the agent) never holds a CUDA context; see `verify_across_processes`.
    """
    from .context import build_slice, ensure_primary_context
    from .smid import observed_sm_ids

    ensure_primary_context(device)
    split = split_device(device, sms_per_group)
    out = split.info.fingerprint()
    if probe_sm_ids:
        ids: list[list[int]] = []
        for g in range(split.info.n_groups):
            piece = build_slice(split, (g,))
            try:
                ids.append(observed_sm_ids(piece.stream, device))
            finally:
                piece.close()
        # Under MPS, %smid inside a green context is numbered within that context (every group
        # reports 0..7, seen on an H100), so it proves confinement to the group's size, not
        # physical identity: check the count, keep the ids only as a record.
        wrong = [g for g, group in enumerate(ids) if len(set(group)) != split.info.group_sms[g]]
        if wrong:
            raise FailedPrecondition(f"device {device}: groups {wrong} ran on the wrong SM count")
        out["group_sm_counts"] = [len(set(group)) for group in ids]
    return out


def _child(
    results: Any, device: int, sms_per_group: int, probe_sm_ids: bool
) -> None:  # pragma: no cover - runs in a spawned process
    try:
        results.put(("ok", os.getpid(), verify_split(device, sms_per_group, probe_sm_ids)))
    except BaseException as e:
        results.put(("error", os.getpid(), f"{type(e).__name__}: {e}"))


def verify_across_processes(
    device: int = 0,
    *,
    processes: int = 2,
    sms_per_group: int = DEFAULT_SMS_PER_GROUP,
    probe_sm_ids: bool = True,
    timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Runs `verify_split` in `processes` fresh (spawned, concurrent) processes; returns the
    common fingerprint, or raises FAILED_PRECONDITION naming what differs or what failed."""
    if processes < 2:
        raise InvalidArgument(f"comparing a split needs >= 2 processes, got {processes}")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(results, device, sms_per_group, probe_sm_ids), daemon=True)
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    got: list[tuple[str, int, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        for _ in procs:
            try:
                got.append(results.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise FailedPrecondition(
                    f"device {device}: split check got {len(got)} of {processes} answers "
                    f"in {timeout_s:.0f} s"
                ) from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    errors = [f"pid {pid}: {value}" for kind, pid, value in got if kind != "ok"]
    if errors:
        raise FailedPrecondition(f"device {device}: split check failed: {'; '.join(errors)}")
    first = got[0][2]
    for _, pid, fp in got[1:]:
        if fp != first:
            diff = sorted(k for k in first.keys() | fp.keys() if first.get(k) != fp.get(k))
            raise FailedPrecondition(
                f"device {device}: the SM split differs between processes in {diff}: "
                f"green mode cannot isolate replicas here ({first} vs pid {pid}: {fp})"
            )
    return dict(first)
