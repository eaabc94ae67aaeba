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
current plan was made for. Where the cheapest-plan search finds nothing, max-load's search
(load search plus local search, `maxload.search`) with the target as weights finds the most of
the target the GPUs carry: all of it, or a fraction, and then the pipelines are clamped to
that fraction, listed in `clamped`, and nothing grows past what the GPUs hold.

Options: headroom (0.2), shrink_saving, shrink_margin, plus the Solver's (share_step, batches,
max_wait_us, max_replicas, transport).
"""

from __future__ import annotations

from dataclasses import replace

from common.errors import InvalidArgument, ResourceExhausted
from scheduler.planning import total_units
from scheduler.policies.maxload import search
from scheduler.policy import PlanSpec, PolicyInput
from scheduler.predictor import predict
from scheduler.solver import Solver


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


class MinResource:
    name = "min-resource"

    def plan(self, world: PolicyInput) -> PlanSpec:
        if not world.pipelines:
            return PlanSpec(self.name, ())
        headroom = _opt(world, "headroom", 0.2)
        saving = _opt(world, "shrink_saving", 0.15)
        margin = _opt(world, "shrink_margin", 0.15)
        target = target_rates(world, headroom)
        solver = Solver(world, self.name)
        fresh = None
        # tighter budgets (more units) first where contention defeats the cheapest plan
        for tighten in (1.0, 0.8, 0.6):
            fresh = solver.attempt(target, "min-resource at load + headroom", tighten=tighten)
            if fresh is not None:
                break
        else:
            fresh = solver.attempt(target, "min-resource at load + headroom", slack=True)
        most: tuple[PlanSpec, float] | None = None
        if fresh is None and any(r > 0 for r in target.values()):
            # the cheapest-plan search found nothing: max-load's (with its local search)
            # finds the most of the target these GPUs carry, which may be all of it
            most = search(Solver(world, self.name, large_batches_first=True), target)
            if most[1] >= 1.0:
                fresh = (replace(most[0], planned_qps=dict(target)), None)
        cur = world.current
        # hysteresis keeps min-resource's own plan; a plan another policy made (the one in force
        # when the policy was switched) is no anchor: its planned load says nothing of ours
        if cur is not None and cur.policy == self.name and cur.stages and _same_stages(world, cur):
            try:
                holds = predict(world, cur, target, transport=solver.opts.transport).feasible
            except InvalidArgument:
                holds = False  # the plan in force does not fit this world any more
            if holds:
                if fresh is None:
                    return cur
                new_units, cur_units = total_units(fresh[0]), total_units(cur)
                fell = all(
                    target[p] <= cur.planned_qps.get(p, 0.0) * (1.0 - margin) for p in target
                )
                if not (new_units < cur_units * (1.0 - saving) and fell):
                    return cur
        if fresh is not None:
            return replace(fresh[0], reason="min-resource at load + headroom")
        if most is None:
            raise ResourceExhausted("no plan fits these GPUs even at a trickle of the load")
        # the largest common fraction of the target that fits; every short pipeline clamped
        plan, frac = most
        clamped = tuple(sorted(set(solver.clamped) | {p for p, r in target.items() if r > 0}))
        return PlanSpec(
            self.name,
            plan.stages,
            {p: r * frac for p, r in target.items()},
            clamped,
            f"target not reachable: clamped to {frac:.0%} of load + headroom",
        )
