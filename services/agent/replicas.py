"""One replica instance: its process, its Unix socket, its log, its state.

An *instance* is one process generation of a replica_id. During a shadow replacement two
instances of one replica_id run at once (the new one READY, the old one DRAINING); a restart
after a crash reuses the instance (same socket, same share) with a new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import OUT_OF_MEMORY_EXIT, CamelotError
from protos import plan_pb2
from services.agent.stageclient import StageClient

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux; keep room for the NUL.
MAX_SOCKET_PATH = 100
RPC_TIMEOUT_S = 10.0


class State(enum.Enum):
    STARTING = plan_pb2.REPLICA_STATE_STARTING
    READY = plan_pb2.REPLICA_STATE_READY
    DRAINING = plan_pb2.REPLICA_STATE_DRAINING
    STOPPED = plan_pb2.REPLICA_STATE_STOPPED
    FAILED = plan_pb2.REPLICA_STATE_FAILED


# how much of a log's end is read for the line that says why a replica stopped
LOG_TAIL_BYTES = 4096
LOG_LINE_CHARS = 400


class StartError(CamelotError):
    """A replica process exited or did not report SERVING in time; `out_of_memory` where it
    exited with OUT_OF_MEMORY_EXIT (its model did not fit the GPU)."""

    def __init__(self, message: str, *, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


def last_line(path: str) -> str:
    """The last non-empty line of a log ("" when there is none), cut to LOG_LINE_CHARS."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:LOG_LINE_CHARS] if lines else ""


def render_command(template: Sequence[str], fields: Mapping[str, object]) -> list[str]:
    """Fills `{name}` fields of each word; a KeyError names a field the template does not know."""
    return [word.format_map(fields) for word in template]


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def socket_path(sock_dir: str, instance_id: str) -> str:
    path = os.path.join(sock_dir, safe_name(instance_id) + ".sock")
    if len(path) > MAX_SOCKET_PATH:
        digest = hashlib.sha1(instance_id.encode()).hexdigest()[:16]
        path = os.path.join(sock_dir, f"r{digest}.sock")
    if len(path) > MAX_SOCKET_PATH:
        raise ValueError(f"run directory {sock_dir!r} is too long for Unix socket paths")
    return path


def mps_percentage(sm_percent: float) -> str:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE takes a whole percentage."""
    return str(max(1, min(100, round(sm_percent))))


@dataclass(frozen=True)
class Launch:
    """How to run an instance's process."""

    argv: list[str]
    env: dict[str, str]
    log_path: str


class Instance:
    def __init__(
        self,
        instance_id: str,
        target: plan_pb2.Endpoint,
        unix_path: str,
        slot: int,
    ) -> None:
        self.instance_id = instance_id
        self.target = target
        self.unix_path = unix_path
        self.slot = slot
        self.state = State.STARTING
        self.restarts = 0
        self.stopping = False
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = ""
        self.exited: asyncio.Task[int] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.client = StageClient(self.address)
        # the process's start (monotonic) and whether it has served: what a GPU fault asks
        self.started_at = 0.0
        self.served = False

    @property
    def replica_id(self) -> str:
        return self.target.replica.replica_id

    @property
    def address(self) -> str:
        return f"unix:{self.unix_path}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def endpoint(self) -> plan_pb2.Endpoint:
        out = plan_pb2.Endpoint()
        out.CopyFrom(self.target)
        out.address = self.address
        out.state = self.state.value
        out.restarts = self.restarts
        return out

    async def launch(self, launch: Launch) -> None:
        """Starts the process (health is awaited separately)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)
        os.makedirs(os.path.dirname(self.unix_path), exist_ok=True)
        os.makedirs(os.path.dirname(launch.log_path), exist_ok=True)
        self.log_path = launch.log_path
        with open(launch.log_path, "ab") as out:  # noqa: ASYNC230 (a local file, opened once)
            # a session of its own: a Ctrl-C at the agent's terminal reaches the agent only,
            # which then drains its replicas in order
            self.proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=launch.env,
                start_new_session=True,
            )
        self.exited = asyncio.ensure_future(self.proc.wait())
        self.started_at = time.monotonic()
        self.served = False
        self.state = State.STARTING
        log.info("replica %s: started pid %d", self.instance_id, self.proc.pid)

    async def wait_ready(self, timeout_s: float) -> None:
        """Waits for health SERVING; StartError if the process exits or the time runs out."""
        ok = await self.client.wait_serving(timeout_s, self.exited)  # type: ignore[arg-type]
        if not ok:
            if self.exited is not None and self.exited.done():
                code = self.exited.result()
                # the process's last words (run_process prints the error there) say why
                said = await asyncio.to_thread(last_line, self.log_path) if self.log_path else ""
                why = f"replica {self.instance_id} exited with {code}"
                raise StartError(
                    f"{why}: {said}" if said else why, out_of_memory=code == OUT_OF_MEMORY_EXIT
                )
            raise StartError(f"replica {self.instance_id} not SERVING after {timeout_s:.0f} s")
        self.state = State.READY
        self.served = True
        log.info("replica %s: ready at %s", self.instance_id, self.address)

    async def stop(self, drain_timeout_s: float, kill_grace_s: float) -> None:
        """Drains (if it serves), then SIGTERM, then SIGKILL after the grace."""
        self.stopping = True
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        if self.alive() and self.state in (State.READY, State.DRAINING):
            self.state = State.DRAINING
            try:
                done = await self.client.drain(drain_timeout_s)
                log.info("replica %s: drained (%d requests finished)", self.instance_id, done)
            except CamelotError as e:
                log.warning("replica %s: drain failed: %s", self.instance_id, e)
        await self.terminate(kill_grace_s)
        self.state = State.STOPPED
        await self.client.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)

    async def terminate(self, kill_grace_s: float) -> None:
        proc = self.proc
        if proc is None or self.exited is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), kill_grace_s)
            except TimeoutError:
                log.warning("replica %s: no exit %.0f s after SIGTERM, killing", self.instance_id,
                            kill_grace_s)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await self.exited
