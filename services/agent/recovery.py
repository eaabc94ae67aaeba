"""The agent's recovery of a GPU from a fatal fault: rounds, as gpufaults.py decides them.

A round on a GPU begins when a replica that served exits DEVICE_FAULT_EXIT as an MPS client, or
when NVML reports a critical Xid there. It stops the replicas the fault took down (SIGTERM, then
SIGKILL after `kill_grace_s`: a client of a faulted server is of no use, and its queued queries
fail UNAVAILABLE, which gateways retry elsewhere), and holds every restart on that GPU until the
round's processes are all gone (the MPS server takes no new client for the GPU before) and the
MPS server is no longer in FAULT; one that stays there past `mps_recover_s` is restarted where
the agent manages the daemon, and reported where it does not. Their supervisors then start the
replicas again with their plans. A green or plain replica's fault is its own: it restarts alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from common import metrics
from common.errors import DEVICE_FAULT_EXIT
from services.agent import diff, gpufaults
from services.agent.gpufaults import Client, Reach
from services.agent.mps import MpsDaemon, MpsError
from services.agent.replicas import Instance

log = logging.getLogger(__name__)

# how long a restart on a faulted GPU waits for the round's processes to exit
ROUND_WAIT_S = 30.0
# an Xid this soon after a round began on its GPU is that round's
XID_COALESCE_S = 10.0
# how long the MPS server may stay in FAULT once its clients are gone before it is restarted
MPS_RECOVER_S = 10.0
POLL_S = 0.1


async def gone(exits: Sequence[asyncio.Future[int]], timeout_s: float) -> None:
    """Until every one of the processes whose `exits` these are has exited, or `timeout_s`."""
    waits = [e for e in exits if not e.done()]
    if waits:
        await asyncio.wait(waits, timeout=timeout_s)


class GpuFaults:
    """Decides and runs rounds; `on_exit` and `before_restart` are a supervisor's hooks."""

    def __init__(
        self,
        mps: MpsDaemon,
        instances: Callable[[], Sequence[Instance]],
        node_mode: diff.ShareMode,
        kill_grace_s: float,
    ) -> None:
        self.mps = mps
        self.instances = instances
        self.node_mode = node_mode
        self.kill_grace_s = kill_grace_s
        # per GPU: when its last round began, the processes it waits on (by replica, the exit of
        # the process that ran when the round began: a replica started again since is a new
        # process, which the round must not wait on), its MPS check
        self.round_at: dict[int, float] = {}
        self._old: dict[int, dict[str, asyncio.Future[int]]] = {}
        self._mps_check: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.faults: dict[int, int] = {}
        self.rounds: dict[int, int] = {}

    def client(self, inst: Instance) -> Client:
        plan = inst.target.replica
        mode = diff.effective_mode(plan, self.node_mode)
        shared = gpufaults.shares_server(mode, self.mps.enabled)
        return Client(inst.instance_id, plan.gpu, shared, inst.started_at, inst.alive())

    # -- hooks --------------------------------------------------------------------------------

    def on_exit(self, inst: Instance, code: int) -> None:
        """A supervised replica exited: a DEVICE_FAULT_EXIT may begin a round on its GPU."""
        if code != DEVICE_FAULT_EXIT:
            return
        faulted = self.client(inst)
        self.faults[faulted.gpu] = self.faults.get(faulted.gpu, 0) + 1
        reach = gpufaults.exit_reach(faulted, inst.served, self.round_at.get(faulted.gpu))
        if reach is Reach.NONE:
            log.error("replica %s stopped on a fatal GPU fault on GPU %d; it restarts alone",
                      inst.instance_id, faulted.gpu)  # fmt: skip
            return
        self.begin_round(faulted.gpu, reach, f"replica {inst.instance_id}", inst.instance_id)

    def on_xid(self, gpu: int, xid: int) -> None:
        """NVML reported a critical Xid on `gpu` (called on the event loop)."""
        try:
            reach = gpufaults.xid_reach(xid)
            now = time.monotonic()
            if gpufaults.xid_starts_round(reach, now, self.round_at.get(gpu), XID_COALESCE_S):
                self.begin_round(gpu, reach, f"Xid {xid}")
        except Exception:
            log.exception("GPU %d: Xid %d not handled", gpu, xid)

    def waits_for(self, inst: Instance) -> list[asyncio.Future[int]]:
        """The exits a restart of `inst` waits for: the other processes of its GPU's round that
        have not exited yet."""
        old = self._old.get(inst.target.replica.gpu, {})
        return [e for iid, e in old.items() if iid != inst.instance_id and not e.done()]

    async def before_restart(self, inst: Instance) -> None:
        """Holds a restart on a GPU whose round is under way until that round is over."""
        gpu = inst.target.replica.gpu
        await gone(self.waits_for(inst), ROUND_WAIT_S)
        check = self._mps_check.get(gpu)
        if check is not None and not check.done():
            await asyncio.wait([check], timeout=ROUND_WAIT_S)

    # -- rounds -------------------------------------------------------------------------------

    def begin_round(self, gpu: int, reach: Reach, cause: str, exclude: str = "") -> list[str]:
        """Stops what `reach` took down on `gpu`; the supervisors restart it after the round."""
        live = [i for i in self.instances() if i.target.replica.gpu == gpu]
        shared = any(self.client(i).shared for i in live)
        if reach is Reach.SHARED and not shared:
            # no context is shared on this GPU: the process that faulted exits by itself
            log.error("GPU %d: fatal fault (%s) in a context of its own; nothing else restarts",
                      gpu, cause)  # fmt: skip
            return []
        self.round_at[gpu] = time.monotonic()
        self.rounds[gpu] = self.rounds.get(gpu, 0) + 1
        victims = set(gpufaults.to_restart(reach, gpu, [self.client(i) for i in live], exclude))
        self._old[gpu] = {
            i.instance_id: i.exited for i in live if i.alive() and i.exited is not None
        }
        metrics.GPU_FAULTS.labels(str(gpu), cause.split()[0]).inc()
        log.error("GPU %d: fatal fault (%s): restarting %d replica(s) sharing it: %s",
                  gpu, cause, len(victims), sorted(victims) or "none")  # fmt: skip
        for inst in live:
            if inst.instance_id in victims:
                self._spawn(self._stop_for_round(inst))
        if self.mps.enabled and shared:
            previous = self._mps_check.get(gpu)
            if previous is not None:
                previous.cancel()
            self._mps_check[gpu] = self._spawn(self._check_mps(gpu, list(self._old[gpu].values())))
        return sorted(victims)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop_for_round(self, inst: Instance) -> None:
        try:
            await inst.terminate(self.kill_grace_s)
        except Exception:
            log.exception("replica %s: not stopped for the GPU's round", inst.instance_id)

    async def _check_mps(self, gpu: int, old: list[asyncio.Future[int]]) -> None:
        """Once the round's processes are gone: the MPS server out of FAULT, or restarted."""
        try:
            await gone(old, ROUND_WAIT_S)
            deadline = time.monotonic() + MPS_RECOVER_S
            while True:
                states = await self.mps.server_states()
                faulted = [pid for pid, state in states.items() if state == "FAULT"]
                if not faulted:
                    log.info("GPU %d: MPS server(s) %s after the round", gpu, states or "none")
                    return
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(POLL_S * 5)
            if self.mps.owned:
                log.error("GPU %d: MPS server %s still in FAULT; restarting the daemon",
                          gpu, faulted)  # fmt: skip
                await self.mps.restart()
            else:
                log.error("GPU %d: MPS server %s still in FAULT and not this agent's "
                          "(CAMELOT_MPS=external): restart it", gpu, faulted)  # fmt: skip
        except (MpsError, OSError) as e:
            log.error("GPU %d: MPS server state unknown after the round: %s", gpu, e)
        except Exception:
            log.exception("GPU %d: MPS check failed", gpu)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
