"""The search core of the predictive policies: a plan at given rates that the predictor passes.

`Solver.attempt` turns per-pipeline rates into a packed, verified plan: each stage's Pareto
choices (`frontiers.Candidates`), one combination per pipeline (`frontiers.merge`: fewest units,
or in slack mode the most latency headroom that still packs), packing (`planning.pack`), then
the full contention-aware predictor; its contention factors price the next round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from common.errors import InvalidArgument
from scheduler.perfmodel.predictor import HopCosts, predict
from scheduler.policy import PlanSpec, PolicyInput
from scheduler.search.frontiers import Candidates, Merged, merge
from scheduler.search.planning import (
    PACKINGS,
    Choice,
    Grid,
    Options,
    assemble,
    items_for,
    pack,
    slots,
    stage_profiles,
    units_of,
)


class Solver:
    """Plans a world at given per-pipeline rates with the least units that meet every QoS.

    Per-stage choices are made with a contention factor per stage; the plan is then packed and
    checked by the full predictor, whose factors feed the next round (three at most). Factors
    of the last feasible plan seed the next call, so a search over loads converges quickly.
    """

    def __init__(
        self, world: PolicyInput, policy: str, *, large_batches_first: bool = False
    ) -> None:
        self.world, self.policy = world, policy
        self.profiles = stage_profiles(world)
        self.gpus = slots(world)
        opts = dict(world.options)
        per_gpu = sum(len(p.stages) for p in world.pipelines) / max(1, len(self.gpus))
        if "share_step" not in opts and per_gpu > 5:
            # MPS takes any whole percentage: a GPU of many stages gets a finer grid, so that
            # the stages have splits to choose among (ten stages on a 10% grid have one, and
            # 22 on a 5% grid none); each step divides 100, and the search stays under a second
            opts["share_step"] = "5" if per_gpu <= 10 else "2" if per_gpu <= 25 else "1"
        self.opts = Options.parse(opts, len(self.gpus))
        if self.opts.transport not in ("ref", "wire"):
            raise InvalidArgument(f"transport must be ref or wire, got {self.opts.transport!r}")
        self.grid = Grid.for_world(world, self.opts.share_step)
        self.wait_ms = self.opts.max_wait_us / 1000.0
        self.factors: dict[str, float] = {}
        self.rounds = 6
        hops = self.hops = HopCosts.for_world(world)
        wire = self.opts.transport == "wire"
        self.hop_ms: dict[str, float] = {}
        self.qos: dict[str, float] = {}
        self.clamped: list[str] = []
        for p in world.pipelines:
            keys = [f"{p.name}/{s.name}" for s in p.stages]
            self.hop_ms[p.name] = sum(
                hops.hop_ms(self.profiles[k].output_bytes_per_item, 1.0, True, wire) for k in keys
            ) + hops.query_cost_ms(p.input_bytes)
            floor = sum(self.profiles[k].latency(100.0, 1) * self.profiles[k].bias for k in keys)
            floor += self.hop_ms[p.name]
            self.qos[p.name] = p.qos_p99_ms
            if p.qos_p99_ms < 1.05 * floor:
                # cannot be met by any plan: serve it best-effort at a reachable target
                self.qos[p.name] = 1.5 * floor
                self.clamped.append(p.name)

        self.keys = [f"{p.name}/{s.name}" for p in world.pipelines for s in p.stages]
        profs = [self.profiles[k] for k in self.keys]
        full = [self.batches(k) for k in self.keys]
        # small batches buy a little latency with a lot of busy time, hence bandwidth pressure
        # on the co-runners; the lean set keeps each stage's larger half only
        lean = [b[len(b) // 2 :] for b in full]
        # and every extra replica runs at a smaller batch: consolidated sets keep the fewest
        cap = self.opts.max_replicas
        # candidate sets, tried in order and built on first use
        self._specs: list[tuple[list[tuple[int, ...]], int]] = [(lean, 0), (full, 0), (full, 2)]
        if large_batches_first:
            # the largest batch only: the fewest busy cycles per item, so the least pressure
            self._specs.insert(0, ([b[-1:] for b in full], 0))
        self._built: dict[int, Candidates] = {}
        self._profs, self._cap = profs, cap
        self.pinned: int | None = None  # only this candidate set (see `pin`)
        self.last_variant = 0
        if self.clamped:
            self._relax_clamped()

    def _relax_clamped(self) -> None:
        """The tightest multiple of the latency floor that a clamped pipeline reaches at all."""
        trickle = {p.name: 1e-3 for p in self.world.pipelines}
        floors = {n: self.qos[n] / 1.5 for n in self.clamped}
        for mult in (1.5, 2.0, 3.0, 5.0, 8.0, 13.0):
            for n in self.clamped:
                self.qos[n] = max(mult * floors[n], self.qos[n])
            if self.attempt(trickle, slack=True) is not None:
                return

    def batches(self, key: str) -> tuple[int, ...]:
        return self.opts.batches or self.profiles[key].batches

    def capacity_units(self) -> int:
        return sum(min(self.grid.units_per_gpu, units_of(g.gpu, self.grid)) for g in self.gpus)

    def _slack(self, merged: Sequence[tuple[Merged, float]]) -> list[int] | None:
        """Per pipeline, the combination to use when spare units are free: the smallest common
        fraction θ of every pipeline's budget whose cheapest combinations still pack."""
        thetas = np.unique(np.concatenate([m.lat / budget for m, budget in merged]))
        cap = self.capacity_units()

        def fit(theta: float) -> list[int] | None:
            ks = [m.cheapest_within(theta * budget * (1 + 1e-12)) for m, budget in merged]
            if any(k is None for k in ks):
                return None
            picked = [int(k) for k in ks if k is not None]
            if sum(m.cost[k] for (m, _), k in zip(merged, picked, strict=True)) > cap:
                return None
            chosen: dict[str, Choice] = {}
            for (m, _), k in zip(merged, picked, strict=True):
                chosen.update((c.key, c) for c in m.choose(k))
            items = items_for(self.world, chosen, self.profiles)
            if all(pack(items, self.gpus, self.grid, m) is None for m in PACKINGS[:2]):
                return None
            return picked

        lo, hi = 0, len(thetas) - 1  # thetas[hi] == 1 budget for the slowest: always within
        best = fit(float(thetas[hi]))
        if best is None:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            got = fit(float(thetas[mid]))
            if got is None:
                lo = mid + 1
            else:
                hi, best = mid, got
        return best

    def attempt(
        self,
        rates: Mapping[str, float],
        reason: str = "",
        *,
        slack: bool = False,
        tighten: float = 1.0,
    ) -> tuple[PlanSpec, Any] | None:
        """A plan at `rates` that the predictor says meets every QoS, or None.

        `slack`: spend every unit that packs on latency headroom (max-load); otherwise use the
        fewest units whose p99 fits `tighten` x the budget (min-resource; a tighter budget
        leaves headroom for contention). Large batches are tried first, then all batches.
        """
        order = range(len(self._specs)) if self.pinned is None else [self.pinned]
        for i in order:
            cands = self._built.get(i)
            if cands is None:
                sets, extra = self._specs[i]
                cands = Candidates(self._profs, self.grid, sets, self.wait_ms, self._cap, extra)
                self._built[i] = cands
            got = self._attempt(cands, rates, reason, slack, tighten)
            if got is not None:
                self.last_variant = i
                return got
        return None

    def pin(self) -> None:
        """From now on, try only the candidate set of the last plan found (fewer fallbacks)."""
        self.pinned = self.last_variant

    def _attempt(
        self,
        cands: Candidates,
        rates: Mapping[str, float],
        reason: str,
        slack: bool,
        tighten: float,
    ) -> tuple[PlanSpec, Any] | None:
        factors = dict(self.factors)
        keys = self.keys
        previous = math.inf
        # queueing at the gateway depends on the total rate only: the same for every plan
        total = sum(float(rates.get(p.name, 0.0)) for p in self.world.pipelines)
        gateway = float(self.hops.gateway_ms(total))
        if not math.isfinite(gateway):
            return None
        for _ in range(self.rounds):
            fronts = cands.frontiers(
                [float(rates.get(k.partition("/")[0], 0.0)) for k in keys],
                [factors.get(k, 1.0) for k in keys],
            )
            by_key = dict(zip(keys, fronts, strict=True))
            merged: list[tuple[Merged, float]] = []
            for p in self.world.pipelines:
                budget = self.qos[p.name] - self.hop_ms[p.name] - gateway
                m = merge([by_key[f"{p.name}/{s.name}"] for s in p.stages], budget)
                if m is None:
                    return None
                merged.append((m, budget))
            if slack:
                picked = self._slack(merged)
            else:
                ks = [m.cheapest_within(b * tighten) for m, b in merged]
                picked = None if None in ks else [int(k) for k in ks if k is not None]
            if picked is None:
                return None
            chosen: dict[str, Choice] = {}
            for (m, _), k in zip(merged, picked, strict=True):
                chosen.update((c.key, c) for c in m.choose(k))
            items = items_for(self.world, chosen, self.profiles)
            if sum(i.units for i in items) > self.capacity_units():
                return None
            tried = []
            for mode in PACKINGS:
                where = pack(items, self.gpus, self.grid, mode)
                if where is None:
                    continue
                plan = assemble(
                    self.policy,
                    self.world,
                    chosen,
                    items,
                    where,
                    self.grid,
                    max_wait_us=self.opts.max_wait_us,
                    planned_qps=rates,
                    clamped=self.clamped,
                    reason=reason,
                )
                pred = predict(self.world, plan, rates, transport=self.opts.transport)
                if self._meets(pred):
                    self.factors = _factors(pred)
                    stages = tuple(
                        replace(a, predicted_p99_ms=pred.stage(a.pipeline, a.stage).p99_ms)
                        for a in plan.stages
                    )
                    return replace(plan, stages=stages), pred
                tried.append(pred)
            if not tried:
                return None
            # price the next round's choices with the contention of the least bad packing
            worst = min(self._overshoot(t) for t in tried)
            if worst >= previous * 0.99:
                return None  # contention is not converging toward a feasible plan
            previous = worst
            least = _factors(min(tried, key=self._overshoot))
            # damped: jumping to the new factors makes choices and contention chase each other
            factors = {k: math.sqrt(factors.get(k, 1.0) * f) for k, f in least.items()}
        return None

    def _meets(self, pred: Any) -> bool:
        """Feasible against the targets in force (a clamped pipeline's is its reachable one)."""
        if pred.problems:
            return False
        return all(
            all(s.stable for s in pp.stages) and pp.p99_ms <= self.qos[name]
            for name, pp in pred.pipelines.items()
        )

    def _overshoot(self, pred: Any) -> float:
        return max(
            (pp.p99_ms / self.qos[name] if pp.p99_ms < math.inf else math.inf)
            for name, pp in pred.pipelines.items()
        )


def _factors(pred: Any) -> dict[str, float]:
    return {
        f"{s.pipeline}/{s.stage}": max(r.factor for r in s.replicas)
        for pp in pred.pipelines.values()
        for s in pp.stages
    }
