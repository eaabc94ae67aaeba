"""`python -m common.healthcheck`, the containers' health check, against a real gRPC server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.healthcheck import check
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


class Served:
    def __init__(self, tmp: Path) -> None:
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.unix = f"unix:{tmp / 'health.sock'}"
        self.server.add_insecure_port(self.unix)

    def set(self, status: int, service: str = "") -> None:
        self.servicer.set(service, status)  # type: ignore[arg-type]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    s.server.start()
    yield s
    s.server.stop(None).wait()


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.healthcheck", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_exit_code_follows_the_serving_status(served: Served) -> None:
    target = f"127.0.0.1:{served.port}"
    served.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    proc = probe(target)
    assert proc.returncode == 1
    assert "NOT_SERVING" in proc.stderr
    served.set(health_pb2.HealthCheckResponse.SERVING)
    assert probe(target).returncode == 0


def test_unix_socket_target_and_named_service(served: Served) -> None:
    served.set(health_pb2.HealthCheckResponse.SERVING)
    served.set(health_pb2.HealthCheckResponse.NOT_SERVING, "camelot.v1.Broker")
    assert check(served.unix) == (True, "SERVING")
    healthy, why = check(served.unix, "camelot.v1.Broker")
    assert not healthy and why == "NOT_SERVING"
    healthy, why = check(served.unix, "camelot.v1.Nope")
    assert not healthy and why.startswith("NOT_FOUND")


def test_nothing_listening_is_unhealthy_within_the_timeout() -> None:
    healthy, why = check(f"127.0.0.1:{free_port()}", timeout_s=0.5)
    assert not healthy
    assert why.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))


def test_bad_arguments_exit_2() -> None:
    proc = probe("127.0.0.1:1", "--timeout", "0")
    assert proc.returncode == 2
    assert "--timeout" in proc.stderr
