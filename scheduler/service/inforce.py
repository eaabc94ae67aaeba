"""The plan in force: what it was made for, since when every agent runs it, and how the
measurements of it feed the bias and say whether it is at risk.

A window that began before every agent ran the plan holds the previous plan or the change
itself (old replicas draining, new ones warming up beside the traffic): it says nothing of
the plan in force, so no policy may read its p99 as evidence and the bias does not learn it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping

from common.errors import CamelotError
from protos import plan_pb2
from scheduler.perfmodel.predictor import PlanPrediction, predict
from scheduler.policy import Measured, PlanSpec, PolicyInput
from scheduler.service import planstore
from scheduler.service.settings import SchedulerSettings
from scheduler.service.world import World

log = logging.getLogger(__name__)

# a bias factor that moved by more than this ratio since the plan was made calls a re-plan
BIAS_REPLAN_RATIO = 1.15


class PlanInForce:
    def __init__(self, settings: SchedulerSettings, world: World) -> None:
        self.settings = settings
        self.world = world
        self.plan = plan_pb2.Plan()
        self.since = 0.0  # monotonic time the plan in force was stored
        # what the plan in force was made for: load per pipeline, bias factors, nodes, time
        self.planned_load: dict[str, float] = {}
        self.planned_bias: dict[str, float] = {}
        self.planned_nodes: frozenset[str] = frozenset()
        self.made_at = 0.0  # monotonic time of the last re-plan (a kept plan counts)
        self._applied: tuple[int, float] = (-1, 0.0)  # (epoch, when every agent ran it)
        self._bias_at = 0.0

    def made_for(self, world: PolicyInput) -> None:
        """Notes what a re-plan planned against, whether its plan is stored or kept."""
        self.planned_load = dict(world.load_qps)
        self.planned_bias = self.world.bias.factors()
        self.planned_nodes = frozenset(n.name for n in world.nodes)
        self.made_at = time.monotonic()

    def adopt(self, plan: plan_pb2.Plan) -> None:
        self.plan = plan
        self.since = time.monotonic()

    def restored(self, plan: plan_pb2.Plan) -> None:
        """A plan read back from Redis: in force, made for the load it says it carries."""
        self.adopt(plan)
        self.planned_load = dict(plan.planned_qps)

    # -- when every agent runs it ---------------------------------------------------------------

    def applied_at(self) -> float | None:
        """Monotonic time since which every live agent runs the plan in force (None: not yet).
        Nodes that report without an agent to apply plans have nothing to wait for."""
        if self._applied[0] == self.plan.epoch:
            return self._applied[1]
        agents = [n for n in self.world.live_nodes() if n.agent_address]
        if any(n.applied_epoch < self.plan.epoch for n in agents):
            return None
        self._applied = (self.plan.epoch, time.monotonic())
        return self._applied[1]

    def applied_epoch(self) -> int:
        """The newest epoch every live agent has applied (the plan's own where none applies)."""
        agents = [n.applied_epoch for n in self.world.live_nodes() if n.agent_address]
        return min(agents) if agents else int(self.plan.epoch)

    def settled(self) -> bool:
        """Whether the loop's window holds only the plan in force (in force a window or more)."""
        applied = self.applied_at()
        return applied is not None and time.monotonic() - applied >= self.settings.window_s

    def policy_input(self, measured: Mapping[str, Measured] | None = None) -> PolicyInput:
        """The world for a policy; measured from the windows unless given, and then a
        pipeline's p99 counts as evidence only once the plan in force has settled."""
        if measured is None:
            measured = self.world.measured()
            if not self.settled():
                measured = {
                    k: m if "/" in k else dataclasses.replace(m, count=0)
                    for k, m in measured.items()
                }
        return self.world.policy_input(measured, self.plan)

    # -- its prediction, the bias and the risk ---------------------------------------------------

    def predict(
        self, measured: Mapping[str, Measured], load_scale: float = 1.0
    ) -> tuple[PlanSpec, PlanPrediction]:
        """The plan in force (its known pipelines) predicted with the factors in force at the
        measured load times `load_scale`; CamelotError or KeyError where it no longer fits."""
        world = self.policy_input(measured)
        known = {p.name for p in world.pipelines}
        spec = planstore.from_proto(self.plan)
        spec = dataclasses.replace(
            spec, stages=tuple(a for a in spec.stages if a.pipeline in known)
        )
        rates = {name: qps * load_scale for name, qps in world.load_qps.items()}
        return spec, predict(world, spec, rates)

    def observe_bias(self) -> None:
        """Folds the short windows of the plan in force into the bias, at most once a window.

        The plan is predicted again at the measured load with the factors in force, so the
        residual is the model's error, not a difference in load (a plan made for a higher load
        predicts more). Windows from before every agent ran the plan are skipped (see above).
        """
        now = time.monotonic()
        if not self.plan.epoch or not self.world.profiles:
            return
        applied = self.applied_at()
        if applied is None or now - max(applied, self._bias_at) < self.settings.window_s:
            return
        self._bias_at = now
        measured = self.world.measured(long_window=False)
        try:
            spec, pred = self.predict(measured)
        except (CamelotError, KeyError) as e:
            log.debug("no bias update: the plan in force does not fit the pipelines: %s", e)
            return
        stages = tuple(
            dataclasses.replace(a, predicted_p99_ms=pred.stage(a.pipeline, a.stage).p99_ms)
            for a in spec.stages
        )
        self.world.bias.observe(dataclasses.replace(spec, stages=stages), measured)

    def bias_moved(self) -> str:
        """The key whose bias factor moved past BIAS_REPLAN_RATIO since the plan ("" if none)."""
        for key, f in sorted(self.world.bias.factors().items()):
            ratio = f / self.planned_bias.get(key, 1.0)
            if max(ratio, 1.0 / ratio) > BIAS_REPLAN_RATIO:
                return key
        return ""

    def at_risk(self) -> bool:
        """Whether the plan in force, predicted with the bias as it is now at the measured load
        plus the band the load trigger leaves alone, comes within `p99_trigger_fraction` of a
        target. A moved bias re-plans a policy that does not follow load only then: a new plan
        replaces replicas (seconds of a new process beside the traffic), which costs more than
        a model error that does not matter at this load (max-load re-planned three times in its
        peak search, each time mid-trial, and missed those trials:
        docs/results/peak-load-one-gateway.md)."""
        if not self.plan.epoch or not self.world.profiles:
            return False
        band = 1.0 + self.settings.load_change_fraction
        try:
            _, pred = self.predict(self.world.measured(long_window=False), band)
        except (CamelotError, KeyError):
            return True  # the plan no longer fits what is known: let the policy decide
        limit = self.settings.p99_trigger_fraction
        return any(
            not p.feasible or p.p99_ms > limit * p.qos_p99_ms for p in pred.pipelines.values()
        )
