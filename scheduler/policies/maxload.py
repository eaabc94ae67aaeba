"""`max-load`: the highest load the given GPUs carry with every pipeline's p99 under its QoS.

Load is one multiplier L over the pipelines' relative weights (option `weights`:
"name=w,..."; `from-load` takes the mix of the offered load; default equal). For a trial L,
`solver.Solver` gives each stage Pareto (share, batch, replicas) choices that carry its rate
(share in proportion to its work, so none is a bottleneck), picks per pipeline the combination
with the most latency headroom that still packs onto the GPUs (adjacent stages together),
and checks the packed plan with the full contention-aware predictor. L itself is found by a
geometric bisection between an upper bound (every stage at its best throughput per SM on all
GPUs) and the largest load found feasible, to `tolerance` (default 1%).

Options (strings in PolicyInput.options): weights, tolerance, share_step (MPS %, default 10),
batches ("1,8,32"; default each profile's), max_wait_us (2000), max_replicas (per stage,
default max(4, 2 x GPUs)), transport (ref|wire).
"""

from __future__ import annotations

from collections.abc import Mapping

from common.errors import InvalidArgument, ResourceExhausted
from scheduler.policy import PlanSpec, PolicyInput
from scheduler.solver import Solver


def weights(world: PolicyInput) -> dict[str, float]:
    raw = world.options.get("weights", "")
    names = [p.name for p in world.pipelines]
    if raw == "from-load":
        w = {n: float(world.load_qps.get(n, 0.0)) for n in names}
        if sum(w.values()) <= 0:
            return dict.fromkeys(names, 1.0)
        return w
    w = dict.fromkeys(names, 1.0)
    if raw:
        for part in raw.split(","):
            name, sep, value = part.partition("=")
            if not sep or name.strip() not in w:
                raise InvalidArgument(f"weights: {part!r} is not <pipeline>=<weight>")
            try:
                w[name.strip()] = float(value)
            except ValueError:
                raise InvalidArgument(f"weights: {value!r} is not a number") from None
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise InvalidArgument("weights must be >= 0 and not all zero")
    return w


def upper_bound(solver: Solver, w: Mapping[str, float]) -> float:
    """No plan carries more: each stage's best items/s per SM unit, all GPUs' units shared."""
    units = solver.capacity_units()
    need = 0.0  # units per unit of load
    for p in solver.world.pipelines:
        for s in p.stages:
            prof = solver.profiles[f"{p.name}/{s.name}"]
            best = max(
                prof.throughput(solver.grid.percent(u), b) / u
                for u in range(1, solver.grid.units_per_gpu + 1)
                for b in solver.batches(prof.key)
                if b <= prof.max_batch
            )
            need += w[p.name] / best
    return units / need if need > 0 else 0.0


class MaxLoad:
    name = "max-load"

    def plan(self, world: PolicyInput) -> PlanSpec:
        if not world.pipelines:
            return PlanSpec(self.name, ())
        solver = Solver(world, self.name)
        w = weights(world)
        try:
            tol = float(world.options.get("tolerance", "0.01"))
        except ValueError:
            raise InvalidArgument("tolerance must be a number") from None
        hi = upper_bound(solver, w) * 1.0001
        lo = hi / 16

        def at(load: float) -> dict[str, float]:
            return {n: load * w[n] for n in w}

        def attempt(rates: dict[str, float]) -> tuple[PlanSpec, object] | None:
            return solver.attempt(rates, slack=True)

        best = attempt(at(lo))
        while best is None and lo > hi * 1e-5:
            hi, lo = lo, lo / 16
            best = attempt(at(lo))
        if best is None:
            raise ResourceExhausted(
                "no plan meets the QoS targets on these GPUs even at a trickle of load "
                "(too little GPU memory or share for the stages)"
            )
        best_load = lo
        while hi / lo > 1 + tol:
            mid = (lo * hi) ** 0.5
            got = attempt(at(mid))
            if got is None:
                hi = mid
            else:
                lo, best, best_load = mid, got, mid
        plan, _ = best
        reason = f"max load x{best_load:.4g} over weights"
        if solver.clamped:
            reason += f"; QoS unreachable, clamped: {', '.join(solver.clamped)}"
        return PlanSpec(plan.policy, plan.stages, at(best_load), tuple(solver.clamped), reason)
