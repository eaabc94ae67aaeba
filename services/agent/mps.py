"""The MPS control daemon: started and stopped by the agent (`manage`), or someone else's.

    manage    start `nvidia-cuda-mps-control -d` at agent start, `quit` it at agent exit
              (if a daemon already answers on the pipe directory, use it and leave it running)
    external  a daemon runs already (compose service, systemd); only check that it answers
    off       no MPS: replicas run as plain CUDA processes (shares are not enforced)

Replicas find the daemon through CUDA_MPS_PIPE_DIRECTORY, which the agent passes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time

from services.agent.gpufaults import parse_server_status

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
COMMAND_TIMEOUT_S = 10.0
# heartbeats ask every second; asking the daemon that often is needless
RUNNING_CACHE_S = 10.0


class MpsError(RuntimeError):
    pass


class MpsDaemon:
    def __init__(self, mode: str, pipe_dir: str, log_dir: str) -> None:
        self.mode = mode
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self.owned = False
        self._checked_at: float | None = None
        self._running = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def env(self) -> dict[str, str]:
        """What an MPS client (a replica) needs to find this daemon."""
        if not self.enabled:
            return {}
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    async def _control(self, command: str | None, *args: str) -> tuple[int, str]:
        exe = shutil.which(CONTROL)
        if exe is None:
            raise MpsError(f"{CONTROL} is not on PATH (install the NVIDIA driver utilities)")
        env = {**os.environ, **self.env()}
        proc = await asyncio.create_subprocess_exec(
            exe,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        data = (command + "\n").encode() if command is not None else None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(data), COMMAND_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise MpsError(f"{CONTROL} {' '.join(args)} did not answer") from None
        return int(proc.returncode or 0), out.decode(errors="replace").strip()

    async def running(self, fresh: bool = False) -> bool:
        """Whether a control daemon answers on the pipe directory (cached for RUNNING_CACHE_S)."""
        now = time.monotonic()
        if fresh or self._checked_at is None or now - self._checked_at >= RUNNING_CACHE_S:
            self._running = await self._ask_running()
            self._checked_at = now
        return self._running

    async def _ask_running(self) -> bool:
        control = os.path.join(self.pipe_dir, "control")
        if not self.enabled or not await asyncio.to_thread(os.path.exists, control):
            return False
        try:
            rc, _ = await self._control("get_server_list")
        except MpsError:
            return False
        return rc == 0

    async def server_states(self) -> dict[int, str]:
        """Each MPS server's pid and state (ACTIVE, INITIALIZING, FAULT; "" where this driver's
        control daemon does not say): `get_server_list`, then `get_server_status <pid>`."""
        if not self.enabled:
            return {}
        rc, out = await self._control("get_server_list")
        if rc != 0:
            raise MpsError(f"get_server_list failed (rc {rc}): {out}")
        states: dict[int, str] = {}
        for word in out.split():
            if not word.isdigit():
                continue
            rc, said = await self._control(f"get_server_status {word}")
            states[int(word)] = parse_server_status(said) if rc == 0 else ""
        return states

    async def restart(self) -> None:
        """Quits the daemon this agent started (its servers with it) and starts it again."""
        if not self.owned:
            raise MpsError("the MPS daemon is not this agent's to restart")
        await self.stop()
        await self.start()
        log.warning("MPS control daemon restarted")

    async def start(self) -> None:
        if not self.enabled:
            return
        if await self.running(fresh=True):
            log.info("MPS control daemon already running on %s", self.pipe_dir)
            return
        if self.mode == "external":
            raise MpsError(f"CAMELOT_MPS=external but no MPS daemon answers on {self.pipe_dir}")
        os.makedirs(self.pipe_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        rc, out = await self._control(None, "-d")
        if rc != 0:
            raise MpsError(f"{CONTROL} -d failed (rc {rc}): {out}")
        self.owned = True
        self._checked_at = None
        log.info("MPS control daemon started (pipes %s, logs %s)", self.pipe_dir, self.log_dir)

    async def stop(self) -> None:
        if not self.owned:
            return
        try:
            rc, out = await self._control("quit")
            if rc != 0:
                log.warning("MPS quit failed (rc %s): %s", rc, out)
            else:
                log.info("MPS control daemon stopped")
        except MpsError as e:
            log.warning("MPS quit failed: %s", e)
        self.owned = False
        self._checked_at = None
