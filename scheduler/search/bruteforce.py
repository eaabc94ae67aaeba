"""Exhaustive search for the highest supported load on small instances, to grade `max-load`.

The space is max-load's own: per stage one batch size, one share (in `share_step` units) for
all its replicas, 1..`max_replicas` replicas, each on any GPU (several on one GPU allowed);
per-GPU shares <= 100% and memory that fits. Every plan's load is scored with the same
predictor (`scheduler.perfmodel.predictor.predict`). It is a branch and bound, exact: plans are
visited by an upper bound on their load (each stage's solo capacity: contention and QoS only lower
it), and a plan is only bisected for its load if it can beat the best found so far.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.perfmodel import queueing
from scheduler.perfmodel.predictor import predict
from scheduler.policy import PlanSpec, PolicyInput, ReplicaSpec, StageAssignment
from scheduler.search.planning import Grid, slots, stage_profiles


@dataclass(frozen=True)
class Result:
    load: float  # the multiplier over the weights
    plan: PlanSpec | None
    plans_seen: int
    plans_scored: int


def _placements(n_gpus: int, max_replicas: int) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for n in range(1, max_replicas + 1):
        out.extend(itertools.combinations_with_replacement(range(n_gpus), n))
    return out


def best_load(
    world: PolicyInput,
    weights: Mapping[str, float],
    *,
    batches: Sequence[int] = (1, 8, 32),
    share_step: float = 10.0,
    max_replicas: int = 2,
    max_wait_us: int = 2000,
    tolerance: float = 0.002,
) -> Result:
    profiles = stage_profiles(world)
    gpus = slots(world)
    grid = Grid.for_world(world, share_step)
    keys = [(p.name, s.name) for p in world.pipelines for s in p.stages]
    placements = _placements(len(gpus), max_replicas)
    # per stage: every (units, batch, placement) with its per-GPU units, memory and capacity
    options = []
    for pipe, stage in keys:
        prof = profiles[f"{pipe}/{stage}"]
        rows = []
        for u in range(1, grid.units_per_gpu + 1):
            for b in (b for b in batches if b <= prof.max_batch):
                cap = prof.throughput(grid.percent(u), b) * queueing.RHO_MAX / weights[pipe]
                for place in placements:
                    use = np.zeros(len(gpus))
                    mem = np.zeros(len(gpus))
                    for g in place:
                        use[g] += u
                        mem[g] += prof.memory_bytes(b)
                    rows.append((u, b, place, use, mem, cap * len(place)))
        options.append(rows)
    sizes = [len(o) for o in options]
    uses = [np.array([r[3] for r in o]) for o in options]
    mems = [np.array([r[4] for r in o]) for o in options]
    caps = [np.array([r[5] for r in o]) for o in options]
    # all combinations, as index grids (small instances only: <= 3 stages, <= 2 GPUs)
    grids = np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij")
    idx = [g.ravel() for g in grids]
    total_use = sum(uses[s][idx[s]] for s in range(len(keys)))
    total_mem = sum(mems[s][idx[s]] for s in range(len(keys)))
    gpu_units = np.array(
        [min(grid.units_per_gpu, g.gpu.sm_groups or grid.units_per_gpu) for g in gpus]
    )
    gpu_mem = np.array([g.gpu.memory_bytes for g in gpus])
    ok = np.all(total_use <= gpu_units, axis=1) & np.all(total_mem <= gpu_mem, axis=1)
    bound = np.min(np.stack([caps[s][idx[s]] for s in range(len(keys))]), axis=0)
    cand = np.flatnonzero(ok)
    cand = cand[np.argsort(-bound[cand], kind="stable")]
    best, best_plan, scored = 0.0, None, 0

    def feasible(plan: PlanSpec, load: float) -> bool:
        return predict(world, plan, {p: load * w for p, w in weights.items()}).feasible

    for c in cand:
        ub = float(bound[c])
        if ub <= best * (1 + tolerance):
            break
        plan = _plan(
            world, keys, [options[s][idx[s][c]] for s in range(len(keys))], gpus, grid, max_wait_us
        )
        target = max(best * (1 + tolerance), ub * 1e-4)
        if not feasible(plan, target):
            continue
        scored += 1
        lo, hi = target, ub
        while hi / lo > 1 + tolerance:
            mid = (lo * hi) ** 0.5
            if feasible(plan, mid):
                lo = mid
            else:
                hi = mid
        best, best_plan = lo, plan
    return Result(best, best_plan, len(cand), scored)


def _plan(
    world: PolicyInput,
    keys: Sequence[tuple[str, str]],
    rows: Sequence[tuple[int, int, tuple[int, ...], object, object, float]],
    gpus: Sequence[object],
    grid: Grid,
    max_wait_us: int,
) -> PlanSpec:
    stages = []
    next_group: dict[int, int] = {}
    for (pipe, stage), (u, b, place, *_rest) in zip(keys, rows, strict=True):
        reps = []
        for i, g in enumerate(place):
            slot = gpus[g]
            groups: tuple[int, ...] = ()
            if grid.green:
                start = next_group.get(g, 0)
                groups = tuple(range(start, start + u))
                next_group[g] = start + u
            reps.append(
                ReplicaSpec(
                    f"{pipe}.{stage}.{i}",
                    slot.node,  # type: ignore[attr-defined]
                    slot.gpu.index,  # type: ignore[attr-defined]
                    grid.percent(u),
                    b,
                    max_wait_us,
                    groups,
                )
            )
        stages.append(StageAssignment(pipe, stage, tuple(reps)))
    return PlanSpec("bruteforce", tuple(stages))
