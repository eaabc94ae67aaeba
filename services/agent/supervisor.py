"""Keeps a replica's process running: an unexpected exit is logged, reported and restarted.

The plan holds across a restart (same replica_id, same share, same socket); the state goes
FAILED -> STARTING -> READY and `restarts` counts up. Restarts back off exponentially so a
replica that crashes at start does not spin; the loop ends only when the agent stops the
instance (`stopping`) or cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.retry import Backoff
from services.agent.replicas import Instance, Launch, StartError, State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 0.5
    backoff_cap_s: float = 30.0
    ready_timeout_s: float = 180.0
    kill_grace_s: float = 10.0

    @property
    def backoff(self) -> Backoff:
        """Doubling from `backoff_s` to `backoff_cap_s`, without jitter (logged, then slept)."""
        return Backoff(self.backoff_s, self.backoff_cap_s, jitter=0.0)

    def delay_s(self, failures: int) -> float:
        """Delay before the restart after `failures` consecutive failed runs (1, 2, ...)."""
        return self.backoff.delay_s(failures - 1)


async def supervise(
    instance: Instance,
    launch_for: Callable[[Instance], Launch],
    policy: RestartPolicy,
    changed: Callable[[], None],
    on_exit: Callable[[Instance, int], None] | None = None,
    before_restart: Callable[[Instance], Awaitable[None]] | None = None,
) -> None:
    """Runs until the instance is stopped on purpose; restarts its process when it dies.
    `on_exit(instance, code)` hears of each unexpected exit first (a GPU fault's reach is
    decided there); `before_restart` is awaited before each start (a faulted GPU's round)."""
    failures = 0
    while not instance.stopping:
        assert instance.exited is not None
        code = await asyncio.shield(instance.exited)
        if instance.stopping:
            return
        if on_exit is not None:
            try:
                on_exit(instance, code)
            except Exception:
                log.exception("replica %s: exit handler failed", instance.instance_id)
        failures += 1
        instance.state = State.FAILED
        log.error("replica %s (pid %s) exited with %s; restart %d in %.1f s",
                  instance.instance_id, instance.pid, code, instance.restarts + 1,
                  policy.delay_s(failures))  # fmt: skip
        changed()
        await asyncio.sleep(policy.delay_s(failures))
        if before_restart is not None:
            await before_restart(instance)
        if instance.stopping:
            return
        instance.restarts += 1
        try:
            await instance.launch(launch_for(instance))
            changed()
            await instance.wait_ready(policy.ready_timeout_s)
        except (StartError, OSError) as e:
            log.error("replica %s: restart failed: %s", instance.instance_id, e)
            # a hung start is killed; the loop then sees the exit and tries again
            await instance.terminate(policy.kill_grace_s)
            continue
        failures = 0
        changed()
