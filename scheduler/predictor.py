"""The contention-aware predictor: what a plan will do before it is made.

Per replica: solo batch latency from its stage profile at its SM share, times a factor for what
shares its GPU. Spatial sharing (shares on a GPU sum to <= 100%): the factor is the stage's
sensitivity at the summed pressure of the co-runners, each co-runner's pressure scaled by how
busy it is and by the bandwidth its share lets it draw. Time slicing (shares sum above 100%, as
when whole-GPU replicas share a GPU): replicas take turns on all SMs, so a replica's batch is
stretched by the busy fraction of the others, and the GPU must not be busier than 100% in all.
The two interact (busy fractions depend on the factors), so the per-GPU factors are iterated.

Per stage: the load splits over its replicas in proportion to their capacity (the gateway
routes to the least outstanding work, so a replica slowed by co-runners gets less); a
replica's p99 comes from `scheduler.queueing`; the stage's p99 is its worst replica's,
times the stage's online bias. Per pipeline: stage p99s add (conservative), plus
one hop per stage: a constant for refs, plus a peer copy of the item where adjacent stages sit
on different GPUs, or a copy through the host and the wire on the `wire` transport.

`BiasCorrector` keeps the online correction: a bounded EWMA (in log space) of measured over
predicted p99, per pipeline and per stage, folded into the profiles' `bias` before a policy
runs, so a model error becomes a re-plan rather than a silently missed target.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import FailedPrecondition, InvalidArgument
from scheduler import queueing
from scheduler.policy import GpuInfo, Measured, PlanSpec, PolicyInput, ReplicaSpec
from scheduler.profiles import StageProfile, as_profiles


@dataclass(frozen=True)
class HopCosts:
    """Per-request cost of one stage hop (gateway -> stage -> gateway), ms and bytes/s."""

    ref_ms: float = 0.25
    peer_bytes_s: float = 40e9  # GPU to GPU on one node (NVLink/PCIe P2P)
    node_bytes_s: float = 10e9  # between nodes
    wire_ms: float = 0.5
    host_bytes_s: float = 12e9  # device <-> host copies on the wire transport

    def hop_ms(
        self, item_bytes: int, same_gpu_fraction: float, same_node: bool, wire: bool
    ) -> float:
        if wire:
            # device -> host -> wire -> host -> device, every hop
            return self.wire_ms + item_bytes * (2 / self.host_bytes_s + 1 / self.node_bytes_s) * 1e3
        cross = item_bytes / (self.peer_bytes_s if same_node else self.node_bytes_s) * 1e3
        return self.ref_ms + (1.0 - same_gpu_fraction) * cross


def share_percent(r: ReplicaSpec, gpu: GpuInfo | None) -> float:
    """A replica's SM share in percent: its MPS percentage, or its green groups' SMs."""
    if r.sm_groups and gpu is not None and gpu.sms_per_group and gpu.sm_count:
        return 100.0 * len(r.sm_groups) * gpu.sms_per_group / gpu.sm_count
    return r.sm_percent


def stage_estimate(
    profile: StageProfile,
    rate_qps: float,
    share: float,
    batch: int,
    max_wait_ms: float,
    factor: float = 1.0,
) -> queueing.Estimate:
    """One replica of `profile` at `rate_qps`, share and batch, slowed by `factor` (>= 1)."""
    return queueing.replica(
        rate_qps, batch, max_wait_ms, lambda b: profile.latency(share, b) * factor
    )


def stage_p99_ms(
    profile: StageProfile,
    rate_qps: float,
    replicas: int,
    share: float,
    batch: int,
    max_wait_ms: float = 2.0,
    factor: float = 1.0,
) -> float:
    """Stage p99 with `replicas` alike replicas sharing `rate_qps`; inf when unstable."""
    est = stage_estimate(profile, rate_qps / replicas, share, batch, max_wait_ms, factor)
    return est.p99_ms * profile.bias if est.stable else math.inf


@dataclass(frozen=True)
class ReplicaPrediction:
    replica_id: str
    node: str
    gpu: int
    share: float
    factor: float  # contention slowdown or time-slice stretch, >= 1
    time_sliced: bool
    pressure: float  # what it exerts on its co-runners
    estimate: queueing.Estimate
    p99_ms: float


@dataclass(frozen=True)
class StagePrediction:
    pipeline: str
    stage: str
    rate_qps: float
    replicas: tuple[ReplicaPrediction, ...]
    p99_ms: float
    capacity_qps: float
    stable: bool

    def decomposition(self) -> dict[str, float]:
        worst = max(self.replicas, key=lambda r: r.p99_ms).estimate
        return {
            "fill_ms": worst.fill_ms,
            "residual_ms": worst.residual_ms,
            "queue_p99_ms": worst.queue_p99_ms,
            "service_ms": worst.service_ms,
            "batch": worst.batch,
            "factor": max(r.factor for r in self.replicas),
            "p99_ms": self.p99_ms,
        }


@dataclass(frozen=True)
class PipelinePrediction:
    pipeline: str
    rate_qps: float
    qos_p99_ms: float
    stages: tuple[StagePrediction, ...]
    hops_ms: float
    p99_ms: float

    @property
    def feasible(self) -> bool:
        return all(s.stable for s in self.stages) and self.p99_ms <= self.qos_p99_ms

    def decomposition(self) -> dict[str, Any]:
        return {
            "p99_ms": self.p99_ms,
            "hops_ms": self.hops_ms,
            "stages": {s.stage: s.decomposition() for s in self.stages},
        }


@dataclass(frozen=True)
class PlanPrediction:
    pipelines: dict[str, PipelinePrediction]
    problems: tuple[str, ...] = ()  # GPU-level violations (time slices over 100% busy)
    gpu_pressure: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return not self.problems and all(p.feasible for p in self.pipelines.values())

    def stage(self, pipeline: str, stage: str) -> StagePrediction:
        for s in self.pipelines[pipeline].stages:
            if s.stage == stage:
                return s
        raise KeyError(f"{pipeline}/{stage}")


@dataclass
class _Slot:
    key: str
    r: ReplicaSpec
    prof: StageProfile
    share: float
    rate: float
    wait_ms: float
    stage_rate: float = 0.0
    factor: float = 1.0
    pressure: float = 0.0
    busy: float = 0.0
    sliced: bool = False
    est: queueing.Estimate | None = None


def _gpus(world: PolicyInput) -> dict[tuple[str, int], GpuInfo]:
    return {(n.name, g.index): g for n in world.nodes for g in n.gpus}


def predict(
    world: PolicyInput,
    plan: PlanSpec,
    rates: Mapping[str, float] | None = None,
    *,
    transport: str = "ref",
    hops: HopCosts | None = None,
    rounds: int = 3,
) -> PlanPrediction:
    """Every pipeline's p99 (decomposed) under `plan` at `rates` (default: world.load_qps)."""
    if transport not in ("ref", "wire"):
        raise InvalidArgument(f"transport must be ref or wire, got {transport!r}")
    hops = hops or HopCosts()
    rates = world.load_qps if rates is None else rates
    profiles = as_profiles(world.profiles)
    gpus = _gpus(world)
    by_stage: dict[str, list[_Slot]] = defaultdict(list)
    by_gpu: dict[tuple[str, int], list[_Slot]] = defaultdict(list)
    for a in plan.stages:
        key = f"{a.pipeline}/{a.stage}"
        prof = profiles.get(key)
        if prof is None:
            raise FailedPrecondition(f"no profile for stage {key}")
        if not a.replicas:
            raise InvalidArgument(f"stage {key} has no replica")
        stage_rate = float(rates.get(a.pipeline, 0.0))
        rate = stage_rate / len(a.replicas)
        for r in a.replicas:
            share = share_percent(r, gpus.get((r.node, r.gpu)))
            slot = _Slot(key, r, prof, share, rate, r.max_wait_us / 1e3, stage_rate)
            by_stage[key].append(slot)
            by_gpu[(r.node, r.gpu)].append(slot)

    problems: list[str] = []
    gpu_pressure: dict[tuple[str, int], float] = {}
    for slots in by_gpu.values():
        sliced = sum(s.share for s in slots) > 100.0 + 1e-6
        for s in slots:
            s.sliced = sliced
    for _ in range(rounds):
        for slots in by_gpu.values():
            _contention(slots)
        # least-outstanding routing: a stage's load splits in proportion to replica capacity
        for group in by_stage.values():
            if len(group) > 1:
                caps = [_capacity(s) for s in group]
                for s, c in zip(group, caps, strict=True):
                    s.rate = s.stage_rate * c / sum(caps)
    for gkey, slots in by_gpu.items():
        sliced = slots[0].sliced
        gpu_pressure[gkey] = sum(s.pressure for s in slots)
        for s in slots:
            s.est = stage_estimate(s.prof, s.rate, s.share, s.r.max_batch, s.wait_ms, s.factor)
        # capacity: turns at full batches must fit in the GPU's time (small batches grow)
        if sliced and sum(s.est.utilization / s.factor for s in slots if s.est) > queueing.RHO_MAX:
            problems.append(f"GPU {gkey[0]}:{gkey[1]} is time-sliced beyond capacity")

    out: dict[str, PipelinePrediction] = {}
    for p in world.pipelines:
        stage_preds: list[StagePrediction] = []
        for st in p.stages:
            mine = by_stage.get(f"{p.name}/{st.name}", [])
            if not mine:
                raise InvalidArgument(f"plan has no replica for stage {p.name}/{st.name}")
            reps = tuple(_replica_prediction(s) for s in mine)
            stage_preds.append(
                StagePrediction(
                    p.name,
                    st.name,
                    float(rates.get(p.name, 0.0)),
                    reps,
                    max(r.p99_ms for r in reps),
                    sum(_capacity(s) for s in mine),
                    all(r.estimate.stable for r in reps),
                )
            )
        hop_total = 0.0
        for i, st in enumerate(p.stages):
            cur = by_stage[f"{p.name}/{st.name}"]
            nxt = by_stage[f"{p.name}/{p.stages[i + 1].name}"] if i + 1 < len(p.stages) else cur
            same_gpu = sum((a.r.node, a.r.gpu) == (b.r.node, b.r.gpu) for a in cur for b in nxt) / (
                len(cur) * len(nxt)
            )
            same_node = all(a.r.node == b.r.node for a in cur for b in nxt)
            hop_total += hops.hop_ms(
                cur[0].prof.output_bytes_per_item, same_gpu, same_node, transport == "wire"
            )
        total = sum(s.p99_ms for s in stage_preds) + hop_total
        out[p.name] = PipelinePrediction(
            p.name,
            float(rates.get(p.name, 0.0)),
            p.qos_p99_ms,
            tuple(stage_preds),
            hop_total,
            total,
        )
    return PlanPrediction(out, tuple(problems), gpu_pressure)


