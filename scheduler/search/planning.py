"""Building blocks the predictive policies share: share grid, per-stage choices, packing, checks.

A stage's choice is (share units per replica, max batch, replica count). For one stage at one
rate, `frontier` returns the Pareto set of choices over (total units, predicted p99), computed
with the vectorised twin of the queueing model. `cheapest` picks one choice per stage of a
pipeline with the least total units whose p99s fit the budget (an exact multiple-choice
knapsack by merging Pareto sets). `pack` puts the replicas on GPUs (shares and memory), keeping
a pipeline's adjacent stages on one GPU where it can. `assemble` turns that into a PlanSpec,
and `check_plan` states every constraint a plan must meet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import FailedPrecondition, InvalidArgument
from scheduler.perfmodel import queueing
from scheduler.perfmodel.profiles import StageProfile, as_profiles
from scheduler.policy import (
    GpuInfo,
    PlanSpec,
    PolicyInput,
    ReplicaSpec,
    StageAssignment,
)


@dataclass(frozen=True)
class Grid:
    """How shares are quantised: MPS percentage steps, or green-context SM groups."""

    green: bool
    unit_percent: float
    units_per_gpu: int

    @classmethod
    def for_world(cls, world: PolicyInput, step_percent: float) -> Grid:
        gpus = [g for n in world.nodes for g in n.gpus]
        if not gpus:
            raise FailedPrecondition("no GPU to plan on")
        if all(g.sm_groups > 0 and g.sms_per_group > 0 for g in gpus):
            g = min(gpus, key=lambda g: g.sm_groups)
            return cls(True, 100.0 * g.sms_per_group / g.sm_count, g.sm_groups)
        if (
            not (0 < step_percent <= 100)
            or abs(100 / step_percent - round(100 / step_percent)) > 1e-9
        ):
            raise InvalidArgument(f"share_step must divide 100, got {step_percent}")
        return cls(False, step_percent, round(100 / step_percent))

    def percent(self, units: int) -> float:
        return round(units * self.unit_percent, 6)


@dataclass(frozen=True)
class Slot:
    node: str
    gpu: GpuInfo


@dataclass(frozen=True)
class Choice:
    key: str
    units: int
    batch: int
    replicas: int
    p99_ms: float

    @property
    def cost(self) -> int:
        return self.units * self.replicas


@dataclass(frozen=True)
class Options:
    share_step: float
    batches: tuple[int, ...] | None  # None: each profile's own
    max_wait_us: int
    max_replicas: int
    transport: str

    @classmethod
    def parse(cls, opts: Mapping[str, str], n_gpus: int) -> Options:
        try:
            batches = opts.get("batches")
            return cls(
                share_step=float(opts.get("share_step", "10")),
                batches=tuple(sorted({int(b) for b in batches.split(",")})) if batches else None,
                max_wait_us=int(opts.get("max_wait_us", "2000")),
                max_replicas=int(opts.get("max_replicas", str(max(4, 2 * n_gpus)))),
                transport=opts.get("transport", "ref"),
            )
        except ValueError as e:
            raise InvalidArgument(f"bad policy option: {e}") from e


def slots(world: PolicyInput) -> list[Slot]:
    return [Slot(n.name, g) for n in world.nodes for g in n.gpus]


def stage_profiles(world: PolicyInput) -> dict[str, StageProfile]:
    """The profile of every stage of every pipeline (FAILED_PRECONDITION when one is missing)."""
    profiles = as_profiles(world.profiles)
    for p in world.pipelines:
        for st in p.stages:
            if f"{p.name}/{st.name}" not in profiles:
                raise FailedPrecondition(f"no profile for stage {p.name}/{st.name}")
    return profiles


class Candidates:
    """Every (share units, batch) of several stages, with their latency tables laid out once.

    `frontiers` then works out, for given rates and contention factors, each stage's Pareto
    set of (units, replicas, batch) choices in one vectorised pass over all stages.
    """

    def __init__(
        self,
        profs: Sequence[StageProfile],
        grid: Grid,
        batches: Sequence[Sequence[int]],
        wait_ms: float,
        max_replicas: int,
        extra: int = 2,
    ) -> None:
        self.profs, self.wait_ms, self.max_replicas, self.extra = (
            profs,
            wait_ms,
            max_replicas,
            extra,
        )
        nbmax = max(len(p.batches) for p in profs)
        units = np.arange(1, grid.units_per_gpu + 1)
        share = np.asarray([grid.percent(int(u)) for u in units])
        parts: list[list[np.ndarray]] = [[] for _ in range(8)]
        for i, prof in enumerate(profs):
            usable = [b for b in batches[i] if b <= prof.max_batch] or [prof.batches[0]]
            shares = np.asarray(prof.shares)
            table = np.asarray(prof._table)
            pad = nbmax - len(prof.batches)
            pbs = np.concatenate([prof.batches, prof.batches[-1] + 1.0 + np.arange(pad)])
            ptab = np.concatenate([table, np.repeat(table[:, -1:], pad, axis=1)], axis=1)
            # per share unit: the measured shares around it and the log-linear weight
            j = np.clip(
                np.searchsorted(shares, share, side="right") - 1, 0, max(len(shares) - 2, 0)
            )
            j1 = np.minimum(j + 1, len(shares) - 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(j1 != j, np.log(share / shares[j]) / np.log(shares[j1] / shares[j]), 0)
            t = np.clip(t, 0.0, 1.0)
            scale = np.log(np.maximum(shares[0] / share, 1.0))
            nb = len(usable)
            for part, value in zip(
                parts,
                (
                    np.full(len(units) * nb, i),
                    np.repeat(units, nb),
                    np.tile(np.asarray(usable, dtype=float), len(units)),
                    np.repeat(ptab[j], nb, axis=0),
                    np.repeat(ptab[j1], nb, axis=0),
                    np.repeat(pbs[None, :], len(units) * nb, axis=0),
                    np.repeat(t, nb),
                    np.repeat(scale, nb),
                ),
                strict=True,
            ):
                part.append(value)
        (self.sid, self.u, self.b, self.lo, self.hi, self.grid, self.t, self.scale) = (
            np.concatenate(p) for p in parts
        )
        self.bias = np.asarray([p.bias for p in profs])
        self.solo = self._latency(np.arange(len(self.u)), self.b)

    def _latency(self, rows: np.ndarray, batch: np.ndarray) -> np.ndarray:
        g = self.grid[rows]
        k = np.maximum((g <= batch[:, None]).sum(axis=1) - 1, 0)
        k = np.minimum(k, g.shape[1] - 2) if g.shape[1] > 1 else k
        if g.shape[1] == 1:
            lo, hi = self.lo[rows, 0], self.hi[rows, 0]
        else:
            g0, g1 = g[np.arange(len(rows)), k], g[np.arange(len(rows)), k + 1]
            w = np.minimum(np.maximum((batch - g0) / (g1 - g0), 0.0), 1.0)
            lo = self.lo[rows, k] * (1 - w) + self.lo[rows, k + 1] * w
            hi = self.hi[rows, k] * (1 - w) + self.hi[rows, k + 1] * w
        t = self.t[rows]
        out = np.exp((1 - t) * np.log(lo) + t * np.log(hi) + self.scale[rows])
        return out  # type: ignore[no-any-return]

    def frontiers(self, rates: Sequence[float], factors: Sequence[float]) -> list[list[Choice]]:
        """Per stage, Pareto choices (fewer units, lower p99) that carry its rate stably."""
        fac = np.asarray(factors, dtype=float)[self.sid]
        rate = np.maximum(np.asarray(rates, dtype=float), 1e-6)[self.sid]
        cap = 1000.0 * self.b / (self.solo * fac)
        n_min = np.maximum(1, np.ceil(rate / (cap * queueing.RHO_MAX) - 1e-9)).astype(int)
        idx = np.tile(np.arange(len(self.u)), self.extra + 1)
        n = (n_min[None, :] + np.arange(self.extra + 1)[:, None]).ravel()
        keep = n <= self.max_replicas
        rows, n = idx[keep], n[keep]
        out: list[list[Choice]] = [[] for _ in self.profs]
        if len(rows) == 0:
            return out
        f = fac[rows]
        p99, util = queueing.replica_many(
            rate[rows] / n, self.b[rows], self.wait_ms, lambda x: self._latency(rows, x) * f
        )
        sid = self.sid[rows]
        p99 = p99 * self.bias[sid]
        ok = (util <= queueing.RHO_MAX) & np.isfinite(p99)
        rows, n, p99, sid = rows[ok], n[ok], p99[ok], sid[ok]
        cost = self.u[rows] * n
        order = np.lexsort((n, p99, cost, sid))
        rows, n, p99, sid, cost = rows[order], n[order], p99[order], sid[order], cost[order]
        # running minimum of p99 within each stage: later stages get smaller offsets
        big = (float(p99.max()) + 1.0) if len(p99) else 1.0
        shifted = p99 + (len(self.profs) - sid) * big
        runmin = np.minimum.accumulate(shifted)
        first = np.ones(len(sid), dtype=bool)
        first[1:] = sid[1:] != sid[:-1]
        pareto = first.copy()
        pareto[1:] |= shifted[1:] < runmin[:-1] - 1e-9
        for i in np.flatnonzero(pareto):
            s = int(sid[i])
            out[s].append(
                Choice(
                    self.profs[s].key,
                    int(self.u[rows[i]]),
                    int(self.b[rows[i]]),
                    int(n[i]),
                    float(p99[i]),
                )
            )
        return out


@dataclass(frozen=True)
class Merged:
    """A pipeline's Pareto set of whole-pipeline choices: cost ascending, p99 descending."""

    fronts: Sequence[Sequence[Choice]]
    cost: np.ndarray
    lat: np.ndarray
    picks: list[np.ndarray]  # per stage, the chosen index for each combination
    back: list[np.ndarray]  # per stage, the parent combination in the previous stage's set

    def choose(self, k: int) -> list[Choice]:
        chosen: list[Choice] = []
        for s in range(len(self.fronts) - 1, -1, -1):
            chosen.append(self.fronts[s][int(self.picks[s][k])])
            k = int(self.back[s][k])
        return chosen[::-1]

    def cheapest_within(self, budget_ms: float) -> int | None:
        """Index of the cheapest combination with p99 <= budget (lat is descending)."""
        k = int(np.searchsorted(-self.lat, -budget_ms, side="left"))
        return k if k < len(self.lat) else None


