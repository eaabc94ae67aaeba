"""A gRPC health probe for container health checks: `python -m common.healthcheck TARGET`.

Asks the standard `grpc.health.v1.Health/Check` of TARGET ("host:port" or "unix:/path") and
exits 0 when the answer is SERVING, 1 for any other answer or when the server cannot be reached
within the timeout, 2 for bad arguments. Docker, Compose and exec probes read only the exit code;
the one line on stderr says why a check failed. With CAMELOT_TLS_CERT, CAMELOT_TLS_KEY and
CAMELOT_TLS_CA set (as the probed process has them) a TCP target is asked over mutual TLS.

Stands in for `grpc_health_probe`, which is not in the image: the venv already has grpcio and
grpcio-health-checking, so the probe costs no extra dependency.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.lifecycle import TlsFiles
from common.settings import SettingsError

OK = 0
UNHEALTHY = 1


def check(
    target: str, service: str = "", timeout_s: float = 3.0, tls: TlsFiles | None = None
) -> tuple[bool, str]:
    """(True, "SERVING") when TARGET's health service says SERVING; else (False, the reason).
    tls: mutual TLS to a TCP target."""
    if tls is not None and not target.startswith("unix:"):
        chan = grpc.secure_channel(target, tls.channel_credentials())
    else:
        chan = grpc.insecure_channel(target)
    with chan:
        stub = health_pb2_grpc.HealthStub(chan)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            name = code.name if code is not None else "UNKNOWN"
            return False, f"{name}: {e.details() if isinstance(e, grpc.Call) else e}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m common.healthcheck",
        description="Exit 0 when a gRPC server's health service answers SERVING.",
    )
    p.add_argument("target", help='gRPC target, "host:port" or "unix:/path"')
    p.add_argument("--service", default="", help="service name to check (default: the server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")
    a = p.parse_args(argv)
    if a.timeout <= 0:
        p.error(f"--timeout must be > 0, got {a.timeout}")
    try:
        tls = TlsFiles.from_env()
    except SettingsError as e:
        p.error(str(e))
    healthy, why = check(a.target, a.service, a.timeout, tls)
    if not healthy:
        print(f"unhealthy: {a.target}: {why}", file=sys.stderr)
        return UNHEALTHY
    return OK


if __name__ == "__main__":
    sys.exit(main())
