"""Replicas a killed agent left behind: found at start, routed to, then stopped.

Replicas run in sessions of their own, so a killed agent's keep serving. The next agent on the
node finds them by their sockets under its run directory, routes to them until its own replicas
serve (no query is dropped in between), and then stops them: SIGTERM (they drain), then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from protos import plan_pb2

log = logging.getLogger(__name__)

# After a restarted agent's first apply, replicas left by its killed predecessor keep serving
# this long (routes move to the new instances) before they are stopped.
ORPHAN_GRACE_S = 3.0


def find_orphans(sock_dir: str) -> dict[int, list[str]]:
    """Stage processes (pid -> argv) listening under sock_dir that no agent of this boot started:
    the replicas of an agent that was killed (they run in sessions of their own and outlive it)."""
    out: dict[int, list[str]] = {}
    prefix = os.path.join(sock_dir, "")
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                words = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--unix" in words and words.index("--unix") + 1 < len(words):
            if words[words.index("--unix") + 1].startswith(prefix):
                out[int(name)] = words
    return out


def orphan_endpoint(argv: list[str]) -> plan_pb2.Endpoint | None:
    """The route of an earlier agent's replica, read from its command line."""

    def arg(flag: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""

    rid, pipeline, stage, unix = (
        arg(f) for f in ("--replica-id", "--pipeline", "--stage", "--unix")
    )
    if not (rid and pipeline and stage and unix):
        return None
    return plan_pb2.Endpoint(
        replica=plan_pb2.ReplicaPlan(replica_id=rid),
        pipeline=pipeline,
        stage=stage,
        address=f"unix:{unix}",
        state=plan_pb2.REPLICA_STATE_READY,
    )


class Orphans:
    """The replicas of an earlier agent found under `sock_dir` when this one started."""

    def __init__(self, sock_dir: str) -> None:
        self.sock_dir = sock_dir
        found = find_orphans(sock_dir)
        self.pids = sorted(found)
        # routed to until this agent's own replicas serve
        self.routes = [e for e in map(orphan_endpoint, found.values()) if e is not None]

    async def reap(
        self, grace_s: float, kill_grace_s: float, ours: Callable[[], set[int | None]]
    ) -> None:
        """After `grace_s`, SIGTERM (they drain), then SIGKILL after `kill_grace_s`, the orphans
        still running; `ours` (this agent's own pids) are never taken for one."""
        await asyncio.sleep(grace_s)
        self.routes = []
        live = set(find_orphans(self.sock_dir)) - ours()
        orphans = [pid for pid in self.pids if pid in live]
        self.pids = []
        for pid in orphans:
            log.info("stopping pid %d, a replica of an earlier agent", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for _ in range(int(kill_grace_s / 0.1)):
            if not set(orphans) & set(find_orphans(self.sock_dir)):
                return
            await asyncio.sleep(0.1)
        for pid in set(orphans) & set(find_orphans(self.sock_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