def merge(fronts: Sequence[Sequence[Choice]], budget_ms: float) -> Merged | None:
    """Exact multiple-choice knapsack: every Pareto (units, summed p99 <= budget) combination."""
    cost = np.zeros(1)
    lat = np.zeros(1)
    picks: list[np.ndarray] = []
    back: list[np.ndarray] = []
    for front in fronts:
        if not front:
            return None
        fc = np.array([c.cost for c in front], dtype=float)
        fl = np.array([c.p99_ms for c in front])
        c2 = (cost[:, None] + fc[None, :]).ravel()
        l2 = (lat[:, None] + fl[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(front))
        idx = np.tile(np.arange(len(front)), len(cost))
        ok = l2 <= budget_ms
        if not ok.any():
            return None
        c2, l2, parent, idx = c2[ok], l2[ok], parent[ok], idx[ok]
        order = np.lexsort((l2, c2))
        c2, l2, parent, idx = c2[order], l2[order], parent[order], idx[order]
        runmin = np.minimum.accumulate(l2)
        pareto = np.ones(len(l2), dtype=bool)
        pareto[1:] = l2[1:] < runmin[:-1] - 1e-9
        cost, lat = c2[pareto], l2[pareto]
        picks.append(idx[pareto])
        back.append(parent[pareto])
    return Merged(fronts, cost, lat, picks, back)


def cheapest(fronts: Sequence[Sequence[Choice]], budget_ms: float) -> list[Choice] | None:
    """One choice per stage, least total units with summed p99 <= budget (exact)."""
    m = merge(fronts, budget_ms)
    return None if m is None else m.choose(0)


@dataclass(frozen=True)
class Item:
    pipeline: int
    stage: int
    key: str
    units: int
    memory_bytes: int


PACKINGS = ("adjacent", "spread", "isolate")


def pack(
    items: Sequence[Item], gpus: Sequence[Slot], grid: Grid, mode: str = "adjacent"
) -> list[int] | None:
    """A GPU index per item, or None. Items go in pipeline and stage order.

    adjacent: onto the GPU of the pipeline's previous item where it fits, else best fit (fewest
    GPUs, no copy between stages); spread: worst fit (least contention); isolate: best fit
    among GPUs no other pipeline uses yet, where there is one (no cross-pipeline contention).
    """
    free = [min(grid.units_per_gpu, units_of(g.gpu, grid)) for g in gpus]
    mem = [g.gpu.memory_bytes for g in gpus]
    owner: list[int | None] = [None] * len(gpus)
    where: list[int] = [-1] * len(items)
    last: dict[int, int] = {}
    order = sorted(range(len(items)), key=lambda i: (items[i].pipeline, items[i].stage))
    for i in order:
        it = items[i]
        fits = [g for g in range(len(gpus)) if free[g] >= it.units and mem[g] >= it.memory_bytes]
        if not fits:
            return None
        prev = last.get(it.pipeline)
        if mode == "spread":
            g = max(fits, key=lambda g: (free[g], -g))
        elif mode == "isolate":
            own = [g for g in fits if owner[g] in (None, it.pipeline)]
            g = min(own or fits, key=lambda g: (owner[g] is None, free[g] - it.units, g))
        elif prev is not None and prev in fits:
            g = prev
        else:
            g = min(fits, key=lambda g: (free[g] - it.units, g))
        free[g] -= it.units
        mem[g] -= it.memory_bytes
        owner[g] = it.pipeline if owner[g] in (None, it.pipeline) else -1
        where[i] = g
        last[it.pipeline] = g
    return where


def units_of(gpu: GpuInfo, grid: Grid) -> int:
    return gpu.sm_groups if grid.green else grid.units_per_gpu


def items_for(
    world: PolicyInput, chosen: Mapping[str, Choice], profiles: Mapping[str, StageProfile]
) -> list[Item]:
    out: list[Item] = []
    for pi, p in enumerate(world.pipelines):
        for si, st in enumerate(p.stages):
            key = f"{p.name}/{st.name}"
            c = chosen[key]
            mem = profiles[key].memory_bytes(c.batch)
            out.extend(Item(pi, si, key, c.units, mem) for _ in range(c.replicas))
    return out


def assemble(
    policy: str,
    world: PolicyInput,
    chosen: Mapping[str, Choice],
    items: Sequence[Item],
    where: Sequence[int],
    grid: Grid,
    *,
    max_wait_us: int,
    planned_qps: Mapping[str, float],
    clamped: Sequence[str] = (),
    reason: str = "",
) -> PlanSpec:
    gpus = slots(world)
    next_group = [0] * len(gpus)
    replicas: dict[str, list[ReplicaSpec]] = {}
    for it, g in zip(items, where, strict=True):
        c = chosen[it.key]
        rid = f"{it.key.replace('/', '.')}.{len(replicas.get(it.key, []))}"
        groups: tuple[int, ...] = ()
        if grid.green:
            groups = tuple(range(next_group[g], next_group[g] + it.units))
            next_group[g] += it.units
        spec = ReplicaSpec(
            rid,
            gpus[g].node,
            gpus[g].gpu.index,
            grid.percent(it.units),
            c.batch,
            max_wait_us,
            groups,
        )
        replicas.setdefault(it.key, []).append(spec)
    stages = []
    for p in world.pipelines:
        for st in p.stages:
            key = f"{p.name}/{st.name}"
            stages.append(
                StageAssignment(p.name, st.name, tuple(replicas[key]), chosen[key].p99_ms)
            )
    return PlanSpec(policy, tuple(stages), dict(planned_qps), tuple(clamped), reason)


def check_plan(world: PolicyInput, plan: PlanSpec, *, time_sliced_ok: bool = False) -> list[str]:
    """Every constraint violated by `plan` (empty when it is valid)."""
    problems: list[str] = []
    profiles = as_profiles(world.profiles)
    gpus = {(n.name, g.index): g for n in world.nodes for g in n.gpus}
    share: dict[tuple[str, int], float] = {}
    mem: dict[tuple[str, int], int] = {}
    groups: dict[tuple[str, int], list[int]] = {}
    ids: set[str] = set()
    seen: set[str] = set()
    for a in plan.stages:
        key = f"{a.pipeline}/{a.stage}"
        seen.add(key)
        if not a.replicas:
            problems.append(f"{key}: no replica")
        for r in a.replicas:
            if r.replica_id in ids:
                problems.append(f"{key}: duplicate replica id {r.replica_id}")
            ids.add(r.replica_id)
            g = (r.node, r.gpu)
            if g not in gpus:
                problems.append(f"{r.replica_id}: no GPU {g}")
                continue
            if not (0 < r.sm_percent <= 100 + 1e-9):
                problems.append(f"{r.replica_id}: share {r.sm_percent} outside (0, 100]")
            if r.max_batch < 1:
                problems.append(f"{r.replica_id}: max_batch {r.max_batch} < 1")
            share[g] = share.get(g, 0.0) + r.sm_percent
            prof = profiles.get(key)
            if prof is not None:
                mem[g] = mem.get(g, 0) + prof.memory_bytes(r.max_batch)
            groups.setdefault(g, []).extend(r.sm_groups)
    for p in world.pipelines:
        for st in p.stages:
            if f"{p.name}/{st.name}" not in seen:
                problems.append(f"{p.name}/{st.name}: missing from plan")
    for g, total in share.items():
        if total > 100 + 1e-6 and not time_sliced_ok:
            problems.append(f"GPU {g}: shares sum to {total:.1f}% > 100%")
        if mem.get(g, 0) > gpus[g].memory_bytes:
            problems.append(f"GPU {g}: memory {mem[g]} > {gpus[g].memory_bytes}")
        gl = groups.get(g, [])
        if len(gl) != len(set(gl)):
            problems.append(f"GPU {g}: SM groups overlap")
        if gl and (max(gl) >= gpus[g].sm_groups or min(gl) < 0):
            problems.append(f"GPU {g}: SM group index out of range")
    return problems


def total_units(plan: PlanSpec) -> float:
    return sum(r.sm_percent for a in plan.stages for r in a.replicas)
