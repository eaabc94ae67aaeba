"""Real broker and hop processes for tests and benchmarks: start, wait for SERVING, stop.

Each process runs `python -m ...` in a fresh interpreter (no fork of a process that may hold a
CUDA context), listens on a Unix socket or a free loopback port, and is ready when the standard
health service says SERVING.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.lifecycle import channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    """A child process serving gRPC at `target`."""

    args: list[str]
    target: str
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    async def wait_serving(self, timeout_s: float = 30.0) -> None:
        """Polls the health service until SERVING; raises with the log if the process died."""
        deadline = time.monotonic() + timeout_s
        async with channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.args} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.args} not SERVING after {timeout_s}s")
                await asyncio.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout_s; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL and reap (a reaped child no longer looks alive to the broker)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def broker_process(
    socket_path: str,
    log_path: str,
    *,
    backend: str = "host",
    port: int | None = None,
    extra: Sequence[str] = (),
) -> Process:
    """`python -m shmbroker` on socket_path (and a free loopback port); target is the socket."""
    args = [
        "-m", "shmbroker", "--backend", backend, "--socket", socket_path,
        "--port", str(port if port is not None else free_port()), *extra,
    ]  # fmt: skip
    return Process(args=args, target=f"unix:{socket_path}", log_path=log_path)


def hop_process(broker_target: str, log_path: str, *, backend: str = "host") -> Process:
    port = free_port()
    args = [
        "-m", "shmbroker.hop", "--broker", broker_target, "--port", str(port),
        "--backend", backend,
    ]  # fmt: skip
    return Process(args=args, target=f"127.0.0.1:{port}", log_path=log_path)
