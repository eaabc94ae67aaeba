"""Building blocks the predictive policies share: share grid, per-stage choices, packing, checks.

A stage's choice is (share units per replica, max batch, replica count); which choices a stage
has, and their cheapest combination per pipeline, is `frontiers`' part. `pack` puts the chosen
replicas on GPUs (shares and memory), keeping a pipeline's adjacent stages on one GPU where it
can. `assemble` turns that into a PlanSpec, and `check_plan` states every constraint a plan must
meet; `memory_problems` is the one the scheduler checks every plan against before it stores it
(a plan whose replicas do not fit a GPU's memory would fail at their start).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import FailedPrecondition, InvalidArgument
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
    gpus = {(n.name, g.index): g for n in world.nodes for g in n.gpus}
    share: dict[tuple[str, int], float] = {}
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
            groups.setdefault(g, []).extend(r.sm_groups)
    for p in world.pipelines:
        for st in p.stages:
            if f"{p.name}/{st.name}" not in seen:
                problems.append(f"{p.name}/{st.name}: missing from plan")
    for g, total in share.items():
        if total > 100 + 1e-6 and not time_sliced_ok:
            problems.append(f"GPU {g}: shares sum to {total:.1f}% > 100%")
        gl = groups.get(g, [])
        if len(gl) != len(set(gl)):
            problems.append(f"GPU {g}: SM groups overlap")
        if gl and (max(gl) >= gpus[g].sm_groups or min(gl) < 0):
            problems.append(f"GPU {g}: SM group index out of range")
    return problems + memory_problems(world, plan)


def memory_problems(world: PolicyInput, plan: PlanSpec) -> list[str]:
    """Each GPU of the world whose replicas in `plan` need more memory, by their stages'
    profiles (`StageProfile.memory_bytes` at their batch), than it has for them
    (`GpuInfo.memory_bytes`), named with both figures in bytes. A stage without a profile
    counts nothing: memory is known from the profiles only."""
    profiles = as_profiles(world.profiles)
    gpus = {(n.name, g.index): g for n in world.nodes for g in n.gpus}
    need: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for a in plan.stages:
        prof = profiles.get(f"{a.pipeline}/{a.stage}")
        if prof is None:
            continue
        for r in a.replicas:
            if (r.node, r.gpu) in gpus:
                need.setdefault((r.node, r.gpu), []).append(
                    (r.replica_id, prof.memory_bytes(r.max_batch))
                )
    problems = []
    for (node, index), held in need.items():
        total, have = sum(b for _, b in held), gpus[(node, index)].memory_bytes
        if total > have:
            what = ", ".join(f"{rid} {b}" for rid, b in held)
            problems.append(
                f"{node} GPU {index}: replicas need {total} bytes ({what}), "
                f"it has {have} bytes for them"
            )
    return problems


def total_units(plan: PlanSpec) -> float:
    return sum(r.sm_percent for a in plan.stages for r in a.replicas)