def _contention(slots: list[_Slot]) -> None:
    """One round of the per-GPU factors from the co-runners' busy fractions and pressures."""
    for s in slots:
        s.est = stage_estimate(s.prof, s.rate, s.share, s.r.max_batch, s.wait_ms, s.factor)
        s.busy = min(1.0, s.est.busy) if s.est.stable else 1.0
        if s.sliced:
            s.pressure = 0.0  # taking turns, replicas never run together: no bandwidth fight
        else:
            full = s.prof.throughput(100.0, s.r.max_batch)
            drawn = min(1.0, s.prof.throughput(s.share, s.r.max_batch) / full)
            s.pressure = s.prof.pressure * s.busy * drawn
    total_busy = sum(s.busy / s.factor for s in slots)  # solo busy fractions
    total_pressure = sum(s.pressure for s in slots)
    for s in slots:
        if s.sliced:
            s.factor = 1.0 + total_busy - s.busy / s.factor
        else:
            s.factor = s.prof.slowdown_at(total_pressure - s.pressure)


def _capacity(s: _Slot) -> float:
    return 1000.0 * s.r.max_batch / (s.prof.latency(s.share, s.r.max_batch) * s.factor)


def _replica_prediction(s: _Slot) -> ReplicaPrediction:
    assert s.est is not None
    p99 = s.est.p99_ms * s.prof.bias if s.est.stable else math.inf
    return ReplicaPrediction(
        s.r.replica_id, s.r.node, s.r.gpu, s.share, s.factor, s.sliced, s.pressure, s.est, p99
    )


