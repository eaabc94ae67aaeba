"""The agent's core: the node's replicas, and applying assignments to them without dropping work.

An apply, under one lock:

    1. validate against the node (INVALID_ARGUMENT) and the applied epoch (FAILED_PRECONDITION)
    2. diff by replica_id (diff.py)
    3. start new replicas and shadow replacements together; wait until each is SERVING
    4. resize green replicas in place (Stage.Resize)
    5. publish routes: new instances READY, replaced and removed ones DRAINING
    6. wait `shift_s` so gateways move traffic, then drain and stop the old instances
    7. record the epoch, publish the final routes

If a new replica fails to start, the old instance (if any) keeps serving, the epoch is not
recorded and the apply fails with UNAVAILABLE; re-applying the same assignment retries it, after
a doubling delay. The failures go to the scheduler with every heartbeat (`start_failures`): one
whose GPU ran out of memory is planned around there, and the newer assignment that says so (one
without the replica, or with another plan for it) ends its retries.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from common import metrics
from common.backend import Backend
from common.clock import mono_us
from common.errors import CamelotError, Unavailable
from protos import agent_pb2, plan_pb2
from services.agent import diff, inventory
from services.agent.diff import Action, NodeShape
from services.agent.launch import Launches
from services.agent.mps import MpsDaemon
from services.agent.orphans import ORPHAN_GRACE_S, Orphans
from services.agent.recovery import GpuFaults
from services.agent.replicas import RPC_TIMEOUT_S, Instance, StartError, State, socket_path
from services.agent.routes import RouteBoard
from services.agent.settings import AgentSettings
from services.agent.supervisor import RestartPolicy, supervise

log = logging.getLogger(__name__)


@dataclass
class StartFailure:
    """A replica that failed to start: the plan it had, how often, when to try again, and why."""

    target: plan_pb2.Endpoint
    epoch: int
    failures: int
    next_at: float  # monotonic
    error: str
    out_of_memory: bool

    def to_proto(self) -> agent_pb2.StartFailure:
        return agent_pb2.StartFailure(
            replica=self.target,
            epoch=self.epoch,
            reason=self.error,
            out_of_memory=self.out_of_memory,
            failures=self.failures,
        )


@dataclass(frozen=True)
class NodeInfo:
    """What the agent found at start."""

    backend: Backend
    gpus: tuple[inventory.StaticGpu, ...] = ()


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        node: NodeInfo,
        mps: MpsDaemon,
        base_env: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.node = node
        self.mps = mps
        self.mode = diff.MODE_BY_NAME[settings.share_mode]
        self.shape = NodeShape(
            node=settings.node,
            mode=self.mode,
            gpus={g.index: g.sm_groups for g in node.gpus},
            host=node.backend is Backend.HOST,
        )
        self.launches = Launches(settings, node.backend, self.mode, mps, base_env)
        self.epoch = 0
        self.heartbeats = 0
        self.board = RouteBoard()
        # the instance that carries each replica_id now; shadows and draining ones are only in _all
        self.primary: dict[str, Instance] = {}
        self._all: list[Instance] = []
        self._lock = asyncio.Lock()
        self._generation = itertools.count(1)
        self._pending: agent_pb2.Assignment | None = None
        self._background: asyncio.Task[None] | None = None
        # set when close() begins: no assignment is applied after it (a heartbeat's or an
        # Apply's would start replicas while the agent stops the ones it has)
        self._closing = False
        # replica_id -> its failed starts: a replica that cannot start (a crash in its warm-up,
        # say) is retried with a doubling delay, not at every heartbeat that re-sends the
        # assignment, and only while the assignment plans it the same way
        self._start_failures: dict[str, StartFailure] = {}
        self.policy = RestartPolicy(
            backoff_s=settings.restart_backoff_s,
            backoff_cap_s=settings.restart_backoff_cap_s,
            ready_timeout_s=settings.ready_timeout_s,
            kill_grace_s=settings.kill_grace_s,
        )
        # fatal GPU faults: what shares one restarts with the replica that met it
        self.faults = GpuFaults(mps, lambda: list(self._all), self.mode, settings.kill_grace_s)
        self._sock_dir = os.path.join(settings.run_dir, "replicas")
        # replicas of a killed predecessor: routed to until this agent's own serve, then stopped
        self.orphans = Orphans(self._sock_dir)
        self._reaper: asyncio.Task[None] | None = None
        if self.orphans.pids:
            log.warning("replicas of an earlier agent still run (pids %s); they serve until "
                        "this agent's own do", self.orphans.pids)  # fmt: skip

    # -- views --------------------------------------------------------------------------------

    def endpoints(self) -> list[plan_pb2.Endpoint]:
        return [i.endpoint() for i in self._all] + list(self.orphans.routes)

    def status(self) -> agent_pb2.AgentStatusResponse:
        return agent_pb2.AgentStatusResponse(
            node=self.settings.node,
            epoch=self.epoch,
            replicas=self.endpoints(),
            heartbeats=self.heartbeats,
        )

    async def inventory(self) -> agent_pb2.InventoryResponse:
        running = await self.mps.running()
        return await asyncio.to_thread(
            inventory.snapshot,
            self.settings.node,
            self.node.backend,
            list(self.node.gpus),
            self.mode,
            running,
        )

    def start_failures(self) -> list[agent_pb2.StartFailure]:
        """The replicas of the newest assignment that could not start, for the scheduler."""
        return [f.to_proto() for f in self._start_failures.values()]

    def instances(self, replica_id: str) -> list[Instance]:
        """Every live instance of a replica (two during a shadow replacement)."""
        return [i for i in self._all if i.replica_id == replica_id]

    def publish(self) -> None:
        self.board.publish(self.epoch, self.endpoints())

    # -- apply --------------------------------------------------------------------------------

    async def apply(self, assignment: agent_pb2.Assignment) -> agent_pb2.ApplyResponse:
        async with self._lock:
            if self._closing:
                raise Unavailable(
                    f"agent is stopping; assignment epoch {assignment.epoch} not applied"
                )
            return await self._apply(assignment)

    def submit(self, assignment: agent_pb2.Assignment) -> None:
        """Applies in the background (heartbeat answers); the newest pending assignment wins."""
        if assignment.epoch <= self.epoch or self._closing:
            return
        self._pending = assignment
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._apply_pending())

    async def _apply_pending(self) -> None:
        while self._pending is not None:
            assignment, self._pending = self._pending, None
            if assignment.epoch <= self.epoch:
                continue
            try:
                await self.apply(assignment)
            except CamelotError as e:
                log.warning("assignment epoch %d not applied: %s", assignment.epoch, e)
            except Exception:
                log.exception("assignment epoch %d: unexpected failure", assignment.epoch)

    async def _apply(self, assignment: agent_pb2.Assignment) -> agent_pb2.ApplyResponse:
        t0 = mono_us()
        diff.validate(assignment, self.shape, self.epoch)
        self._forget_failures(assignment)
        current = {rid: inst.target for rid, inst in self.primary.items()}
        changes = diff.diff(current, assignment, self.mode)
        starts = [c for c in changes if c.action in (Action.START, Action.REPLACE)]
        failures: list[str] = []
        now = time.monotonic()
        for c in list(starts):
            f = self._start_failures.get(c.replica_id)
            if f is None or f.next_at <= now:
                continue
            failures.append(
                f"replica {c.replica_id} failed to start {f.failures} time(s) in a row, "
                f"next try in {f.next_at - now:.1f} s (last: {f.error})"
            )
            starts.remove(c)
        for c in starts:
            log.info("epoch %d: %s %s", assignment.epoch, c.action.value, c.replica_id)
        results = await asyncio.gather(
            *(self._start(c.target) for c in starts if c.target is not None),
            return_exceptions=True,
        )
        retired: list[Instance] = []
        started = 0
        for change, result in zip(starts, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, StartError | OSError):
                    raise result
                failures.append(str(result))
                assert change.target is not None
                self._start_failed(change.target, assignment.epoch, result)
                continue
            self._start_failures.pop(change.replica_id, None)
            started += 1
            old = self.primary.get(change.replica_id)
            self.primary[change.replica_id] = result
            if old is not None:
                retired.append(old)
        resized = 0
        for change in changes:
            assert change.action is Action.STOP or change.target is not None
            if change.action is Action.RESIZE and change.target is not None:
                try:
                    await self._resize(self.primary[change.replica_id], change.target)
                    resized += 1
                except CamelotError as e:
                    failures.append(f"resize of {change.replica_id} failed: {e.message}")
            elif change.action is Action.KEEP and change.target is not None:
                # fields no process depends on (e.g. groups in MPS mode) follow the plan
                self.primary[change.replica_id].target = self._normalized(change.target)
            elif change.action is Action.STOP:
                retired.append(self.primary.pop(change.replica_id))
        await self._retire(retired)
        if failures:
            # routes only where they changed: a publish wakes the heartbeat, whose beat hands the
            # same assignment back at once, and a replica waiting out its backoff would refuse it
            # again at once, round and round until the backoff ends
            if started or resized or retired or starts:
                self.publish()
            self._update_metrics()
            raise Unavailable(f"epoch {assignment.epoch} not applied: {'; '.join(failures)}")
        self.epoch = assignment.epoch
        self.orphans.routes = []
        self.publish()
        self._update_metrics()
        if self.orphans.pids and self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_orphans(ORPHAN_GRACE_S))
        elapsed = mono_us() - t0
        log.info("applied epoch %d: %d started, %d stopped, %d resized in %d ms",
                 self.epoch, started, len(retired), resized, elapsed // 1000)  # fmt: skip
        return agent_pb2.ApplyResponse(
            epoch=self.epoch,
            started=started,
            stopped=len(retired),
            resized=resized,
            apply_us=elapsed,
            endpoints=self.endpoints(),
        )

    def _start_failed(self, target: plan_pb2.Endpoint, epoch: int, error: BaseException) -> None:
        replica_id = target.replica.replica_id
        before = self._start_failures.get(replica_id)
        n = (before.failures if before is not None else 0) + 1
        delay = self.policy.backoff.delay_s(n)
        oom = isinstance(error, StartError) and error.out_of_memory
        self._start_failures[replica_id] = StartFailure(
            self._normalized(target), epoch, n, time.monotonic() + delay, str(error), oom
        )
        log.warning("replica %s failed to start (%d in a row%s); next try in %.1f s: %s",
                    replica_id, n, ", out of GPU memory" if oom else "", delay,
                    error)  # fmt: skip

    def _forget_failures(self, assignment: agent_pb2.Assignment) -> None:
        """Ends the retries of replicas the assignment no longer plans, or plans otherwise (the
        scheduler's answer to a replica that ran out of memory): those start afresh, if at all."""
        planned = {ep.replica.replica_id: self._normalized(ep) for ep in assignment.replicas}
        for rid, f in list(self._start_failures.items()):
            if planned.get(rid) != f.target:
                log.info("replica %s: epoch %d plans it otherwise; its failed starts are over",
                         rid, assignment.epoch)  # fmt: skip
                del self._start_failures[rid]

    async def _start(self, target: plan_pb2.Endpoint) -> Instance:
        """A new instance, SERVING and supervised; StartError (and cleaned up) otherwise."""
        target = self._normalized(target)
        instance_id = self._instance_id(target.replica.replica_id)
        taken = {i.slot for i in self._all}
        slot = next(s for s in itertools.count() if s not in taken)
        inst = Instance(instance_id, target, socket_path(self._sock_dir, instance_id), slot)
        self._all.append(inst)
        try:
            await inst.launch(self.launches.launch(inst))
            self.publish()
            await inst.wait_ready(self.settings.ready_timeout_s)
        except (StartError, OSError):
            await inst.stop(drain_timeout_s=0.1, kill_grace_s=self.settings.kill_grace_s)
            self._all.remove(inst)
            raise
        inst.watcher = asyncio.create_task(
            supervise(
                inst,
                self.launches.launch,
                self.policy,
                self._on_instance_change,
                on_exit=self.faults.on_exit,
                before_restart=self.faults.before_restart,
            )
        )
        return inst

    def _instance_id(self, replica_id: str) -> str:
        """The next instance id whose socket is free: an earlier agent's replica may still serve
        on an existing one, and is never taken over."""
        while True:
            instance_id = f"{replica_id}.{next(self._generation)}"
            if not os.path.exists(socket_path(self._sock_dir, instance_id)):
                return instance_id

    async def _resize(self, inst: Instance, target: plan_pb2.Endpoint) -> None:
        reply = await inst.client.resize(list(target.replica.sm_groups), RPC_TIMEOUT_S)
        inst.target = self._normalized(target)
        log.info("replica %s: resized to groups %s in %d us (%d SMs)", inst.instance_id,
                 list(target.replica.sm_groups), reply.apply_us, reply.multiprocessors)  # fmt: skip

    async def _retire(self, retired: list[Instance]) -> None:
        """Publishes them DRAINING, gives gateways `shift_s` to move away, drains and stops."""
        if not retired:
            return
        for inst in retired:
            if inst.state is State.READY:
                inst.state = State.DRAINING
        self.publish()
        await asyncio.sleep(self.settings.shift_s)
        await asyncio.gather(*(self._stop(inst) for inst in retired))

    async def _stop(self, inst: Instance) -> None:
        try:
            await inst.stop(self.settings.drain_timeout_s, self.settings.kill_grace_s)
        finally:
            if inst in self._all:
                self._all.remove(inst)
        log.info("replica %s: stopped", inst.instance_id)

    def _on_instance_change(self) -> None:
        self.publish()
        self._update_metrics()

    # -- processes ----------------------------------------------------------------------------

    def _normalized(self, target: plan_pb2.Endpoint) -> plan_pb2.Endpoint:
        out = plan_pb2.Endpoint(
            replica=target.replica, pipeline=target.pipeline, stage=target.stage
        )
        if not out.replica.node:
            out.replica.node = self.settings.node
        return out

    def _update_metrics(self) -> None:
        metrics.SM_SHARE.clear()
        metrics.REPLICAS.clear()
        counts: dict[tuple[str, str], int] = {}
        gpus = {g.index: g for g in self.node.gpus}
        for rid, inst in self.primary.items():
            t = inst.target
            counts[(t.pipeline, t.stage)] = counts.get((t.pipeline, t.stage), 0) + 1
            share = diff.sm_percent(t.replica, self.mode)
            gpu = gpus.get(t.replica.gpu)
            if diff.effective_mode(t.replica, self.mode) == diff.GREEN and gpu and gpu.sm_count:
                share = 100.0 * len(t.replica.sm_groups) * gpu.sms_per_group / gpu.sm_count
            metrics.SM_SHARE.labels(t.pipeline, t.stage, rid).set(share)
        for (pipeline, stage), n in counts.items():
            metrics.REPLICAS.labels(pipeline, stage).set(n)

    # -- shutdown -----------------------------------------------------------------------------

    async def _reap_orphans(self, grace_s: float) -> None:
        """Stops the earlier agent's replicas after `grace_s`, never one of this agent's own."""

        def ours() -> set[int | None]:
            return {i.pid for i in self._all}

        await self.orphans.reap(grace_s, self.settings.kill_grace_s, ours)

    async def close(self) -> None:
        """Drains and stops every replica (routes show them DRAINING first)."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        if self.orphans.pids:
            self._reaper = asyncio.create_task(self._reap_orphans(0.0))
            await self._reaper
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
        await self.faults.aclose()
        async with self._lock:
            retired = list(self._all)
            self.primary.clear()
            await self._retire(retired)
            self.publish()
            self._update_metrics()
