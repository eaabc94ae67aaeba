"""The scheduler's domain: pipelines, nodes, the active policy, QoS targets, the plan and routes.

Admin operations (set policy, set QoS, drain) re-plan at once; the control loop (loop.py)
re-plans on measurements. Every plan goes through one lock, gets the next epoch from the plan
store, and is published as routes (plan epoch + the endpoints agents reported) to every
watching gateway. Redis failures surface as UNAVAILABLE; nothing here imports grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common.broadcast import Broadcast
from common.errors import CamelotError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from protos import admin_pb2, agent_pb2, plan_pb2
from scheduler.perfmodel import profiles
from scheduler.perfmodel.bias import BiasCorrector
from scheduler.perfmodel.predictor import PlanPrediction, predict
from scheduler.policy import (
    Measured,
    PipelineInfo,
    PlanSpec,
    Policy,
    PolicyInput,
)
from scheduler.search.policies import get_policy
from scheduler.service import decisions, planstore
from scheduler.service.decisions import Decision, Decisions
from scheduler.service.nodes import NodeState, replica_status
from scheduler.service.planstore import PlanStore, PolicyChoice
from scheduler.service.reader import ReportReader
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows, WindowStat, admin_stats

log = logging.getLogger(__name__)

AgentPush = Callable[[str, agent_pb2.Assignment, float], Awaitable[agent_pb2.ApplyResponse]]
_GONE = (plan_pb2.REPLICA_STATE_STOPPED, plan_pb2.REPLICA_STATE_FAILED)
# arrivals over this window (capped by the windows' horizon) are the long-window rate that
# min-resource's hysteresis reads in PolicyInput.measured[pipeline].arrival_qps
LONG_WINDOW_S = 60.0
# a bias factor that moved by more than this ratio since the plan was made calls a re-plan
BIAS_REPLAN_RATIO = 1.15


@contextlib.contextmanager
def redis_unavailable() -> Iterator[None]:
    """Redis errors become UNAVAILABLE (retryable) instead of INTERNAL."""
    try:
        yield
    except (RedisError, OSError) as e:
        raise Unavailable(f"redis unavailable: {e}") from e


class SchedulerApp:
    def __init__(
        self,
        settings: SchedulerSettings,
        pipelines: Sequence[PipelineInfo],
        push: AgentPush | None = None,
    ) -> None:
        self.settings = settings
        self.pipelines: dict[str, PipelineInfo] = {p.name: p for p in pipelines}
        self.push = push
        self.profiles = _load_profiles(settings.profiles_path)
        self.redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=RedisRetry(NoBackoff(), 0),
        )
        self.store = PlanStore(self.redis)
        self.windows = Windows(bucket_s=settings.bucket_s, horizon_s=max(120.0, settings.window_s))
        self.reader = ReportReader(
            settings.redis_url, self.windows, stream=settings.stream, consumer=settings.consumer
        )
        self.choice = PolicyChoice(settings.policy, dict(settings.policy_options))
        self._policy: Policy | None = None
        self.qos: dict[str, float] = {}
        self.plan = plan_pb2.Plan()
        self.nodes: dict[str, NodeState] = {}
        self.drained_nodes: set[str] = set()
        self.drained_replicas: set[str] = set()
        self.restored = False
        # what the plan in force was made for: load per pipeline, nodes, time (monotonic)
        self.planned_load: dict[str, float] = {}
        self.planned_nodes: frozenset[str] = frozenset()
        self.last_plan_at = 0.0
        self.last_snapshot: dict[tuple[str, str], WindowStat] = {}
        # online correction of the predictor: measured over predicted p99 of the plan in force
        self.bias = BiasCorrector(min_count=settings.min_samples)
        self.planned_bias: dict[str, float] = {}  # the factors the plan in force was made with
        self.plan_since = 0.0  # monotonic time the plan in force was stored
        self._bias_at = 0.0
        self._applied: tuple[int, float] = (-1, 0.0)  # (epoch, when every agent ran it)
        self._lock = asyncio.Lock()
        # the routes as every watching gateway follows them
        self._routes: Broadcast[plan_pb2.Routes] = Broadcast(plan_pb2.Routes())
        self.kick = asyncio.Event()  # wakes the control loop early
        self.decisions = Decisions()  # what the loop decided, for the operator

    # -- lifecycle ---------------------------------------------------------------------------

    async def restore(self) -> bool:
        """Loads policy, QoS targets and plan from Redis; False (and logged) if Redis is down."""
        try:
            choice = await self.store.load_policy()
            qos = await self.store.load_qos()
            plan = await self.store.load_plan()
        except (RedisError, OSError) as e:
            log.warning("cannot restore state from redis yet: %s", e)
            return False
        if choice is not None:
            self.choice, self._policy = choice, None
        self.qos = {k: v for k, v in qos.items() if k in self.pipelines}
        if plan is not None and plan.epoch > self.plan.epoch:
            self.plan = plan
            self.planned_load = dict(plan.planned_qps)
            self.plan_since = time.monotonic()
        self.restored = True
        log.info("restored: policy %s, plan epoch %d", self.choice.name, self.plan.epoch)
        await self.publish_routes()
        return True

    async def start(self) -> None:
        await self.restore()
        await self.publish_routes()
        await self.reader.start()

    async def aclose(self) -> None:
        await self.stop_watchers()
        for node in self.nodes.values():
            if node.pushing is not None:
                node.pushing.cancel()
        await self.reader.aclose()
        await self.redis.aclose()  # type: ignore[attr-defined]  # stubs predate 5.0

    async def stop_watchers(self) -> None:
        """Ends every WatchRoutes stream (before the server stops, so it need not wait for them)."""
        self._routes.close()

    # -- the world as policies see it ---------------------------------------------------------

    def qos_of(self, pipeline: str) -> float:
        return self.qos.get(pipeline, self.pipelines[pipeline].qos_p99_ms)

    def live_nodes(self) -> list[NodeState]:
        horizon = time.monotonic() - self.settings.node_timeout_s
        return [n for n in self.nodes.values() if n.last_seen >= horizon]

    def placeable_nodes(self) -> list[NodeState]:
        return [n for n in self.live_nodes() if n.name not in self.drained_nodes]

    def load_qps(self) -> dict[str, float]:
        """Offered load per pipeline: gateway records, else the first stage's arrivals."""
        snap = self.last_snapshot
        out: dict[str, float] = {}
        for name, p in self.pipelines.items():
            stat = snap.get((name, ""))
            if stat is None and p.stages:
                stat = snap.get((name, p.stages[0].name))
            out[name] = stat.arrival_qps if stat is not None else 0.0
        return out

    def measured(self, long_window: bool = True) -> dict[str, Measured]:
        """The windows as policies see them; a pipeline's arrival rate from the long window."""
        long: dict[tuple[str, str], WindowStat] = {}
        if long_window:
            horizon_s = self.windows.horizon_us / 1e6
            long = self.windows.snapshot(min(horizon_s, max(LONG_WINDOW_S, self.settings.window_s)))
        measured: dict[str, Measured] = {}
        for (pipeline, stage), s in self.last_snapshot.items():
            key = pipeline if not stage else f"{pipeline}/{stage}"
            arrival = s.arrival_qps
            if not stage and (pipeline, "") in long:
                arrival = long[(pipeline, "")].arrival_qps
            measured[key] = Measured(s.p99_ms, arrival, s.service_qps, s.count)
        return measured

    def settled(self) -> bool:
        """Whether the loop's window holds only the plan in force (in force a window or more)."""
        applied = self.plan_applied_at()
        return applied is not None and time.monotonic() - applied >= self.settings.window_s

    def world(self, measured: Mapping[str, Measured] | None = None) -> PolicyInput:
        if measured is None:
            measured = self.measured()
            if not self.settled():
                # a pipeline's p99 over a window that began under an older plan (or during the
                # change) says nothing of the plan in force: no policy may read it as evidence
                measured = {
                    k: m if "/" in k else dataclasses.replace(m, count=0)
                    for k, m in measured.items()
                }
        return PolicyInput(
            pipelines=tuple(
                dataclasses.replace(p, qos_p99_ms=self.qos_of(p.name))
                for p in self.pipelines.values()
            ),
            nodes=tuple(n.info() for n in sorted(self.placeable_nodes(), key=lambda n: n.name)),
            load_qps=self.load_qps(),
            profiles=self.bias.apply(self.profiles) if self.profiles else self.profiles,
            measured=measured,
            current=planstore.from_proto(self.plan) if self.plan.epoch else None,
            options=self._options(self.choice.options),
        )

    def _options(self, chosen: Mapping[str, str]) -> dict[str, str]:
        """The policy's options, with the host's figures where the policy does not set them."""
        out = dict(chosen)
        if self.settings.gateway_cpu_ms > 0:
            out.setdefault("gateway_cpu_ms", repr(self.settings.gateway_cpu_ms))
            out.setdefault("gateway_workers", str(self.settings.gateway_workers))
        return out

    def observe_bias(self) -> None:
        """Folds the short windows of the plan in force into the bias, at most once a window.

        The plan is predicted again at the measured load with the factors in force, so the
        residual is the model's error, not a difference in load (a plan made for a higher load
        predicts more). Windows that began before every agent ran the plan hold the previous plan
        or the change itself (old replicas draining, new ones warming up beside the traffic: a
        transient, not the model's error, and learning it would call a re-plan that makes
        another): skipped.
        """
        now = time.monotonic()
        if not self.plan.epoch or not self.profiles:
            return
        applied = self.plan_applied_at()
        if applied is None or now - max(applied, self._bias_at) < self.settings.window_s:
            return
        self._bias_at = now
        measured = self.measured(long_window=False)
        try:
            spec, pred = self._predict_in_force(measured)
        except (CamelotError, KeyError) as e:
            log.debug("no bias update: the plan in force does not fit the pipelines: %s", e)
            return
        stages = tuple(
            dataclasses.replace(a, predicted_p99_ms=pred.stage(a.pipeline, a.stage).p99_ms)
            for a in spec.stages
        )
        self.bias.observe(dataclasses.replace(spec, stages=stages), measured)

    def _predict_in_force(
        self, measured: Mapping[str, Measured], load_scale: float = 1.0
    ) -> tuple[PlanSpec, PlanPrediction]:
        """The plan in force (its known pipelines) predicted with the factors in force at the
        measured load times `load_scale`; CamelotError or KeyError where it no longer fits."""
        world = self.world(measured)
        known = {p.name for p in world.pipelines}
        spec = planstore.from_proto(self.plan)
        spec = dataclasses.replace(
            spec, stages=tuple(a for a in spec.stages if a.pipeline in known)
        )
        rates = {name: qps * load_scale for name, qps in world.load_qps.items()}
        return spec, predict(world, spec, rates)

    def plan_applied_at(self) -> float | None:
        """Monotonic time since which every live agent runs the plan in force (None: not yet).
        Nodes that report without an agent to apply plans have nothing to wait for."""
        if self._applied[0] == self.plan.epoch:
            return self._applied[1]
        agents = [n for n in self.live_nodes() if n.agent_address]
        if any(n.applied_epoch < self.plan.epoch for n in agents):
            return None
        self._applied = (self.plan.epoch, time.monotonic())
        return self._applied[1]

    def plan_at_risk(self) -> bool:
        """Whether the plan in force, predicted with the bias as it is now at the measured load
        plus the band the load trigger leaves alone, comes within `p99_trigger_fraction` of a
        target. A moved bias re-plans a policy that does not follow load only then: a new plan
        replaces replicas (seconds of a new process beside the traffic), which costs more than
        a model error that does not matter at this load (max-load re-planned three times in its
        peak search, each time mid-trial, and missed those trials:
        docs/results/peak-load-one-gateway.md)."""
        if not self.plan.epoch or not self.profiles:
            return False
        band = 1.0 + self.settings.load_change_fraction
        try:
            _, pred = self._predict_in_force(self.measured(long_window=False), band)
        except (CamelotError, KeyError):
            return True  # the plan no longer fits what is known: let the policy decide
        limit = self.settings.p99_trigger_fraction
        return any(
            not p.feasible or p.p99_ms > limit * p.qos_p99_ms for p in pred.pipelines.values()
        )

    def applied_epoch(self) -> int:
        """The newest epoch every live agent has applied (the plan's own where none applies)."""
        agents = [n.applied_epoch for n in self.live_nodes() if n.agent_address]
        return min(agents) if agents else int(self.plan.epoch)

    def bias_moved(self) -> str:
        """The key whose bias factor moved past BIAS_REPLAN_RATIO since the plan ("" if none)."""
        for key, f in sorted(self.bias.factors().items()):
            ratio = f / self.planned_bias.get(key, 1.0)
            if max(ratio, 1.0 / ratio) > BIAS_REPLAN_RATIO:
                return key
        return ""

    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = get_policy(self.choice.name)
        return self._policy

    # -- planning ------------------------------------------------------------------------------

    async def replan(
        self,
        reason: str,
        policy: Policy | None = None,
        choice: PolicyChoice | None = None,
        force: bool = True,
    ) -> plan_pb2.Plan:
        """Runs the policy, stores the plan under a new epoch, publishes routes, wakes the loop.

        With force=False a plan equal to the one in force is not stored again (no new epoch).
        """
        async with self._lock:
            world = self.world()
            if choice is not None:
                world = dataclasses.replace(world, options=self._options(choice.options))
            pol = policy if policy is not None else self.policy()
            # policies are pure CPU work: off the event loop, so RPCs keep flowing
            spec = await asyncio.to_thread(pol.plan, world)
            why = f"{reason} ({spec.reason})" if spec.reason and spec.reason != reason else reason
            spec = dataclasses.replace(self._without_drained(spec), reason=why)
            planstore.validate(spec)
            self.planned_load = dict(world.load_qps)
            self.planned_bias = self.bias.factors()
            self.planned_nodes = frozenset(n.name for n in world.nodes)
            self.last_plan_at = time.monotonic()
            old = self.plan
            # the same replicas sized for a load that moved is stored too: the plan then says
            # what load it carries (the operator's planned-against-measured, the shrink margin)
            if (
                not force
                and old.epoch
                and planstore.same_placement(spec, old)
                and not self._load_moved(old.planned_qps, spec.planned_qps)
            ):
                log.info("re-plan (%s): plan epoch %d kept as it is", reason, old.epoch)
                self.decisions.record(Decision.KEPT, self.pipelines, reason, old.epoch)
                return old
            with redis_unavailable():
                plan = await self.store.save(spec)
            self.plan = plan
            self.plan_since = time.monotonic()
            self._record_plan(old, plan, reason)
        await self.publish_routes()
        self.kick.set()
        return plan

    def _load_moved(self, old: Mapping[str, float], new: Mapping[str, float]) -> dict[str, str]:
        s = self.settings
        return decisions.load_moved(old, new, s.load_change_fraction, s.min_load_qps)

    def _record_plan(self, old: plan_pb2.Plan, plan: plan_pb2.Plan, reason: str) -> None:
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

    def _without_drained(self, spec: PlanSpec) -> PlanSpec:
        if not self.drained_replicas and not self.drained_nodes:
            return spec
        stages = []
        for st in spec.stages:
            keep = tuple(
                r
                for r in st.replicas
                if r.replica_id not in self.drained_replicas and r.node not in self.drained_nodes
            )
            if not keep and st.replicas:
                # serving beats draining: a stage never loses its last replica to a drain
                log.warning("drain of %s/%s lifted: it is the stage's only replica", st.pipeline,
                            st.stage)  # fmt: skip
                keep = st.replicas
            stages.append(dataclasses.replace(st, replicas=keep))
        return dataclasses.replace(spec, stages=tuple(stages))

    # -- admin operations ----------------------------------------------------------------------

    async def set_policy(self, name: str, options: Mapping[str, str]) -> plan_pb2.Plan:
        policy = get_policy(name)  # INVALID_ARGUMENT for an unknown name
        choice = PolicyChoice(name, dict(options))
        try:
            plan = await self.replan(f"policy set to {name}", policy=policy, choice=choice)
        except FailedPrecondition:
            if self.placeable_nodes():
                raise
            # no agent yet: keep the choice; the loop plans once a node reports
            plan = self.plan
        self.choice, self._policy = choice, policy
        with redis_unavailable():
            await self.store.save_policy(choice)
        return plan

    async def set_qos(self, pipeline: str, qos_p99_ms: float) -> plan_pb2.Plan:
        if pipeline not in self.pipelines:
            raise NotFound(f"unknown pipeline {pipeline!r}")
        if not math.isfinite(qos_p99_ms) or qos_p99_ms <= 0:
            raise InvalidArgument(f"qos_p99_ms must be a finite number > 0, got {qos_p99_ms}")
        with redis_unavailable():
            await self.store.save_qos(pipeline, qos_p99_ms)
        self.qos[pipeline] = qos_p99_ms
        try:
            return await self.replan(f"qos of {pipeline} set to {qos_p99_ms:g} ms")
        except FailedPrecondition:
            if self.placeable_nodes():
                raise
            return self.plan

    async def drain(self, node: str, replica_id: str) -> plan_pb2.Plan:
        if bool(node) == bool(replica_id):
            raise InvalidArgument("give exactly one of node and replica_id")
        if node:
            planned = {r.node for st in self.plan.stages for r in st.replicas}
            if node not in self.nodes and node not in planned:
                raise NotFound(f"unknown node {node!r}")
            if not [n for n in self.placeable_nodes() if n.name != node]:
                raise FailedPrecondition(f"draining {node!r} would leave no node to run on")
            self.drained_nodes.add(node)
            return await self.replan(f"drain node {node}")
        stage = next(
            (st for st in self.plan.stages for r in st.replicas if r.replica_id == replica_id), None
        )
        if stage is None:
            raise NotFound(f"no replica {replica_id!r} in the plan")
        if len(stage.replicas) == 1:
            raise FailedPrecondition(
                f"{replica_id!r} is the only replica of {stage.pipeline}/{stage.stage}"
            )
        self.drained_replicas.add(replica_id)
        return await self.replan(f"drain replica {replica_id}")

    def status(self, window_s: float) -> admin_pb2.StatusResponse:
        if window_s < 0 or not math.isfinite(window_s):
            raise InvalidArgument(f"window_s must be >= 0, got {window_s}")
        window_s = window_s or self.settings.window_s
        snap = self.windows.snapshot(window_s)
        planned: dict[tuple[str, str], list[plan_pb2.ReplicaPlan]] = {}
        for st in self.plan.stages:
            planned.setdefault((st.pipeline, st.stage), []).extend(st.replicas)
        out = admin_pb2.StatusResponse(
            plan=self.plan,
            policy=self.choice.name,
            nodes=sorted(n.name for n in self.live_nodes()),
            reports_total=self.reader.reports_total,
            window_s=window_s,
            applied_epoch=self.applied_epoch(),
        )
        for name, p in self.pipelines.items():
            all_replicas = [r for s in p.stages for r in planned.get((name, s.name), [])]
            out.stats.append(
                admin_stats(snap.get((name, "")), name, "", all_replicas, self.qos_of(name))
            )
            for s in p.stages:
                reps = planned.get((name, s.name), [])
                out.stats.append(admin_stats(snap.get((name, s.name)), name, s.name, reps, 0.0))
        load = self.load_qps()
        for name in self.pipelines:
            planned_qps = self.plan.planned_qps.get(name, 0.0)
            out.loop.append(self.decisions.to_proto(name, planned_qps, load.get(name, 0.0)))
        out.replicas.extend(replica_status(self.plan, self.live_nodes()))
        return out

    # -- the mesh: agents and gateways ---------------------------------------------------------

    async def heartbeat(self, hb: admin_pb2.NodeHeartbeat) -> agent_pb2.Assignment:
        if not hb.node:
            raise InvalidArgument("heartbeat without a node name")
        node = self.nodes.get(hb.node)
        if node is None:
            log.info("node %s joined (agent %s)", hb.node, hb.agent_address or "-")
            node = self.nodes[hb.node] = NodeState(
                hb.node, hb.agent_address, hb.inventory, list(hb.replicas), hb.applied_epoch, 0.0
            )
            self.kick.set()
        node.agent_address = hb.agent_address
        node.inventory.CopyFrom(hb.inventory)
        node.endpoints = list(hb.replicas)
        node.applied_epoch = hb.applied_epoch
        node.last_seen = time.monotonic()
        await self.publish_routes()
        return self.assignment(hb.node)

    def assignment(self, node: str) -> agent_pb2.Assignment:
        out = agent_pb2.Assignment(epoch=self.plan.epoch, node=node)
        for st in self.plan.stages:
            for r in st.replicas:
                if r.node == node:
                    out.replicas.add(replica=r, pipeline=st.pipeline, stage=st.stage)
        return out

    def routes(self) -> plan_pb2.Routes:
        out = plan_pb2.Routes(epoch=self.plan.epoch)
        for node in sorted(self.live_nodes(), key=lambda n: n.name):
            if node.name in self.drained_nodes:
                continue
            for ep in node.endpoints:
                if ep.state in _GONE or ep.replica.replica_id in self.drained_replicas:
                    continue
                out.endpoints.append(ep)
        return out

    async def publish_routes(self) -> None:
        self._routes.publish(self.routes())

    async def watch_routes(self, known_epoch: int) -> AsyncIterator[plan_pb2.Routes]:
        """The current routes (unless the watcher already has a newer epoch), then every change."""
        first = True
        async with contextlib.aclosing(self._routes.watch()) as watch:
            async for routes in watch:
                if first and known_epoch and routes.epoch <= known_epoch:
                    first = False
                    continue
                first = False
                yield routes


def _load_profiles(path: str) -> Mapping[str, Any]:
    """The given profiles (errors are fatal), else the bundled ones if they load, else none."""
    if path:
        return profiles.load(path)
    try:
        return profiles.load_default()
    except CamelotError as e:
        log.warning("no stage profiles (%s): predictive policies will refuse to plan", e.message)
        return {}
