"""The control loop: measure, decide whether to re-plan, push assignments to agents.

Each tick (or earlier when kicked by a heartbeat or a new plan) it reads the windows, exports
the gauges, and re-plans when

    - there is no plan yet, or the set of nodes changed           (at once)
    - a replica of the plan in force ran out of GPU memory at start (at once)
    - a pipeline's windowed p99 passes p99_trigger_fraction × QoS  (at most every
    - a pipeline's load moved by more than load_change_fraction     min_replan_interval_s)
      (for a policy whose plan follows load)
    - the predictor's bias for a pipeline or stage moved (the model was wrong)
    - the stage profiles changed (the nodes' GPU, or profiles stored in Redis)

then sends each node whose agent has not applied the newest epoch its assignment, in the
background, so an agent that is slow or down holds up nobody. The loop never dies: every
iteration catches, logs and goes on; `heartbeats` counts the iterations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

from common import metrics
from common.errors import CamelotError, FailedPrecondition
from common.retry import Backoff
from protos import plan_pb2
from scheduler.policy import follows_load
from scheduler.service.app import SchedulerApp
from scheduler.service.decisions import Decision, beyond_band
from scheduler.service.nodes import NodeState

# re-plan spacing when every node resizes in place (green contexts, ~2-15 ms a change)
GREEN_REPLAN_INTERVAL_S = 0.5
log = logging.getLogger(__name__)

PUSH_BACKOFF = Backoff(base_s=0.5, cap_s=15.0)


@dataclass(frozen=True)
class Trigger:
    """A reason to re-plan ("": none), the pipeline it names ("": all), whether structural."""

    reason: str = ""
    pipeline: str = ""
    urgent: bool = False


class ControlLoop:
    def __init__(self, app: SchedulerApp) -> None:
        self.app = app
        self.settings = app.settings
        self.heartbeats = 0
        self.errors = 0
        self.replans = 0
        self._last_attempt = 0.0
        self._last_failed = ""  # the last failed re-plan's message ("" once one succeeds)
        # when each pipeline's load first rose past the band of the plan in force
        self._rise_since: dict[str, float] = {}
        self.clock = time.monotonic
        self._host_parts_at = -math.inf  # when the world last took in the stages' host parts
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="control-loop")

    async def aclose(self) -> None:
        # the flag too: a cancellation swallowed inside a client library (seen with redis-py
        # under Python 3.11) must not keep the loop alive
        self._stopping = True
        self.app.kick.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("control loop iteration failed")
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.tick_s):
                    await self.app.kick.wait()
            self.app.kick.clear()

    def replan_interval_s(self) -> float:
        """Shortest time between re-plans. Where every live node shares by green contexts a share
        change is an in-place resize of milliseconds, not a new process of seconds, so plans may
        follow load that much more closely (GREEN_REPLAN_INTERVAL_S)."""
        nodes = self.app.known.live_nodes()
        if nodes and all(n.inventory.mode == plan_pb2.SHARE_MODE_GREEN for n in nodes):
            return min(self.settings.min_replan_interval_s, GREEN_REPLAN_INTERVAL_S)
        return self.settings.min_replan_interval_s

    async def tick(self) -> None:
        self.heartbeats += 1
        app = self.app
        if not app.restored:
            await app.restore()
        await app.refresh_profiles()
        app.known.last_snapshot = app.known.windows.snapshot(self.settings.window_s)
        rise_s = self.settings.rise_window_s
        app.known.recent_snapshot = app.known.windows.snapshot(rise_s) if rise_s > 0 else {}
        app.inforce.observe_bias()
        now_s = self.clock()
        if now_s - self._host_parts_at >= self.settings.window_s:
            # a long window moves little in a tick: once a window is enough
            self._host_parts_at = now_s
            app.known.observe_host_parts(now_s)
        self.export_gauges()
        t = self.evaluate()
        now = time.monotonic()
        wait_s = self.replan_interval_s()
        since_attempt = now - self._last_attempt
        if t.urgent:
            due = not self._last_failed or since_attempt >= wait_s
        else:
            due = since_attempt >= wait_s and now - app.inforce.made_at >= wait_s
        if t.reason and app.restored and due:
            self._last_attempt = now
            # a plan is made now for the load as it is: a rise seen later is a rise of its own
            self._rise_since.clear()
            concerns = [t.pipeline] if t.pipeline else list(app.known.pipelines)
            app.decisions.record(Decision.TRIGGER, concerns, t.reason, app.plan.epoch)
            epoch = app.plan.epoch
            try:
                plan = await app.replan(t.reason, force=app.plan.epoch == 0)
                self.replans += int(plan.epoch != epoch)
                self._last_failed = ""
            except CamelotError as e:
                # the plan in force stays (nothing better could be made); said loudly once
                level = logging.DEBUG if self._last_failed == e.message else logging.WARNING
                self._last_failed = e.message
                log.log(level, "re-plan (%s) failed: %s", t.reason, e.message)
                app.decisions.record(
                    Decision.FAILED,
                    concerns,
                    t.reason,
                    app.plan.epoch,
                    f"{e.code.name}: {e.message}",
                )
        self.push_agents()

    def trigger(self) -> tuple[str, bool]:
        """Why to re-plan now ("" for no reason), and whether it is structural (urgent)."""
        t = self.evaluate()
        return t.reason, t.urgent

    def evaluate(self) -> Trigger:
        """The reason to re-plan now, if any, and the pipeline it concerns."""
        app, s = self.app, self.settings
        placeable = frozenset(n.name for n in app.known.placeable_nodes())
        if not placeable:
            return Trigger()
        if app.plan.epoch == 0:
            return Trigger("initial plan", urgent=True)
        if placeable != app.inforce.planned_nodes:
            return Trigger(f"nodes changed: {', '.join(sorted(placeable)) or '-'}", urgent=True)
        if app.known.memory_short:
            return Trigger(app.known.memory_short, urgent=True)
        for name in app.known.pipelines:
            stat = app.known.last_snapshot.get((name, ""))
            qos = app.known.qos_of(name)
            if stat and stat.count >= s.min_samples and stat.p99_ms > s.p99_trigger_fraction * qos:
                return Trigger(f"p99 near target: {name} {stat.p99_ms:.1f} of {qos:g} ms", name)
        follows = follows_load(app.known.policy(), app.known.choice.options)
        load = app.known.load_qps() if follows else {}
        for name, qps in load.items():
            before = app.inforce.planned_load.get(name, 0.0)
            if not beyond_band(
                before, qps, s.load_change_fraction, s.min_load_qps, s.window_s,
                s.load_noise_sigmas,
            ):  # fmt: skip
                self._rise_since.pop(name, None)
                continue
            if qps > before and not self._risen_long_enough(name):
                continue
            return Trigger(f"load moved: {name} {before:.1f} -> {qps:.1f} qps", name)
        moved = app.inforce.bias_moved()
        # a plan sized to the load is re-sized by a model error either way; any other plan is
        # replaced only where the error puts it at risk at this load
        if moved and (follows or app.inforce.at_risk()):
            reason = f"model error: bias of {moved} now x{app.known.bias.factor(moved):.2f}"
            return Trigger(reason, moved.split("/")[0])
        if app.known.profiles_changed:
            return Trigger(app.known.profiles_changed)
        return Trigger()

    def _risen_long_enough(self, name: str) -> bool:
        """A rise is planned for once it has lasted the hold: the rise window (which then holds
        only the new rate; World.load_qps), at most the re-plan interval. Planned at its leading
        edge, a step would be sized for a fraction of itself and planned again a re-plan
        interval later: under MPS, two new processes where one does."""
        hold = min(self.settings.rise_window_s, self.replan_interval_s())
        since = self._rise_since.setdefault(name, self.clock())
        return self.clock() - since >= hold

    def push_agents(self) -> None:
        app = self.app
        if app.push is None or app.plan.epoch == 0:
            return
        now = time.monotonic()
        for node in app.known.live_nodes():
            if (
                node.agent_address
                and node.applied_epoch < app.plan.epoch
                and node.pushed_epoch < app.plan.epoch
                and (node.pushing is None or node.pushing.done())
                and now >= node.next_push_at
            ):
                node.pushing = asyncio.create_task(self._push(node), name=f"push:{node.name}")

    async def _push(self, node: NodeState) -> None:
        app = self.app
        assert app.push is not None
        assignment = app.assignment(node.name)
        try:
            resp = await app.push(node.agent_address, assignment, self.settings.apply_timeout_s)
        except FailedPrecondition:
            # the agent already runs a newer epoch than this one
            node.pushed_epoch = max(node.pushed_epoch, assignment.epoch)
            return
        except Exception as e:
            node.push_failures += 1
            node.next_push_at = time.monotonic() + PUSH_BACKOFF.delay_s(node.push_failures)
            if node.push_failures == 1:
                log.warning("apply on %s (%s) failed: %s", node.name, node.agent_address, e)
            return
        node.push_failures = 0
        node.pushed_epoch = max(node.pushed_epoch, assignment.epoch)
        node.applied_epoch = max(node.applied_epoch, resp.epoch)
        node.endpoints = list(resp.endpoints)
        await app.publish_routes()

    def export_gauges(self) -> None:
        app = self.app
        for (pipeline, stage), s in app.known.last_snapshot.items():
            metrics.WINDOW_P99.labels(pipeline=pipeline, stage=stage).set(s.p99_ms / 1000)
        for name, qps in app.known.load_qps().items():
            metrics.ARRIVAL_QPS.labels(pipeline=name).set(qps)
            metrics.QOS_TARGET.labels(pipeline=name).set(app.known.qos_of(name) / 1000)
        metrics.PLAN_EPOCH.set(app.plan.epoch)
        for name in app.known.pipelines:
            metrics.PLANNED_QPS.labels(pipeline=name).set(app.plan.planned_qps.get(name, 0.0))
        metrics.SM_SHARE.clear()  # replicas come and go with plans: no stale series
        for st in app.plan.stages:
            metrics.REPLICAS.labels(pipeline=st.pipeline, stage=st.stage).set(len(st.replicas))
            for r in st.replicas:
                metrics.SM_SHARE.labels(
                    pipeline=st.pipeline, stage=st.stage, replica=r.replica_id
                ).set(r.sm_percent)
