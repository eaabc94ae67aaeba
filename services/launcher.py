"""A local mesh of real processes: start each, wait for its gRPC health, stop all in reverse.

Used by `camelot run` / `camelot up` and by tests that need the processes themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import lifecycle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    target: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def wait_healthy(target: str, timeout_s: float, proc: Proc | None = None) -> None:
    """Polls grpc.health.v1 on target until SERVING; fails early if the process died."""
    deadline = time.monotonic() + timeout_s
    async with lifecycle.channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and not proc.alive():
                code = proc.popen.returncode
                raise RuntimeError(f"{proc.name} exited with {code} before serving:\n{proc.tail()}")
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                tail = proc.tail() if proc is not None else ""
                raise TimeoutError(f"{target} not serving after {timeout_s:.0f} s\n{tail}")
            await asyncio.sleep(0.05)


@dataclass
class Mesh:
    run_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.run_dir / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def python(
        self, name: str, module: str, args: list[str], env: dict[str, str] | None = None
    ) -> Proc:
        return self.spawn(name, [sys.executable, "-m", module, *args], env)

    async def stop(self, proc: Proc, grace_s: float = 15.0) -> None:
        if not proc.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.popen.wait, grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.kill()
            await asyncio.to_thread(proc.popen.wait)

    async def stop_all(self, grace_s: float = 15.0) -> None:
        for proc in reversed(self.procs):
            await self.stop(proc, grace_s)
        self.procs.clear()
