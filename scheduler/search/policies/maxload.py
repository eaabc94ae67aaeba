"""`max-load`: the highest load the given GPUs carry with every pipeline's p99 under its QoS.

Load is one multiplier L over the pipelines' relative weights (option `weights`:
"name=w,..."; `from-load` takes the mix of the offered load; default equal). Two searches
over partitioned plans (SM shares of a GPU add up to 100% at most), then the baselines' plans:

1. Load search. For a trial L, `solver.Solver` gives each stage Pareto (share, batch,
   replicas) choices that carry its rate, picks per pipeline the combination with the most
   latency headroom that still packs onto the GPUs, and checks the packed plan with the full
   contention-aware predictor; largest batches are tried first (fewest busy cycles per item,
   so the least bandwidth pressure on co-runners). L is bisected geometrically between an upper
   bound (every stage at its best throughput per SM on all GPUs) and the most that the plans
   found so far carry (each plan is pushed to its own limit by the vectorised predictor).
2. Local search (`localsearch.Polish`): hill-climbing over whole plans, from that plan and
   from the same stages data-parallel on every GPU, every neighbour predicted whole
   (contention included).

3. Baselines (option `baselines`, default exclusive, even, feedback): each baseline's plan of
   the same world, as the baseline builds it (placement, replica counts, batches): whole GPUs
   taken in turns, even shares, feedback's first plan. Each that meets the constraints (memory
   too) is pushed to the highest load the full predictor passes. The partitioned plan is kept
   only where it carries more than the best of them by more than `tolerance`: where the
   predictor sees no gain, caps only slow a stage (DESIGN.md, "When partitioning pays"). So
   max-load is never predicted to carry less than a baseline; the plan's `reason` names the
   candidate that won and what the others carried. Uncapped co-location
   (`exclusive:sharing=mps`) is exclusive's placement and batches, and the predictor prices
   shares past 100% of a GPU as turns either way: exclusive's plan stands for both. The choice
   (`best_candidate`) is min-resource's too, where it plans for the most of a target it can.

The plan returned is verified by the full predictor at the load it reports, to `tolerance`
(default 1%).

Options (strings in PolicyInput.options): weights, tolerance, polish_budget (replica
predictions the local search may spend; 0 turns it off), share_step (MPS %, default 10;
5, 2 or 1 where more than 5, 10 or 25 stages share a GPU; unset on such a GPU, the next
finer grid is searched too and the better plan kept),
batches ("1,8,32"; default each profile's), max_wait_us (2000), max_replicas (per stage,
default max(4, 2 x GPUs)), transport (ref|wire), baselines (registry names, comma-separated;
"none" grades the partitioned search alone).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import replace

from common.errors import CamelotError, InvalidArgument, ResourceExhausted
from scheduler.perfmodel.predictor import predict
from scheduler.policy import PlanSpec, PolicyInput
from scheduler.search.localsearch import Polish
from scheduler.search.planning import check_plan
from scheduler.search.policies import get_policy
from scheduler.search.solver import Solver


def weights_follow_load(options: Mapping[str, str]) -> bool:
    """Max-load plans (max-load, exclusive) carry the most load at their weights; they depend on
    the offered load only where the weights are taken from it."""
    return options.get("weights", "") == "from-load"


def weights(world: PolicyInput) -> dict[str, float]:
    raw = world.options.get("weights", "")
    names = [p.name for p in world.pipelines]
    if weights_follow_load(world.options):
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


# bisection on the load stops at this bracket; the local search takes it from there
COARSE = 0.03
# replica predictions the local search may spend (option polish_budget): a small world
# (<= 3 stages on 2 GPUs) converges within it; 4 x 4 stages on 8 GPUs does not start a round
POLISH_BUDGET = 8000
KICKS = 6  # restarts of the local search from a random two-move perturbation of the best


# the baselines the experiments compare max-load with; the registry builds their plans
BASELINES = ("exclusive", "even", "feedback")


class MaxLoad:
    name = "max-load"
    follows_load = staticmethod(weights_follow_load)

    def plan(self, world: PolicyInput) -> PlanSpec:
        if not world.pipelines:
            return PlanSpec(self.name, ())
        w = weights(world)
        solver = Solver(world, self.name, large_batches_first=True)
        found = search_or_none(solver, w)
        fine_world = finer_grid(world, solver)
        if fine_world is not None:
            # the search on the next finer grid too, and the better of the two: neither grid
            # wins everywhere (on the committed profiles, with a 0.97 ms host part, the seven
            # pipelines on one H200 carry 40% more on 1% than on 2%, the three PyTorch ones 55%
            # more on 2% than on 5%, and the four reference ones on one H100 4% less on 1%)
            fine = Solver(fine_world, self.name, large_batches_first=True)
            other = search_or_none(fine, w)
            if other is not None and (found is None or other[1] > found[1]):
                solver, found = fine, other
        plan, best_load, won = best_candidate(solver, w, found)
        at = {n: best_load * w[n] for n in w}
        reason = f"max load x{best_load:.4g} over weights: {won}"
        if solver.clamped:
            reason += f"; QoS unreachable, clamped: {', '.join(solver.clamped)}"
        return PlanSpec(self.name, plan.stages, at, tuple(solver.clamped), reason)


# the grid tried beside the solver's own where the operator set none (MPS %): only where more
# than five stages share a GPU (the solver's grid is then finer than 10%), where the smallest
# stages' share decides what is left for the rest; a GPU of a few stages gained nothing on the
# committed profiles (16 stages on 8 GPUs: the same plan on 5% as on 10%, at twice the time)
FINER_STEP = {5.0: "2", 2.0: "1"}


def finer_grid(world: PolicyInput, solver: Solver) -> PolicyInput | None:
    """`world` on the grid one step finer than `solver`'s (FINER_STEP), where the operator set
    no `share_step`; None where there is none to try."""
    finer = FINER_STEP.get(solver.opts.share_step)
    if finer is None or "share_step" in world.options:
        return None
    return replace(world, options={**world.options, "share_step": finer})


def search_or_none(solver: Solver, w: Mapping[str, float]) -> tuple[PlanSpec, float] | None:
    """`search`, or None where no partitioned plan meets the QoS at all: a baseline may still
    carry some load (whole GPUs in turns, where shares small enough for every stage are too
    slow)."""
    try:
        return search(solver, w)
    except ResourceExhausted:
        return None


def best_candidate(
    solver: Solver, w: Mapping[str, float], found: tuple[PlanSpec, float] | None
) -> tuple[PlanSpec, float, str]:
    """Of the partitioned plan `found` (with the multiple of `w` it carries; None where the
    search found none) and the baselines' plans of the solver's world, planned for the weights
    `w`, the one predicted to carry the highest multiple of `w`: that plan, the multiple, and
    which won with what the others carried (for a plan's reason). The partitioned plan is kept
    only where it carries more than the best baseline by more than the option `tolerance`."""
    world = solver.world
    tol = _number(world, "tolerance", 0.01)
    # a baseline that weighs the pipelines (exclusive) plans for these weights, not its own
    spelled = ",".join(f"{n}={v!r}" for n, v in w.items())
    weighted = replace(world, options={**world.options, "weights": spelled})
    plan: PlanSpec | None = None
    best_load = 0.0
    if found is not None:
        plan, best_load = found
    carried = {"partitioned": best_load}
    base: tuple[str, PlanSpec, float] | None = None
    for name, candidate in baseline_plans(weighted):
        load = carried_by(solver, candidate, w, best_load or upper_bound(solver, w), tol / 4)
        carried[name] = load
        if load > (base[2] if base else 0.0):
            base = (name, candidate, load)
    won = "partitioned"
    # partitioning must pay, and by more than the search's own resolution
    if base is not None and (plan is None or base[2] * (1 + tol) >= best_load):
        won, plan, best_load = base
    if plan is None:
        raise ResourceExhausted(
            "no plan meets the QoS targets on these GPUs even at a trickle of load "
            "(too little GPU memory or share for the stages, and no baseline's plan either)"
        )
    if won != "partitioned":
        plan = _predicted(solver, plan, {n: best_load * w[n] for n in w})
    others = ", ".join(f"{k} x{v:.4g}" for k, v in carried.items() if k != won)
    label = "the partitioned plan" if won == "partitioned" else f"{won}'s plan"
    return plan, best_load, f"{label} (carried: {others})" if others else label


def baseline_plans(world: PolicyInput) -> list[tuple[str, PlanSpec]]:
    """The plan each baseline (option `baselines`) makes of this world, as it makes it; one
    that has none here (say, even with more stages than SM groups) is left out."""
    raw = world.options.get("baselines", ",".join(BASELINES))
    names = [n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none"]
    out = []
    for name in names:
        if name not in BASELINES:
            raise InvalidArgument(f"baselines: {name!r} is not one of {', '.join(BASELINES)}")
        try:
            plan = get_policy(name).plan(world)
        except CamelotError:
            continue
        # a baseline does not check memory or the like: a plan that breaks a constraint is none
        # (shares past 100% are whole GPUs taken in turns, or caps that overlap)
        if not check_plan(world, plan, time_sliced_ok=True):
            out.append((name, plan))
    return out


def carried_by(
    solver: Solver, plan: PlanSpec, w: Mapping[str, float], near: float, tol: float
) -> float:
    """The highest multiple of the rates `w` (to `tol`) at which the full predictor passes
    `plan` against the solver's targets, searched from `near`; 0 if not even near / 1e6."""

    def ok(load: float) -> bool:
        rates = {n: load * w[n] for n in w}
        return solver._meets(predict(solver.world, plan, rates, transport=solver.opts.transport))

    lo = hi = near
    if ok(lo):
        hi = lo * 2
        for _ in range(64):  # a plan carries a bounded load: this ends long before
            if not ok(hi):
                break
            lo, hi = hi, hi * 2
    else:
        while not ok(lo):
            if lo < near * 1e-6:
                return 0.0
            hi, lo = lo, lo / 2
    while hi / lo > 1 + tol:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _predicted(solver: Solver, plan: PlanSpec, at: Mapping[str, float]) -> PlanSpec:
    """`plan` with the full predictor's stage p99s at `at`."""
    pred = predict(solver.world, plan, at, transport=solver.opts.transport)
    stages = tuple(
        replace(a, predicted_p99_ms=pred.stage(a.pipeline, a.stage).p99_ms) for a in plan.stages
    )
    return replace(plan, stages=stages)


def search(solver: Solver, w: Mapping[str, float]) -> tuple[PlanSpec, float]:
    """The plan that carries the highest multiple of the rates `w`, and that multiple."""
    world = solver.world
    tol = _number(world, "tolerance", 0.01)
    budget = int(_number(world, "polish_budget", POLISH_BUDGET))
    polish = Polish(solver, w, budget)
    hi = upper_bound(solver, w) * 1.0001
    lo = hi / 16

    def at(load: float) -> dict[str, float]:
        return {n: load * w[n] for n in w}

    best = solver.attempt(at(lo), slack=True)
    while best is None and lo > hi * 1e-5:
        hi, lo = lo, lo / 16
        best = solver.attempt(at(lo), slack=True)
    if best is None:
        raise ResourceExhausted(
            "no plan meets the QoS targets on these GPUs even at a trickle of load "
            "(too little GPU memory or share for the stages)"
        )
    # the candidate set that worked goes on (the local search mixes batches later), and a
    # plan found at one load carries more: the bisection goes on from the most it carries
    solver.pin()
    plan = best[0]
    state = polish.state_of(plan)
    best_load = polish.max_load(state, lo, 1.0, hi)
    failed = hi
    while failed / best_load > 1 + max(tol, COARSE):
        mid = (best_load * failed) ** 0.5
        got = solver.attempt(at(mid), slack=True)
        if got is None:
            failed = mid
            continue
        mine = polish.state_of(got[0])
        load = polish.max_load(mine, mid, 1.0, failed)
        if load > best_load:
            plan, state, best_load = got[0], mine, load
    best_load = polish.max_load(state, best_load, tol, best_load * (1 + 2 * COARSE))
    if budget > 0:
        # two starts: the load search's plan, and the same stages data-parallel
        starts = [(state, best_load)]
        alt = polish.replicated(state)
        if alt is not None:
            carried = polish.carried(alt, best_load, tol)
            if carried > 0:
                starts.append((alt, carried))
        best_state = state
        for start, load in starts:
            polish.spent = 0
            found, load = polish.run(start, load, tol)
            if load > best_load:
                best_state, best_load = found, load
        # kicks: two random moves away from the best, climbed again; the budget bounds them
        rng = random.Random(0)
        rows = sum(len(gs) for _, _, gs in best_state)
        polish.spent = 0
        for _ in range(KICKS if polish.affords(rows) else 0):
            polish.spent = 0
            kicked = best_state
            for _ in range(2):
                moves = polish.neighbours(kicked, set(range(len(kicked))))
                if not moves:
                    break
                kicked = moves[rng.randrange(len(moves))]
            carried = polish.carried(kicked, best_load, tol)
            if carried <= 0 or polish.spent > budget:
                continue
            found, load = polish.run(kicked, carried, tol)
            if load > best_load:
                best_state, best_load = found, load
        if best_state is not state:
            plan = polish.plan_of(best_state, at(best_load), "")
    return _verified(solver, plan, at, best_load, tol)


def _verified(
    solver: Solver,
    plan: PlanSpec,
    at: Callable[[float], dict[str, float]],
    load: float,
    tol: float,
) -> tuple[PlanSpec, float]:
    """The plan with the full predictor's stage p99s at the highest load it passes, from `load`
    down (the vectorised twin agrees to rounding, so a step back is rare and small)."""
    for _ in range(20):
        pred = predict(solver.world, plan, at(load), transport=solver.opts.transport)
        if solver._meets(pred):
            stages = tuple(
                replace(a, predicted_p99_ms=pred.stage(a.pipeline, a.stage).p99_ms)
                for a in plan.stages
            )
            return replace(plan, stages=stages), load
        load /= 1 + tol / 4
    raise ResourceExhausted("max-load: the full predictor rejects the plan the search found")


def _number(world: PolicyInput, name: str, default: float) -> float:
    try:
        value = float(world.options.get(name, str(default)))
    except ValueError:
        raise InvalidArgument(f"{name} must be a number") from None
    if not value >= 0:
        raise InvalidArgument(f"{name} must be >= 0, got {value}")
    return value
