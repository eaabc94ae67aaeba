"""The scheduler's domain, put together: what it knows of the mesh (`world.World`), the plan in
force (`inforce.PlanInForce`), re-planning (`replanning.Replanner`), the operator's requests
(`admin`), and what the mesh is told (`routes`).

Admin operations (set policy, set QoS, drain) re-plan at once; the control loop (loop.py)
re-plans on measurements, and where an agent reports a replica of the plan in force that ran out
of GPU memory at start (`memory`: that GPU is planned with less from then on). Every stored plan
is published as routes (plan epoch + the endpoints agents reported) to every watching gateway
and wakes the loop. Redis failures surface as UNAVAILABLE; nothing here imports grpc. The stage
profiles follow the nodes' GPU and what users stored in Redis (`refresh_profiles`,
`profilechoice`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from redis.exceptions import RedisError

from common.errors import CamelotError, FailedPrecondition
from protos import admin_pb2, agent_pb2, plan_pb2
from scheduler.perfmodel import profilestore
from scheduler.policy import PipelineInfo, Policy
from scheduler.search.policies import get_policy
from scheduler.service import admin, memory, planstore, routes
from scheduler.service.decisions import Decision, Decisions
from scheduler.service.inforce import PlanInForce
from scheduler.service.planstore import PlanStore, PolicyChoice, redis_unavailable
from scheduler.service.profilechoice import ProfileChoice
from scheduler.service.reader import ReportReader
from scheduler.service.replanning import Replanner
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows
from scheduler.service.world import World

log = logging.getLogger(__name__)

AgentPush = Callable[[str, agent_pb2.Assignment, float], Awaitable[agent_pb2.ApplyResponse]]


class SchedulerApp:
    def __init__(
        self,
        settings: SchedulerSettings,
        pipelines: Sequence[PipelineInfo],
        push: AgentPush | None = None,
    ) -> None:
        self.settings = settings
        self.push = push
        self.redis = planstore.connect(settings.redis_url)
        self.store = PlanStore(self.redis)
        windows = Windows(
            bucket_s=settings.bucket_s,
            horizon_s=max(120.0, settings.window_s, settings.long_window_s),
        )
        self.reader = ReportReader(
            settings.redis_url, windows, stream=settings.stream, consumer=settings.consumer
        )
        self.profile_choice = ProfileChoice(settings.profiles_path)
        self.known = World(settings, pipelines, self.profile_choice.profiles, windows)
        self.known.profiles_note = self.profile_choice.describe()
        self._profiles_read_at: float | None = None  # monotonic time Redis's profiles were read
        self._profiles_unreadable = False
        self._bad_profiles: set[str] = set()  # stored ones already said to be malformed
        self.inforce = PlanInForce(settings, self.known)
        self.decisions = Decisions()  # what the loop decided, for the operator
        self.replanner = Replanner(settings, self.known, self.inforce, self.store, self.decisions)
        self.broadcast = routes.RouteBroadcast()
        self.restored = False
        self.kick = asyncio.Event()  # wakes the control loop early

    @property
    def plan(self) -> plan_pb2.Plan:
        return self.inforce.plan

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
            self.known.choose(choice)
        self.known.qos = {k: v for k, v in qos.items() if k in self.known.pipelines}
        if plan is not None and plan.epoch > self.plan.epoch:
            self.inforce.restored(plan)
        self.restored = True
        log.info("restored: policy %s, plan epoch %d", self.known.choice.name, self.plan.epoch)
        await self.publish_routes()
        return True

    async def start(self) -> None:
        await self.restore()
        await self.refresh_profiles()
        await self.publish_routes()
        await self.reader.start()

    async def refresh_profiles(self) -> None:
        """Plans with the profiles of the device the nodes report: the bundled set is chosen
        again when that device changes, and the profiles users stored in Redis are read at
        start, on such a change and every `profiles_refresh_s` (an explicit --profiles file is
        planned with as it is). A change after the first read marks the plan in force stale,
        which the control loop re-plans on."""
        choice, known = self.profile_choice, self.known
        device = choice.device
        choice.select(known.devices())
        now = time.monotonic()
        first = self._profiles_read_at is None
        due = first or now - (self._profiles_read_at or 0.0) >= self.settings.profiles_refresh_s
        if not choice.path and (due or choice.device != device):
            try:
                stored = await profilestore.load_redis(self.redis, on_error=self._bad_profile)
            except (RedisError, OSError) as e:
                if not self._profiles_unreadable:
                    log.warning("cannot read stored profiles from redis: %s", e)
                self._profiles_unreadable = True
            else:
                self._profiles_unreadable = False
                self._profiles_read_at = now
                choice.take_stored(stored)
        note = choice.describe()
        old, new = known.profiles, choice.profiles
        if new == old:
            known.profiles_note = note
            return
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        why = known.profiles_changed
        if not first:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            why = f"profiles changed for {choice.device or 'the host'}: {shown}"
        log.info("stage profiles: %s (%d changed)", note, len(keys))
        known.use_profiles(new, note, why)

    def _bad_profile(self, key: str, e: CamelotError) -> None:
        # one malformed value must not hide the others (nor stop the loop that reads them)
        if key not in self._bad_profiles:
            self._bad_profiles.add(key)
            log.warning("stored profile %s left out: %s", key, e.message)

    async def aclose(self) -> None:
        await self.stop_watchers()
        for node in self.known.nodes.values():
            if node.pushing is not None:
                node.pushing.cancel()
        await self.reader.aclose()
        await self.redis.aclose()  # type: ignore[attr-defined]  # stubs predate 5.0

    async def stop_watchers(self) -> None:
        """Ends every WatchRoutes stream (before the server stops, so it need not wait for them)."""
        self.broadcast.close()

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
        plan, stored = await self.replanner.replan(reason, policy, choice, force)
        if stored:
            await self.publish_routes()
            self.kick.set()
        return plan

    # -- admin operations ----------------------------------------------------------------------

    async def set_policy(self, name: str, options: Mapping[str, str]) -> plan_pb2.Plan:
        policy = get_policy(name)  # INVALID_ARGUMENT for an unknown name
        choice = PolicyChoice(name, dict(options))
        try:
            plan = await self.replan(f"policy set to {name}", policy=policy, choice=choice)
        except FailedPrecondition:
            if self.known.placeable_nodes():
                raise
            # no agent yet: keep the choice; the loop plans once a node reports
            plan = self.plan
        self.known.choose(choice, policy)
        with redis_unavailable():
            await self.store.save_policy(choice)
        return plan

    async def set_qos(self, pipeline: str, qos_p99_ms: float) -> plan_pb2.Plan:
        admin.check_qos(self.known, pipeline, qos_p99_ms)
        with redis_unavailable():
            await self.store.save_qos(pipeline, qos_p99_ms)
        self.known.qos[pipeline] = qos_p99_ms
        try:
            return await self.replan(f"qos of {pipeline} set to {qos_p99_ms:g} ms")
        except FailedPrecondition:
            if self.known.placeable_nodes():
                raise
            return self.plan

    async def drain(self, node: str, replica_id: str) -> plan_pb2.Plan:
        admin.check_drain(self.known, self.plan, node, replica_id)
        if node:
            self.known.drained_nodes.add(node)
            return await self.replan(f"drain node {node}")
        self.known.drained_replicas.add(replica_id)
        return await self.replan(f"drain replica {replica_id}")

    def status(self, window_s: float) -> admin_pb2.StatusResponse:
        return admin.status(
            self.known, self.inforce, self.decisions, self.reader.reports_total, window_s
        )

    # -- the mesh: agents and gateways ---------------------------------------------------------

    async def heartbeat(self, hb: admin_pb2.NodeHeartbeat) -> agent_pb2.Assignment:
        joined = self.known.heard(hb)
        if self.memory_lessons(hb.node) or joined:
            self.kick.set()
        await self.publish_routes()
        return self.assignment(hb.node)

    def memory_lessons(self, node: str) -> int:
        """Learns from the node's replicas that ran out of GPU memory at start (recorded as failed
        for their pipeline, and the plan in force marked short of memory); how many taught."""
        lessons = memory.learn(self.known.nodes[node], self.plan, self.known.profiles)
        for lesson in lessons:
            log.warning("%s (plan epoch %d): %s", lesson.summary, self.plan.epoch, lesson.detail)
            self.decisions.record(
                Decision.FAILED, [lesson.pipeline], lesson.summary, self.plan.epoch, lesson.detail
            )
            self.known.memory_ran_out(lesson.summary)
        return len(lessons)

    def assignment(self, node: str) -> agent_pb2.Assignment:
        return routes.assignment(self.plan, node)

    def routes(self) -> plan_pb2.Routes:
        k = self.known
        return routes.routes(self.plan.epoch, k.live_nodes(), k.drained_nodes, k.drained_replicas)

    async def publish_routes(self) -> None:
        self.broadcast.publish(self.routes())

    def watch_routes(self, known_epoch: int) -> AsyncIterator[plan_pb2.Routes]:
        """The current routes (unless the watcher already has a newer epoch), then every change."""
        return self.broadcast.watch(known_epoch)
