"""Shared fixtures: free ports, a real redis-server per test session, the gpu marker's skip."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from common.backend import cuda_available


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# GPU tests that fault the GPU on purpose run first: under MPS a fault takes down every client
# of the server, the test process too once an in-process GPU test has made its context (the
# server then waits for it to exit). On the H100 at 0a98ffa a whole `tests/gpu` run, alphabetical,
# failed the fault tests after the broker's, e2e's and the gather's in-process CuPy, then hung.
FAULTS_FIRST = "tests/gpu/test_gpu_faults.py"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_available():
        items.sort(key=lambda item: not item.nodeid.startswith(FAULTS_FIRST))  # stable
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class RedisServer:
    """A private redis-server on a free port; `kill()` and `start()` for outage tests."""

    def __init__(self, tmp: str) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", self.tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.kill()


# a process that starts a replica-like child (its command line names services.stage) and a
# plain child, then waits; the plain child burns CPU in a function of its own (`burn_cpu`, for
# tests/test_hostprofile.py's sampler)
PARENT = """
import subprocess, sys, time
burn = (
    "import time\\ndef burn_cpu():\\n    t = time.process_time()\\n"
    "    while time.process_time() - t < 60: pass\\nburn_cpu()"
)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "services.stage",
                  "--pipeline", "p", "--stage", "s"])
subprocess.Popen([sys.executable, "-c", burn])
print("started", flush=True)
time.sleep(60)
"""


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.fixture
def tree_procs():
    root = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    assert root.stdout is not None and root.stdout.readline().strip() == b"started"
    kids = children_of(root.pid)
    try:
        yield root.pid, kids
    finally:
        for pid in kids:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        root.kill()
        root.wait()
        root.stdout.close()