class BiasCorrector:
    """Online multiplicative correction of predicted p99, per pipeline and per "pipeline/stage".

    `update` takes a measured p99 and the p99 that was predicted *with the current factor
    applied* (what the plan in force says), and moves the factor by the residual:
    f <- clamp(f * (measured / predicted) ** alpha). At a fixed point measured == predicted.
    """

    def __init__(
        self, *, alpha: float = 0.3, lo: float = 0.5, hi: float = 3.0, min_count: int = 50
    ) -> None:
        if not (0 < alpha <= 1 and 0 < lo <= 1 <= hi):
            raise InvalidArgument("bias: need 0 < alpha <= 1 and 0 < lo <= 1 <= hi")
        self.alpha, self.lo, self.hi, self.min_count = alpha, lo, hi, min_count
        self._f: dict[str, float] = {}

    def factor(self, key: str) -> float:
        return self._f.get(key, 1.0)

    def factors(self) -> dict[str, float]:
        return dict(self._f)

    def update(self, key: str, measured_p99_ms: float, predicted_p99_ms: float) -> float:
        if measured_p99_ms > 0 and 0 < predicted_p99_ms < math.inf:
            ratio = measured_p99_ms / predicted_p99_ms
            f = self.factor(key) * math.exp(self.alpha * math.log(ratio))
            self._f[key] = min(self.hi, max(self.lo, f))
        return self.factor(key)

    def observe(self, plan: PlanSpec, measured: Mapping[str, Measured]) -> None:
        """Updates from the plan in force and the scheduler's windows (skips thin windows)."""
        per_pipeline: dict[str, float] = defaultdict(float)
        for a in plan.stages:
            per_pipeline[a.pipeline] += a.predicted_p99_ms
            m = measured.get(f"{a.pipeline}/{a.stage}")
            if m is not None and m.count >= self.min_count:
                self.update(f"{a.pipeline}/{a.stage}", m.p99_ms, a.predicted_p99_ms)
        for name, predicted in per_pipeline.items():
            m = measured.get(name)
            if m is not None and m.count >= self.min_count:
                self.update(name, m.p99_ms, predicted)

    def apply(self, profiles: Mapping[str, Any]) -> dict[str, StageProfile]:
        """Profiles with `bias` = stage factor x pipeline factor, for the next PolicyInput."""
        out = {}
        for key, p in as_profiles(profiles).items():
            out[key] = p.with_bias(self.factor(key) * self.factor(p.pipeline))
        return out


