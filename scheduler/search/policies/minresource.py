"""`min-resource`: at the current load plus headroom, the least total SM share meeting the QoS.

Target rate per pipeline: max(offered load, the scheduler's long-window arrival rate in
`measured[pipeline].arrival_qps`) x (1 + headroom). Taking the larger of the two windows means
growth follows a rise at once while a shrink waits until the load has been low for a while.
`solver.Solver` picks each stage's cheapest (share, batch, replicas) within the pipeline's
budget, packs with best fit (fewest GPUs), and checks the plan with the full predictor at the
target: the load is spread over exactly the replicas the plan keeps, so a replica is only
removed where the remaining ones are predicted to carry it. Replica counts live only in the
plan (the number of ReplicaSpecs).

Hysteresis: the plan in force (PolicyInput.current) is kept while it is predicted to meet the
QoS at the target, unless a new plan saves more than `shrink_saving` (default 0.15) of its
share *and* the target has fallen more than `shrink_margin` (default 0.15) below the load the
current plan was made for.

Where the cheapest-plan search finds nothing, the plan is the one predicted to carry the most
of the target, chosen as max-load chooses (`maxload.best_candidate`, the target as weights):
max-load's partitioned search (load search plus local search, `maxload.search`) against the
baselines' plans of the same world (exclusive, even, feedback; option `baselines`), the
partitioned plan kept only where it carries more than the best baseline by more than
`tolerance` (1%). On one H200 the PyTorch pipelines' ten stages on small shares carry less than
half of what whole GPUs taken in turns do (docs/results/maxload-candidates.md). The plan carries all
of the target, or a fraction, and then the pipelines are clamped to that fraction, listed in
`clamped`, and nothing grows past what the GPUs hold; either way its reason names the
candidate that won and what the others carried.

Measurements over the model: a pipeline whose windowed p99 (`measured[pipeline]`, at least
`min_samples` queries) is above `p99_fraction` (0.9, the control loop's trigger) of its target
refutes the plan in force (min-resource's own), whatever the predictor says of it (on the H200
the profiles said 5% shares carry 120 qps of every pipeline; the measured p99 was over target at
58). The plan in force is then not kept, and the pipeline is planned for 2, 4, ... up to
MAX_GROWTH times its target until the new plan gives it more share than it has: the window says
the capacity the model sees is not there, not by how much. The new plan records the real target
as its planned load, so the shrink margin is measured from it. The learned correction across
plans is the scheduler's bias (scheduler.perfmodel.bias).

A kept plan is re-sized on paper: its `planned_qps` becomes the larger of what it was made for
and the target it was just checked at, so the load it is known to carry is what an operator
sees and what the shrink margin is measured from.

Options: headroom (0.2), shrink_saving, shrink_margin, p99_fraction, min_samples (50), plus the
Solver's (share_step, batches, max_wait_us, max_replicas, transport) and, for the fallback,
max-load's (tolerance, polish_budget, baselines).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from common.errors import InvalidArgument, ResourceExhausted
from scheduler.perfmodel.predictor import predict
from scheduler.policy import PlanSpec, PolicyInput
from scheduler.search.planning import total_units
from scheduler.search.policies.maxload import best_candidate, finer_grid, search
from scheduler.search.solver import Solver

# how far past the target a pipeline the window refutes is planned, at most (2, 4, ... x)
MAX_GROWTH = 16.0


def _opt(world: PolicyInput, name: str, default: float) -> float:
    try:
        value = float(world.options.get(name, str(default)))
    except ValueError:
        raise InvalidArgument(f"option {name} must be a number") from None
    if value < 0:
        raise InvalidArgument(f"option {name} must be >= 0, got {value}")
    return value


def target_rates(world: PolicyInput, headroom: float) -> dict[str, float]:
    out = {}
    for p in world.pipelines:
        now = float(world.load_qps.get(p.name, 0.0))
        m = world.measured.get(p.name)
        long = m.arrival_qps if m is not None else 0.0
        out[p.name] = max(now, long) * (1.0 + headroom)
    return out


def _same_stages(world: PolicyInput, plan: PlanSpec) -> bool:
    want = {(p.name, s.name) for p in world.pipelines for s in p.stages}
    return {(a.pipeline, a.stage) for a in plan.stages} == want


def refuted(world: PolicyInput, fraction: float, min_samples: int) -> dict[str, float]:
    """Pipelines whose measured p99 is above `fraction` of their target, with that p99 (ms)."""
    out = {}
    for p in world.pipelines:
        m = world.measured.get(p.name)
        if m is not None and m.count >= min_samples and m.p99_ms > fraction * p.qos_p99_ms:
            out[p.name] = m.p99_ms
    return out


def units_for(plan: PlanSpec, pipelines: Collection[str]) -> float:
    """Total SM share the plan gives the stages of `pipelines`."""
    return sum(r.sm_percent for a in plan.stages if a.pipeline in pipelines for r in a.replicas)


class MinResource:
    name = "min-resource"

    def plan(self, world: PolicyInput) -> PlanSpec:
        if not world.pipelines:
            return PlanSpec(self.name, ())
        headroom = _opt(world, "headroom", 0.2)
        saving = _opt(world, "shrink_saving", 0.15)
        margin = _opt(world, "shrink_margin", 0.15)
        fraction = _opt(world, "p99_fraction", 0.9)
        min_samples = int(_opt(world, "min_samples", 50))
        target = target_rates(world, headroom)
        cur = world.current
        # hysteresis keeps min-resource's own plan; a plan another policy made (the one in force
        # when the policy was switched) is no anchor: its planned load says nothing of ours
        ours = (
            cur is not None and cur.policy == self.name and bool(cur.stages)
            and _same_stages(world, cur)
        )  # fmt: skip
        misses = refuted(world, fraction, min_samples) if ours and fraction > 0 else {}
        solver = Solver(world, self.name)
        fresh, most = self._solve(world, solver, target)
        fine_world = finer_grid(world, solver)
        if fine_world is not None:
            # as max-load: the next finer grid too, and the cheaper plan (on the committed
            # profiles at 10 qps, the three PyTorch pipelines on one H200 take 48% of it on 2%
            # steps where 5% steps take 65%, and all seven 53% on 1% where 2% take 66%)
            fine = Solver(fine_world, self.name)
            other, other_most = self._solve(fine_world, fine, target)
            if other is not None and (
                fresh is None or total_units(other[0]) < total_units(fresh[0])
            ):
                solver, fresh, most = fine, other, other_most
        if misses and fresh is not None and cur is not None:
            # the window says the plan in force is short of capacity for these pipelines, so
            # what the model calls enough is not: plan them for twice, four times ... the
            # target until the plan gives them more than they have (or the GPUs run out)
            have = units_for(cur, misses)
            scale, rates = 1.0, dict(target)
            while fresh is not None and units_for(fresh[0], misses) <= have and scale < MAX_GROWTH:
                scale *= 2.0
                rates = {p: r * (scale if p in misses else 1.0) for p, r in target.items()}
                fresh, most = self._solve(world, solver, rates)
            if fresh is not None and units_for(fresh[0], misses) <= have:
                # the cheapest plans the model knows are no larger: the most of the escalated
                # target these GPUs carry is the best plan there is
                fresh = (search(Solver(world, self.name, large_batches_first=True), rates)[0], None)
            if fresh is not None:
                fresh = (replace(fresh[0], planned_qps=dict(target)), fresh[1])
            elif most is not None:
                # clamped below: sized for the share of the escalated target that fits
                most = (most[0], most[1] * scale, most[2])
        if cur is not None and ours and not misses:
            try:
                holds = predict(world, cur, target, transport=solver.opts.transport).feasible
            except InvalidArgument:
                holds = False  # the plan in force does not fit this world any more
            if holds:
                # kept, it is known to carry the larger of its own load and this target
                known = {
                    p: max(cur.planned_qps.get(p, 0.0), target.get(p, 0.0))
                    for p in set(cur.planned_qps) | set(target)
                }
                kept = cur
                if known != dict(cur.planned_qps):
                    kept = replace(
                        cur, planned_qps=known, reason="min-resource: plan in force holds"
                    )
                if fresh is None:
                    return kept
                new_units, cur_units = total_units(fresh[0]), total_units(cur)
                fell = all(
                    target[p] <= cur.planned_qps.get(p, 0.0) * (1.0 - margin) for p in target
                )
                if not (new_units < cur_units * (1.0 - saving) and fell):
                    return kept
        if fresh is not None:
            # the fallback's plan carries all of the target: its reason names the winner
            why = fresh[0].reason or "min-resource at load + headroom"
            if misses:
                why += f" (measured p99 over {fraction:g} x QoS: {', '.join(sorted(misses))})"
            return replace(fresh[0], reason=why)
        if most is None:
            raise ResourceExhausted("no plan fits these GPUs even at a trickle of the load")
        # the largest common fraction of the target that fits; every short pipeline clamped
        plan, frac, won = most
        clamped = tuple(sorted(set(solver.clamped) | {p for p, r in target.items() if r > 0}))
        return PlanSpec(
            self.name,
            plan.stages,
            {p: r * min(1.0, frac) for p, r in target.items()},
            clamped,
            f"target not reachable: clamped to {min(1.0, frac):.0%} of load + headroom by {won}",
        )

    def _solve(
        self, world: PolicyInput, solver: Solver, target: Mapping[str, float]
    ) -> tuple[tuple[PlanSpec, Any] | None, tuple[PlanSpec, float, str] | None]:
        """The cheapest plan at `target` (None if none), and where there is none, the plan
        carrying the most of the target, with the fraction carried and which candidate won."""
        fresh = None
        # tighter budgets (more units) first where contention defeats the cheapest plan
        for tighten in (1.0, 0.8, 0.6):
            fresh = solver.attempt(target, "min-resource at load + headroom", tighten=tighten)
            if fresh is not None:
                break
        else:
            fresh = solver.attempt(target, "min-resource at load + headroom", slack=True)
        most: tuple[PlanSpec, float, str] | None = None
        if fresh is None and any(r > 0 for r in target.values()):
            # the cheapest-plan search found nothing: max-load's choice (its search with the
            # local search, or a baseline's plan) carries the most of the target, maybe all
            wide = Solver(world, self.name, large_batches_first=True)
            found: tuple[PlanSpec, float] | None
            try:
                found = search(wide, target)
            except ResourceExhausted:
                found = None  # whole GPUs in turns may still carry some of it
            most = best_candidate(wide, target, found)
            if most[1] >= 1.0:
                why = f"min-resource at load + headroom by {most[2]}"
                plan = replace(most[0], policy=self.name, planned_qps=dict(target), reason=why)
                fresh = (plan, None)
        return fresh, most
