"""Re-planning: the policy run on the world, the drains applied, the plan stored under the next
epoch (or the one in force kept), and what it changed recorded for the operator.

Every plan goes through one lock, so epochs and the plan in force move together; the caller
publishes the routes and wakes the control loop once a plan is stored. Every plan, whichever
policy or admin call made it, is checked against the GPUs' memory here before it is stored: one
whose replicas do not fit (by their profiles, on what each GPU has for them) is refused with
FAILED_PRECONDITION naming the GPU and the bytes, and the plan in force stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Set

from common.errors import FailedPrecondition
from protos import plan_pb2
from scheduler.policy import PlanSpec, Policy, PolicyInput, StageAssignment
from scheduler.search.planning import memory_problems
from scheduler.service import decisions, planstore
from scheduler.service.decisions import Decision, Decisions
from scheduler.service.inforce import PlanInForce
from scheduler.service.planstore import PlanStore, PolicyChoice, redis_unavailable
from scheduler.service.settings import SchedulerSettings
from scheduler.service.world import World

log = logging.getLogger(__name__)


class Replanner:
    def __init__(
        self,
        settings: SchedulerSettings,
        world: World,
        inforce: PlanInForce,
        store: PlanStore,
        record: Decisions,
    ) -> None:
        self.settings = settings
        self.world = world
        self.inforce = inforce
        self.store = store
        self.decisions = record
        self._lock = asyncio.Lock()

    async def replan(
        self,
        reason: str,
        policy: Policy | None = None,
        choice: PolicyChoice | None = None,
        force: bool = True,
    ) -> tuple[plan_pb2.Plan, bool]:
        """Runs the policy and stores its plan under a new epoch: (the plan, True). With
        force=False a plan equal to the one in force is kept: (the plan in force, False)."""
        async with self._lock:
            profiles_version = self.world.profiles_version
            memory_version = self.world.memory_version
            world = self.inforce.policy_input()
            if choice is not None:
                world = dataclasses.replace(world, options=self.world.options(choice.options))
            if world.current is not None and memory_problems(world, world.current):
                # a plan in force that no longer fits (a replica ran out of memory, another
                # tenant took some) is no anchor: no policy keeps it or grows from it
                world = dataclasses.replace(world, current=None)
            pol = policy if policy is not None else self.world.policy()
            # policies are pure CPU work: off the event loop, so RPCs keep flowing
            spec = await asyncio.to_thread(pol.plan, world)
            why = f"{reason} ({spec.reason})" if spec.reason and spec.reason != reason else reason
            spec = without_drained(spec, self.world.drained_nodes, self.world.drained_replicas)
            spec = dataclasses.replace(spec, reason=why, stages=priced_with(spec, world))
            planstore.validate(spec)
            problems = memory_problems(world, spec)
            if problems:
                raise FailedPrecondition(
                    f"plan by {spec.policy} refused: it does not fit GPU memory: "
                    + "; ".join(problems)
                )
            self.inforce.made_for(world)
            self.world.planned_with_profiles(profiles_version)
            self.world.planned_with_memory(memory_version)
            old = self.inforce.plan
            # the same replicas sized for a load that moved is stored too: the plan then says
            # what load it carries (the operator's planned-against-measured, the shrink margin)
            if (
                not force
                and old.epoch
                and planstore.same_placement(spec, old)
                and not self._load_moved(old.planned_qps, spec.planned_qps)
            ):
                log.info("re-plan (%s): plan epoch %d kept as it is", reason, old.epoch)
                self.decisions.record(Decision.KEPT, self.world.pipelines, reason, old.epoch)
                return old, False
            with redis_unavailable():
                plan = await self.store.save(spec)
            self.inforce.adopt(plan)
            self._record(old, plan, reason)
        return plan, True

    def _load_moved(self, old: Mapping[str, float], new: Mapping[str, float]) -> dict[str, str]:
        s = self.settings
        return decisions.load_moved(
            old, new, s.load_change_fraction, s.min_load_qps, s.window_s, s.load_noise_sigmas
        )

    def _record(self, old: plan_pb2.Plan, plan: plan_pb2.Plan, reason: str) -> None:
        """Logs a stored plan and records, per pipeline, what it changed or re-sized; a plan
        that clamped pipelines (no plan meets their QoS at this load) is a failed re-plan."""
        changed = decisions.changes(old, plan)
        resized = self._load_moved(old.planned_qps, plan.planned_qps)
        what = "; ".join(f"{p}: {d}" for p, d in changed.items()) or "same replicas"
        log.info("plan epoch %d by %s: %s [%s]", plan.epoch, plan.policy, plan.reason, what)
        self.decisions.record(Decision.REPLANNED, changed, reason, plan.epoch, changed)
        rest = {p: d for p, d in resized.items() if p not in changed}
        self.decisions.record(Decision.RESIZED, rest, reason, plan.epoch, rest)
        if plan.clamped:
            log.warning(
                "re-plan (%s) cannot meet the QoS of %s at this load; epoch %d is the best plan "
                "there is: %s", reason, ", ".join(plan.clamped), plan.epoch, plan.reason,
            )  # fmt: skip
            self.decisions.record(
                Decision.FAILED, plan.clamped, reason, plan.epoch, f"clamped: {plan.reason}"
            )


def priced_with(spec: PlanSpec, world: PolicyInput) -> tuple[StageAssignment, ...]:
    """The spec's stages, each with the host part its profile was priced with, so the plan says
    what it assumed of the host (0 where the world has no profile for the stage)."""
    profiles = world.profiles
    return tuple(
        dataclasses.replace(
            st, host_ms=float(getattr(profiles.get(f"{st.pipeline}/{st.stage}"), "host_ms", 0.0))
        )
        for st in spec.stages
    )


def without_drained(spec: PlanSpec, nodes: Set[str], replicas: Set[str]) -> PlanSpec:
    """The spec without the drained nodes' and replicas' replicas, except a stage's last."""
    if not replicas and not nodes:
        return spec
    stages = []
    for st in spec.stages:
        keep = tuple(r for r in st.replicas if r.replica_id not in replicas and r.node not in nodes)
        if not keep and st.replicas:
            # serving beats draining: a stage never loses its last replica to a drain
            log.warning("drain of %s/%s lifted: it is the stage's only replica", st.pipeline,
                        st.stage)  # fmt: skip
            keep = st.replicas
        stages.append(dataclasses.replace(st, replicas=keep))
    return dataclasses.replace(spec, stages=tuple(stages))
