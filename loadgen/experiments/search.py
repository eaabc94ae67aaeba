"""Pure experiment logic: the QoS check of a trial, the peak-rate search, SM-share accounting.

The peak search doubles the rate from a start until a trial misses its QoS (or halves it until
one meets), then bisects between the last rate that met and the first that missed until they are
within a relative tolerance. The answer is the highest rate seen to meet the QoS.

A trial can miss without saying anything about the server: when the load generator fell behind
its own timeline, the lag counts in every latency (it counts from the intended send), and a
faster server would have missed too. Such a trial is bound by the client (`Trial.bound`); the
search ends there, the peak is the last rate met, and the result says that it is a lower bound
(`SearchResult.client_bound`) instead of bisecting towards the client's own limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument
from protos import plan_pb2

# One green-context SM group on Hopper: 8 of the H100's 132 SMs, as a percentage of the GPU.
GREEN_GROUP_PERCENT = 8 / 132 * 100


@dataclass(frozen=True)
class Trial:
    """One fixed-rate run: whether it met the QoS, and the figures behind the verdict.

    `bound` is empty where the verdict is the server's, and names what else decided a miss
    (`CLIENT`: the load generator fell behind its timeline)."""

    rate_qps: float
    met: bool
    stats: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    detail: Mapping[str, Any] = field(default_factory=dict)
    bound: str = ""


CLIENT = "client"


@dataclass(frozen=True)
class SearchConfig:
    start_qps: float = 10.0
    min_qps: float = 0.5
    max_qps: float = 100_000.0
    rel_tol: float = 0.05
    max_trials: int = 24

    def __post_init__(self) -> None:
        if not 0 < self.min_qps <= self.start_qps <= self.max_qps:
            raise InvalidArgument(
                f"need 0 < min_qps <= start_qps <= max_qps, got {self.min_qps}, "
                f"{self.start_qps}, {self.max_qps}"
            )
        if not 0 < self.rel_tol < 1:
            raise InvalidArgument(f"rel_tol must be in (0, 1), got {self.rel_tol}")
        if self.max_trials < 1:
            raise InvalidArgument(f"max_trials must be >= 1, got {self.max_trials}")


@dataclass(frozen=True)
class SearchResult:
    """The highest rate that met the QoS (0 when none did), and every trial in order."""

    peak_qps: float
    trials: tuple[Trial, ...]
    capped: bool  # no trial missed (max_qps or the trial budget reached): the peak may be higher
    # the search ended at a miss the load generator caused: the server's peak is >= peak_qps
    client_bound: bool = False

    @property
    def first_miss_qps(self) -> float | None:
        """The lowest rate above the peak that the server missed: the true peak lies in
        [peak, this). None where no trial above the peak gave the server's verdict."""
        misses = [
            t.rate_qps
            for t in self.trials
            if not t.met and not t.bound and t.rate_qps > self.peak_qps
        ]
        return min(misses) if misses else None


def meets_qos(
    stats: Mapping[str, Mapping[str, Any]],
    qos_ms: Mapping[str, float],
    max_error_frac: float = 0.01,
) -> bool:
    """Every pipeline that got requests has p99 ≤ its target and few enough errors.

    `stats` is per pipeline as `openloop.Result.stats` gives it (the `"all"` entry must have
    requests, else there is no evidence either way and the trial does not count as met).
    """
    if stats.get("all", {}).get("count", 0) == 0:
        return False
    for name, target in qos_ms.items():
        s = stats.get(name)
        if not s or s["count"] == 0:
            continue
        if s["errors"] > max_error_frac * s["count"]:
            return False
        if s["p99_ms"] is None or s["p99_ms"] > target:
            return False
    return True


async def find_peak(trial: Callable[[float], Awaitable[Trial]], cfg: SearchConfig) -> SearchResult:
    """Exponential then binary search over the rate for the highest one whose trial meets.

    A miss bound by something other than the server (see the module) ends the search once a
    rate has met; before that it halves the rate like any miss (lower, the client may keep up).
    """
    done: list[Trial] = []

    async def run(rate: float) -> bool:
        t = await trial(rate)
        done.append(t)
        if not t.met and t.bound and any(d.met for d in done):
            raise _ClientBound
        return t.met

    try:
        return await _search(run, cfg, done)
    except _ClientBound:
        lo = max(t.rate_qps for t in done if t.met)
        return SearchResult(lo, tuple(done), capped=True, client_bound=True)


