"""Online correction of the predictor: a bounded EWMA (in log space) of measured over predicted
p99, per pipeline and per stage, folded into the profiles' `bias` before a policy runs, so a model
error becomes a re-plan rather than a silently missed target."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from common.errors import InvalidArgument
from scheduler.perfmodel.profiles import StageProfile, as_profiles
from scheduler.policy import Measured, PlanSpec


class BiasCorrector:
    """Online multiplicative correction of predicted p99, per pipeline and per "pipeline/stage".

    `update` takes a measured p99 and the p99 that was predicted *with the current factor
    applied* (what the plan in force says), and moves the factor by the residual:
    f <- clamp(f * (measured / predicted) ** alpha). At a fixed point measured == predicted.

    A window whose p99 is more than `hi` times the prediction teaches nothing: no factor in the
    corrector's range can explain it, and such a p99 is a queue growing for as long as the
    window lasted (a load past what the plan carries), not a service time the model got wrong.
    That is a capacity error: min-resource answers it by refuting its plan and planning for more
    (docs/CONTROL-LOOP.md); max-load already plans for the most the GPUs carry. Learned from, one
    overloaded trial of a peak-load search is folded into every later plan: on the H100, after
    max-load's 1200 qps trial (p99 1.4-2.3 s, where the plan predicted tens of ms), its predicted
    peak fell from x517.8 to x241 and then x161 (even's from x235.5 to x14.3; nothing but the
    factors changed between those plans), and the plans that followed ran text-to-img's
    generate at batch 2 (docs/results/peak-load-h100-ref4-1731d70.md). Part of that fall was
    error the factors should learn: the stages' measured compute was 1.5-2.3x their profiles'
    even at 150 qps.
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
            if ratio > self.hi:
                return self.factor(key)  # a queue, not a model error (see the class)
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