# below this many replica rows, finding the alike ones costs more than it saves
DEDUP_ROWS = 2048


class _Service:
    """Batch -> solo latency for a row of replicas: tables at their shares, laid out once.

    Where a batch falls in a row's own batch grid is read from `pos`: its slot in the union of
    all grids (one searchsorted for every row), mapped to the row's segment.
    """

    def __init__(
        self,
        lo: np.ndarray,
        hi: np.ndarray,
        grid: np.ndarray,
        t: np.ndarray,
        scale: np.ndarray,
        union: np.ndarray,
        pos: np.ndarray,
    ) -> None:
        self.lo, self.hi, self.grid, self.t, self.scale = lo, hi, grid, t, scale
        self.union, self.pos = union, pos
        self.rows = np.arange(len(t))

    def take(self, idx: np.ndarray) -> _Service:
        return _Service(
            self.lo[idx],
            self.hi[idx],
            self.grid[idx],
            self.t[idx],
            self.scale[idx],
            self.union,
            self.pos[idx],
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.grid.shape[1] == 1:
            lo, hi = self.lo[:, 0], self.hi[:, 0]
        else:
            rows = self.rows
            k = self.pos[rows, np.searchsorted(self.union, batch, side="right")]
            g0, g1 = self.grid[rows, k], self.grid[rows, k + 1]
            w = np.minimum(np.maximum((batch - g0) / (g1 - g0), 0.0), 1.0)
            lo = self.lo[rows, k] * (1 - w) + self.lo[rows, k + 1] * w
            hi = self.hi[rows, k] * (1 - w) + self.hi[rows, k + 1] * w
        out = np.exp((1 - self.t) * np.log(lo) + self.t * np.log(hi) + self.scale)
        return out  # type: ignore[no-any-return]


def _groups(*cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows alike in every column: (group of each row, first row of each group)."""
    order = np.lexsort(cols[::-1])
    new = np.zeros(len(order), dtype=bool)
    new[:1] = True
    for c in cols:
        sc = c[order]
        new[1:] |= sc[1:] != sc[:-1]
    group = np.empty(len(order), dtype=int)
    group[order] = np.cumsum(new) - 1
    return group, order[new]


class Vectorised:
    """`predict` over many plans at once, in NumPy: the same model, for searches.

    A batch of plans is given flat, one row per replica: plan index, stage index (into
    `keys`, every stage of every pipeline in order), SM share in percent, max batch, max wait
    and slot index (into `slots`, every GPU of every node in order). `run` returns every
    pipeline's p99 per plan, with unstable stages and over-busy time-sliced GPUs as inf.
    Results agree with `predict` to rounding (tests hold them to it); a search uses this to
    rank plans and `predict` to verify the one it returns.
    """

    def __init__(
        self,
        world: PolicyInput,
        *,
        transport: str = "ref",
        hops: HopCosts | None = None,
        rounds: int = 3,
    ) -> None:
        if transport not in ("ref", "wire"):
            raise InvalidArgument(f"transport must be ref or wire, got {transport!r}")
        profiles = as_profiles(world.profiles)
        self.pipelines = [p.name for p in world.pipelines]
        self.keys: list[str] = []
        pipe_of, nxt = [], []
        for pi, p in enumerate(world.pipelines):
            for si, st in enumerate(p.stages):
                key = f"{p.name}/{st.name}"
                if key not in profiles:
                    raise FailedPrecondition(f"no profile for stage {key}")
                self.keys.append(key)
                pipe_of.append(pi)
                nxt.append(len(self.keys) if si + 1 < len(p.stages) else len(self.keys) - 1)
        self.slots = [(n.name, g) for n in world.nodes for g in n.gpus]
        node_names = sorted({n for n, _ in self.slots})
        self.node_of = np.asarray([node_names.index(n) for n, _ in self.slots], dtype=int)
        self.n_nodes = len(node_names)
        self.pipe_of = np.asarray(pipe_of, dtype=int)
        self.next_stage = np.asarray(nxt, dtype=int)
        self.rounds, self.wire = rounds, transport == "wire"
        self.hops = hops or HopCosts()
        profs = [profiles[k] for k in self.keys]
        self.profs = profs
        ns = max(len(p.shares) for p in profs)
        nb = max(len(p.batches) for p in profs)
        nl = max(len(p.pressure_levels) for p in profs)
        self.n_shares = np.asarray([len(p.shares) for p in profs])
        self.shares = np.full((len(profs), ns), np.inf)
        self.grid = np.zeros((len(profs), nb))
        self.table = np.zeros((len(profs), ns, nb))
        self.levels = np.zeros((len(profs), nl))
        self.slow = np.zeros((len(profs), nl))
        for i, pr in enumerate(profs):
            self.shares[i, : len(pr.shares)] = pr.shares
            pad = nb - len(pr.batches)
            self.grid[i] = np.concatenate([pr.batches, pr.batches[-1] + 1.0 + np.arange(pad)])
            tab = np.asarray(pr._table)
            self.table[i, : len(pr.shares)] = np.concatenate(
                [tab, np.repeat(tab[:, -1:], pad, axis=1)], axis=1
            )
            # pressure levels padded along the last segment's line (the scalar extrapolation)
            lv, sd = list(pr.pressure_levels), list(pr.slowdown)
            slope = (sd[-1] - sd[-2]) / (lv[-1] - lv[-2]) if len(lv) > 1 else 0.0
            for _ in range(nl - len(lv)):
                lv.append(lv[-1] + 1.0)
                sd.append(sd[-1] + slope)
            self.levels[i], self.slow[i] = lv, sd
        self.pressure = np.asarray([p.pressure for p in profs])
        self.bias = np.asarray([p.bias for p in profs])
        self.out_bytes = np.asarray([p.output_bytes_per_item for p in profs], dtype=float)
        self.one_level = np.asarray([len(p.pressure_levels) == 1 for p in profs])
        self.same_levels = bool((self.levels == self.levels[:1]).all())
        # pos[stage, i]: the segment of the stage's batch grid holding a batch whose slot in
        # the union of all grids is i (searchsorted right: i = how many union points are <= b)
        self.union = np.unique(self.grid)
        below = np.concatenate([[-np.inf], self.union])  # the largest union point <= b
        last = max(nb - 2, 0)
        self.pos = np.clip((self.grid[:, None, :] <= below[None, :, None]).sum(axis=2) - 1, 0, last)

    def _service(self, stage: np.ndarray, share: np.ndarray) -> _Service:
        """Solo latency tables of replicas of `stage` at `share` (as StageProfile.service_at)."""
        shares = self.shares[stage]
        log_scale = np.log(np.maximum(shares[:, 0] / share, 1.0))
        top = self.n_shares[stage] - 1
        j = np.clip((shares <= share[:, None]).sum(axis=1) - 1, 0, np.maximum(top - 1, 0))
        j1 = np.minimum(j + 1, top)
        rows = np.arange(len(j))
        s0, s1 = shares[rows, j], shares[rows, j1]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(j1 > j, np.log(share / s0) / np.log(s1 / s0), 0.0)
        t = np.minimum(np.maximum(t, 0.0), 1.0)
        return _Service(
            self.table[stage, j],
            self.table[stage, j1],
            self.grid[stage],
            t,
            log_scale,
            self.union,
            self.pos[stage],
        )

    def _slowdown(self, stage: np.ndarray, pressure: np.ndarray) -> np.ndarray:
        lv, sd = self.levels[stage], self.slow[stage]
        last = lv.shape[1] - 1
        if last == 0:
            return sd[:, 0]  # type: ignore[no-any-return]
        rows = np.arange(len(stage))
        if self.same_levels:
            j = np.searchsorted(self.levels[0], pressure, side="right") - 1
            j = np.clip(j, 0, last - 1)
        else:
            j = np.clip((lv <= pressure[:, None]).sum(axis=1) - 1, 0, last - 1)
        l0, l1 = lv[rows, j], lv[rows, j + 1]
        t = (pressure - l0) / (l1 - l0)
        out = (1 - t) * sd[rows, j] + t * sd[rows, j + 1]
        out = np.where(pressure <= lv[:, 0], sd[:, 0], out)
        return np.where(self.one_level[stage], sd[:, 0], out)  # type: ignore[no-any-return]

    def run(
        self,
        plan: np.ndarray,
        stage: np.ndarray,
        share: np.ndarray,
        batch: np.ndarray,
        wait_ms: np.ndarray | float,
        slot: np.ndarray,
        rates: np.ndarray,
        n_plans: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(p99 [plan, pipeline] in ms, inf where unstable; max utilisation / RHO_MAX per plan).

        `rates[plan, pipeline]` in queries/s; every stage of every plan needs a replica.
        """
        n_st, n_sl = len(self.keys), len(self.slots)
        plan, stage, slot = (np.asarray(a, dtype=int) for a in (plan, stage, slot))
        share = np.asarray(share, dtype=float)
        bmax = np.asarray(batch, dtype=float)
        sgid = plan * n_st + stage
        ggid = plan * n_sl + slot
        nrep = np.bincount(sgid, minlength=n_plans * n_st)
        if not nrep.all():
            raise InvalidArgument("every stage of every plan needs a replica")
        stage_rate = np.asarray(rates, dtype=float)[plan, self.pipe_of[stage]]
        wait = np.broadcast_to(np.asarray(wait_ms, dtype=float), stage.shape)
        # replicas alike in (stage, share, batch, wait) share their latency tables, and alike
        # also in rate and slowdown (most of them, across neighbouring plans) their queueing
        cfg, first = _groups(stage.astype(float), share, bmax, wait)
        svc = self._service(stage[first], share[first])
        c_bmax, c_wait = bmax[first], wait[first]
        lat_b = svc(c_bmax)[cfg]
        at_full = self._service(stage[first], np.full(len(first), 100.0))(c_bmax)[cfg]
        drawn = np.minimum(1.0, (1000.0 * bmax / lat_b) / (1000.0 * bmax / at_full))
        cfg_f = cfg.astype(float)
        full = svc.take(cfg) if len(stage) < DEDUP_ROWS else svc

        def queue(
            rate: np.ndarray, factor: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if len(rate) < DEDUP_ROWS:
                f = factor
                return queueing.replica_arrays(rate, bmax, wait, lambda b: full(b) * f)
            inv, one = _groups(cfg_f, rate, factor)
            c, f = cfg[one], factor[one]
            sub = svc.take(c)
            out = queueing.replica_arrays(rate[one], c_bmax[c], c_wait[c], lambda b: sub(b) * f)
            return out[0][inv], out[1][inv], out[2][inv]

        n_g = n_plans * n_sl
        sliced = (np.bincount(ggid, share, minlength=n_g) > 100.0 + 1e-6)[ggid]
        rate = stage_rate / nrep[sgid]
        factor = np.ones(len(stage))
        many = nrep[sgid] > 1
        for _ in range(self.rounds):
            _, util, busy = queue(rate, factor)
            busy = np.where(util <= queueing.RHO_MAX, np.minimum(1.0, busy), 1.0)
            pressure = np.where(sliced, 0.0, self.pressure[stage] * busy * drawn)
            total_busy = np.bincount(ggid, busy / factor, minlength=n_g)[ggid]
            total_p = np.bincount(ggid, pressure, minlength=n_g)[ggid]
            factor = np.where(
                sliced,
                1.0 + total_busy - busy / factor,
                self._slowdown(stage, total_p - pressure),
            )
            cap = 1000.0 * bmax / (lat_b * factor)
            share_of = cap / np.bincount(sgid, cap, minlength=n_plans * n_st)[sgid]
            rate = np.where(many, stage_rate * share_of, rate)
        p99, util, _ = queue(rate, factor)
        p99 = np.where(util <= queueing.RHO_MAX, p99 * self.bias[stage], np.inf)
        over = np.bincount(ggid, np.where(sliced, util / factor, 0.0), minlength=n_g)
        flat_p99 = np.full(n_plans * n_st, -np.inf)
        np.maximum.at(flat_p99, sgid, p99)
        stage_p99 = flat_p99.reshape(n_plans, n_st)
        # hops: the fraction of adjacent replica pairs on one GPU, and whether on one node
        count = np.bincount(sgid * n_sl + slot, minlength=n_plans * n_st * n_sl).reshape(
            n_plans, n_st, n_sl
        )
        n = nrep.reshape(n_plans, n_st).astype(float)
        pairs = n * n[:, self.next_stage]
        same_gpu = (count * count[:, self.next_stage]).sum(axis=2) / pairs
        if self.wire:
            hop = (
                self.hops.wire_ms
                + self.out_bytes * (2 / self.hops.host_bytes_s + 1 / self.hops.node_bytes_s) * 1e3
                + np.zeros_like(same_gpu)
            )
        else:
            if self.n_nodes > 1:
                per_node = np.zeros((n_plans, n_st, self.n_nodes))
                for k in range(self.n_nodes):
                    per_node[:, :, k] = count[:, :, self.node_of == k].sum(axis=2)
                same_node = (per_node * per_node[:, self.next_stage]).sum(axis=2) >= pairs
            else:
                same_node = np.ones_like(same_gpu, dtype=bool)
            speed = np.where(same_node, self.hops.peer_bytes_s, self.hops.node_bytes_s)
            hop = self.hops.ref_ms + (1.0 - same_gpu) * (self.out_bytes / speed * 1e3)
        total = stage_p99 + hop
        out = np.zeros((n_plans, len(self.pipelines)))
        for pi in range(len(self.pipelines)):
            out[:, pi] = total[:, self.pipe_of == pi].sum(axis=1)
        busy_gpu = (over > queueing.RHO_MAX).reshape(n_plans, n_sl).any(axis=1)
        out[busy_gpu] = np.inf
        excess = np.zeros(n_plans)
        np.maximum.at(excess, plan, util / queueing.RHO_MAX)
        return out, excess

    def flatten(
        self, plans: list[PlanSpec]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """PlanSpecs as `run`'s rows: plan, stage, share, batch, wait_ms, slot."""
        index = {k: i for i, k in enumerate(self.keys)}
        slot_of = {(node, g.index): i for i, (node, g) in enumerate(self.slots)}
        rows: list[tuple[int, int, float, int, float, int]] = []
        for pi, plan in enumerate(plans):
            for a in plan.stages:
                k = index.get(f"{a.pipeline}/{a.stage}")
                if k is None:
                    raise FailedPrecondition(f"no profile for stage {a.pipeline}/{a.stage}")
                for r in a.replicas:
                    s = slot_of.get((r.node, r.gpu))
                    if s is None:
                        raise InvalidArgument(f"{r.replica_id}: no GPU {r.node}:{r.gpu}")
                    share = share_percent(r, self.slots[s][1])
                    rows.append((pi, k, share, r.max_batch, r.max_wait_us / 1e3, s))
        cols = list(zip(*rows, strict=True))
        p, st, sh, b, w, sl = (np.asarray(c) for c in cols)
        return p, st, sh.astype(float), b.astype(float), w.astype(float), sl

    def p99(self, plans: list[PlanSpec], rates: Mapping[str, float]) -> np.ndarray:
        """Every pipeline's p99 [plan, pipeline] for whole PlanSpecs at one set of rates."""
        r = np.asarray([[float(rates.get(n, 0.0)) for n in self.pipelines]] * len(plans))
        out, _ = self.run(*self.flatten(plans), r, len(plans))
        return out
