"""What the scheduler knows of the mesh, and the world a policy plans from.

`World` holds the pipelines and their QoS targets (an operator's override, else the config's),
the policy chosen, the nodes as their heartbeats describe them and the drains an operator asked
for, the latest window of measurements, and the stage profiles with the online bias that
corrects them, and the host's part of a stage batch as the stages measured it (`host_parts`).
`policy_input` turns all that into a `PolicyInput`. No I/O and no plan in force
here: `inforce.PlanInForce` says which measurements speak for the plan that runs. Which profiles
those are (the nodes' device, Redis) is `profilechoice`'s; `devices` is what the nodes report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import InvalidArgument
from protos import admin_pb2, plan_pb2
from scheduler.perfmodel.bias import BiasCorrector
from scheduler.policy import Measured, PipelineInfo, Policy, PolicyInput
from scheduler.search.policies import get_policy
from scheduler.service import planstore
from scheduler.service.nodes import NodeState
from scheduler.service.planstore import PolicyChoice
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows, WindowStat

log = logging.getLogger(__name__)

# a window in which a pipeline's p99 is more than this many times its target teaches no host part
OVERLOADED_QOS = 3.0


class World:
    def __init__(
        self,
        settings: SchedulerSettings,
        pipelines: Sequence[PipelineInfo],
        stage_profiles: Mapping[str, Any],
        windows: Windows,
    ) -> None:
        self.settings = settings
        self.pipelines: dict[str, PipelineInfo] = {p.name: p for p in pipelines}
        self.profiles = stage_profiles
        # what the operator reads of them, and why the plan in force is stale ("": it is not)
        self.profiles_note = ""
        self.profiles_changed = ""
        self.profiles_version = 0  # counts the changes, so a plan knows which it was made with
        # why the plan in force does not fit GPU memory any more ("": it does), and its count
        self.memory_short = ""
        self.memory_version = 0
        self.windows = windows
        self.choice = PolicyChoice(settings.policy, dict(settings.policy_options))
        self._policy: Policy | None = None
        self.qos: dict[str, float] = {}
        self.nodes: dict[str, NodeState] = {}
        self.drained_nodes: set[str] = set()
        self.drained_replicas: set[str] = set()
        self.last_snapshot: dict[tuple[str, str], WindowStat] = {}
        # the same over the last `rise_window_s`, where a step up in load shows first
        self.recent_snapshot: dict[tuple[str, str], WindowStat] = {}
        # online correction of the predictor: measured over predicted p99 of the plan in force
        self.bias = BiasCorrector(min_count=settings.min_samples)
        # "pipeline/stage" -> (median host part of a batch in ms, records): the last long window
        # in which the stage timed its GPU work on at least `min_samples` requests
        self.host_parts: dict[str, tuple[float, int]] = {}
        self._overloaded_at = -math.inf  # when a window was last overloaded (`_overloaded`)

    # -- the policy -----------------------------------------------------------------------------

    def choose(self, choice: PolicyChoice, policy: Policy | None = None) -> None:
        self.choice, self._policy = choice, policy

    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = get_policy(self.choice.name)
        return self._policy

    def options(self, chosen: Mapping[str, str] | None = None) -> dict[str, str]:
        """The policy's options, with the host's figures where the policy does not set them."""
        out = dict(self.choice.options if chosen is None else chosen)
        if self.settings.gateway_cpu_ms > 0:
            out.setdefault("gateway_cpu_ms", repr(self.settings.gateway_cpu_ms))
            out.setdefault("gateway_workers", str(self.settings.gateway_workers))
        return out

    def qos_of(self, pipeline: str) -> float:
        return self.qos.get(pipeline, self.pipelines[pipeline].qos_p99_ms)

    # -- the nodes ------------------------------------------------------------------------------

    def heard(self, hb: admin_pb2.NodeHeartbeat) -> bool:
        """Takes in a node's heartbeat; True when the node is new."""
        if not hb.node:
            raise InvalidArgument("heartbeat without a node name")
        node = self.nodes.get(hb.node)
        joined = node is None
        if node is None:
            log.info("node %s joined (agent %s)", hb.node, hb.agent_address or "-")
            node = self.nodes[hb.node] = NodeState(
                hb.node, hb.agent_address, hb.inventory, list(hb.replicas), hb.applied_epoch, 0.0
            )
        node.agent_address = hb.agent_address
        node.inventory.CopyFrom(hb.inventory)
        node.endpoints = list(hb.replicas)
        node.applied_epoch = hb.applied_epoch
        node.start_failures = list(hb.start_failures)
        node.observe_memory()
        node.last_seen = time.monotonic()
        return joined

    def live_nodes(self) -> list[NodeState]:
        horizon = time.monotonic() - self.settings.node_timeout_s
        return [n for n in self.nodes.values() if n.last_seen >= horizon]

    def placeable_nodes(self) -> list[NodeState]:
        return [n for n in self.live_nodes() if n.name not in self.drained_nodes]

    def devices(self) -> Counter[str]:
        """GPUs of the placeable nodes by the name NVML gives them (nameless ones left out)."""
        return Counter(g.name for n in self.placeable_nodes() for g in n.inventory.gpus if g.name)

    def use_profiles(self, profiles: Mapping[str, Any], note: str, reason: str) -> None:
        """Plans with `profiles` from now on; `reason` says why the plan in force is stale."""
        self.profiles, self.profiles_note, self.profiles_changed = profiles, note, reason
        self.profiles_version += 1

    def planned_with_profiles(self, version: int) -> None:
        """A plan was made with the profiles of `version`: not stale, unless they changed since
        (while the policy ran)."""
        if version == self.profiles_version:
            self.profiles_changed = ""

    def memory_ran_out(self, reason: str) -> None:
        """A GPU has less memory than the plan in force was made for (`reason` says where)."""
        self.memory_short = reason
        self.memory_version += 1

    def planned_with_memory(self, version: int) -> None:
        """A plan was made knowing the memory of `version`: it fits, unless more ran out since."""
        if version == self.memory_version:
            self.memory_short = ""

    # -- the measurements -----------------------------------------------------------------------

    def load_qps(self) -> dict[str, float]:
        """Offered load per pipeline: gateway records, else the first stage's arrivals, over the
        window; where the last `rise_window_s` carried a rate more than the band
        (`load_change_fraction`) above the window's on at least `rise_min_arrivals` queries (a
        step up), that rate. A rise is then planned for at its size within a couple of seconds,
        not in steps as the window fills (each a re-plan: under MPS a new process); a fall still
        waits for the window."""
        s = self.settings
        out: dict[str, float] = {}
        for name, p in self.pipelines.items():
            qps = self._arrivals(self.last_snapshot, name, p)
            recent = self._arrivals(self.recent_snapshot, name, p)
            if (
                recent > qps * (1.0 + s.load_change_fraction)
                and recent * s.rise_window_s >= s.rise_min_arrivals
            ):
                qps = recent
            out[name] = qps
        return out

    @staticmethod
    def _arrivals(snap: Mapping[tuple[str, str], WindowStat], name: str, p: PipelineInfo) -> float:
        stat = snap.get((name, ""))
        if stat is None and p.stages:
            stat = snap.get((name, p.stages[0].name))
        return stat.arrival_qps if stat is not None else 0.0

    def measured(self, long_window: bool = True) -> dict[str, Measured]:
        """The windows as policies see them; a pipeline's arrival rate from the long window."""
        long: dict[tuple[str, str], WindowStat] = {}
        if long_window:
            horizon_s = self.windows.horizon_us / 1e6
            # the long-window rate min-resource's hysteresis reads in measured[p].arrival_qps
            span_s = max(self.settings.long_window_s, self.settings.window_s)
            long = self.windows.snapshot(min(horizon_s, span_s))
        measured: dict[str, Measured] = {}
        for (pipeline, stage), s in self.last_snapshot.items():
            key = pipeline if not stage else f"{pipeline}/{stage}"
            arrival = s.arrival_qps
            if not stage and (pipeline, "") in long:
                arrival = long[(pipeline, "")].arrival_qps
            measured[key] = Measured(s.p99_ms, arrival, s.service_qps, s.count)
        return measured

    def observe_host_parts(self, now_s: float) -> None:
        """Takes in each stage's host part of a batch (compute - GPU time, the median over the
        long window) where it timed its GPU work on at least `min_samples` requests.

        A value stays until a later window replaces it: the host part is the node's and the
        stage's, not the load's, so an idle window is no reason to plan without it. Measured, it
        replaces `stage_host_ms` for that stage: on the H100's host the stages' batches took
        0.25-2.5 ms longer than their profiles, a spread no one figure fits
        (docs/results/stage-host-fit-h100-1731d70.md). An overloaded window (`_overloaded`)
        teaches nothing, and no later window reaches back into it. `now_s`: monotonic seconds.
        """
        if self._overloaded():
            self._overloaded_at = now_s
            return
        # never back into an overloaded window: its host parts are a saturated host's
        span_s = min(
            self.windows.horizon_us / 1e6,
            max(self.settings.long_window_s, 1e-3),
            now_s - self._overloaded_at,
        )
        if span_s <= 0:
            return
        for (pipeline, stage), (ms, count) in self.windows.host_parts(span_s).items():
            if count >= self.settings.min_samples:
                self.host_parts[f"{pipeline}/{stage}"] = (ms, count)

    def _overloaded(self) -> bool:
        """Whether the last window had a pipeline whose p99 was more than OVERLOADED_QOS times
        its target, on at least `min_samples` queries: a queue growing for as long as the window
        lasted, whose stages' host parts are those of a saturated host. On the H100 at 0a98ffa
        the 1800 and 2400 qps trials (p99 5-8 s, host CPU 87%) raised img-to-text's decode from
        1.06 to 1.75 ms a batch, and max-load's next plans were priced at x157-x170 where its
        first was x341 (docs/results/peak-load-h100-ref4-0a98ffa.md)."""
        for (pipeline, stage), stat in self.last_snapshot.items():
            if stage or pipeline not in self.pipelines or stat.count < self.settings.min_samples:
                continue
            if stat.p99_ms > OVERLOADED_QOS * self.qos_of(pipeline):
                return True
        return False

    def host_ms(self, key: str) -> tuple[float, int]:
        """The host part a policy adds to stage `key`'s profile, and the records it is the median
        of (0: none measured, `stage_host_ms`)."""
        return self.host_parts.get(key, (self.settings.stage_host_ms, 0))

    # -- what a policy sees ---------------------------------------------------------------------

    def profiles_now(self) -> dict[str, Any]:
        """The profiles as policies see them: with the bias, and the host's part of a batch
        (measured where the stage timed its GPU work, else `stage_host_ms`)."""
        if not self.profiles:
            return dict(self.profiles)
        biased = self.bias.apply(self.profiles)
        return {k: p.with_host_ms(self.host_ms(k)[0]) for k, p in biased.items()}

    def policy_input(self, measured: Mapping[str, Measured], current: plan_pb2.Plan) -> PolicyInput:
        return PolicyInput(
            pipelines=tuple(
                dataclasses.replace(p, qos_p99_ms=self.qos_of(p.name))
                for p in self.pipelines.values()
            ),
            nodes=tuple(n.info() for n in sorted(self.placeable_nodes(), key=lambda n: n.name)),
            load_qps=self.load_qps(),
            profiles=self.profiles_now(),
            measured=measured,
            current=planstore.from_proto(current) if current.epoch else None,
            options=self.options(),
        )