class _ClientBound(Exception):
    """A trial above a rate that met was decided by the load generator: the search ends."""


async def _search(
    run: Callable[[float], Awaitable[bool]], cfg: SearchConfig, done: list[Trial]
) -> SearchResult:
    lo, hi = 0.0, 0.0  # highest rate met, lowest rate missed (0 = none yet)
    rate = cfg.start_qps
    if await run(rate):
        lo = rate
        while len(done) < cfg.max_trials:
            if lo >= cfg.max_qps:
                return SearchResult(lo, tuple(done), capped=True)
            rate = min(lo * 2, cfg.max_qps)
            if not await run(rate):
                hi = rate
                break
            lo = rate
    else:
        hi = rate
        while len(done) < cfg.max_trials:
            rate = hi / 2
            if rate < cfg.min_qps:
                return SearchResult(0.0, tuple(done), capped=False)
            if await run(rate):
                lo = rate
                break
            hi = rate
    while hi > 0 and lo > 0 and hi - lo > cfg.rel_tol * hi and len(done) < cfg.max_trials:
        mid = (lo + hi) / 2
        if await run(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, tuple(done), capped=hi == 0 and lo > 0)


def replica_sm_percent(replica: plan_pb2.ReplicaPlan) -> float:
    """A replica's share of its GPU: its MPS percent, else its green groups, else the whole GPU."""
    if replica.sm_percent > 0:
        return float(replica.sm_percent)
    if replica.sm_groups:
        return len(replica.sm_groups) * GREEN_GROUP_PERCENT
    return 100.0


def plan_sm_percent(plan: plan_pb2.Plan, pipelines: Sequence[str] | None = None) -> float:
    """SM share a plan holds, in percent of one GPU, optionally for some pipelines.

    Per GPU the replicas' shares add up, but never past 100: replicas whose caps sum over
    100% (whole-GPU replicas time-sharing one GPU, as `exclusive` places them) hold the whole
    GPU, not several.
    """
    per_gpu: dict[tuple[str, int], float] = {}
    for s in plan.stages:
        if pipelines is not None and s.pipeline not in pipelines:
            continue
        for r in s.replicas:
            key = (r.node, r.gpu)
            per_gpu[key] = per_gpu.get(key, 0.0) + replica_sm_percent(r)
    return sum(min(100.0, v) for v in per_gpu.values())


def plan_record(plan: plan_pb2.Plan, pipelines: Sequence[str] | None = None) -> dict[str, Any]:
    """What a result keeps of a plan: its epoch, policy and reason, and per stage its replicas'
    SM shares, largest batches and whether they time-share (so a reader sees what each policy
    ran, not only how it did), and the host part of a batch it was priced with."""
    stages = []
    for s in plan.stages:
        if pipelines is not None and s.pipeline not in pipelines:
            continue
        stages.append(
            {"stage": f"{s.pipeline}/{s.stage}",
             "sm_percent": [round(replica_sm_percent(r), 2) for r in s.replicas],
             "max_batch": [r.max_batch for r in s.replicas],
             "time_sliced": [r.mode == plan_pb2.SHARE_MODE_TIME_SLICED for r in s.replicas],
             "host_ms": round(s.host_ms, 3)}
        )  # fmt: skip
    return {"epoch": plan.epoch, "policy": plan.policy, "reason": plan.reason,
            "sm_percent": plan_sm_percent(plan, pipelines), "stages": stages}  # fmt: skip


def plan_gpus(plan: plan_pb2.Plan) -> int:
    """Distinct (node, GPU) pairs the plan uses."""
    return len({(r.node, r.gpu) for s in plan.stages for r in s.replicas})


def integrate_steps(samples: Sequence[tuple[float, float]], end_s: float) -> float:
    """∫ of a step function held from each `(t_s, value)` sample to the next, up to `end_s`.

    Before the first sample the first value holds (the share was sampled as the trial began).
    """
    if not samples:
        return 0.0
    pts = sorted(samples)
    total = pts[0][1] * max(0.0, min(pts[0][0], end_s))
    for (t0, v), (t1, _) in zip(pts, [*pts[1:], (end_s, 0.0)], strict=True):
        lo, hi = max(t0, 0.0), min(t1, end_s)
        if hi > lo:
            total += v * (hi - lo)
    return total
