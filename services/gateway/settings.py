"""Settings of the gateway process, built once in `main()`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import settings as env
from common.lifecycle import TlsFiles


@dataclass(frozen=True)
class GatewaySettings:
    node: str = "local"
    host: str = "127.0.0.1"
    port: int = 50052
    unix_path: str = ""
    broker: str = "unix:/tmp/camelot/broker.sock"
    # where routes come from: a scheduler's Control.WatchRoutes, or none (set by a launcher)
    scheduler: str = ""
    # or a single node's agent (Agent.WatchRoutes), when no scheduler runs
    agent: str = ""
    redis_url: str = ""
    backend: str = "auto"
    size: str = "tiny"
    transport: str = "ref"
    # how stage calls travel: `forward` (the default): a chain's query goes to its first stage
    # only and each stage sends the next one's request on a long-lived stream, the last answering
    # the gateway (services/gateway/forwarding.py; DAGs, `wire` and broker-lease queries as
    # `stream`); `stream`: the gateway calls every stage, many calls in flight on one
    # long-lived stream per replica; `unary`: one unary call each (the design before streams,
    # kept for comparison). Forward measured cheaper on the H200 and on two cores
    # (docs/DATAPLANE.md).
    stage_calls: str = "forward"
    # query buffers from arenas borrowed from the broker (no broker call per query), or one
    # broker lease per query (before arenas, kept for comparison); arena_bytes 0: broker default
    arenas: bool = True
    arena_bytes: int = 0
    pipelines_dir: str = ""
    # deadline when the client gives none: this many times the pipeline's QoS target
    deadline_qos_multiple: float = 10.0
    max_payload_bytes: int = 64 * 1024 * 1024
    max_inflight: int = 4096
    device: int = 0
    metrics_port: int = 0
    grace_s: float = 10.0
    # gateway processes on the port (services.gateway.workers); 1: this process serves; 0 (the
    # default): as many as the host's cores carry (auto_workers)
    workers: int = 0
    # fixed routes, for launchers without a scheduler: (pipeline, stage, replica_id, address)
    static_routes: tuple[tuple[str, str, str, str], ...] = ()
    # mutual TLS on the TCP port (clients then need a certificate of the CA) and to the stages
    # and the scheduler or agent (CAMELOT_TLS_CERT/KEY/CA); Unix sockets stay plain
    tls: TlsFiles | None = None


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    e = os.environ if environ is None else environ
    f = env.Flags(GatewaySettings, "python -m services.gateway", "The Camelot gateway.", e)
    f.add("--node", env="NODE")
    f.add("--host", env="GATEWAY_HOST")
    f.add("--port", env="GATEWAY_PORT")
    f.add("--unix", field="unix_path")
    f.add("--broker", env="BROKER_ADDR")
    f.add("--scheduler", env="SCHEDULER_ADDR")
    f.add("--agent", env="AGENT_ADDR")
    f.add("--redis", field="redis_url", env="REDIS_URL")
    f.add("--backend", env="BACKEND", choices=("auto", "host", "cuda"))
    f.add("--size", env="SIZE", choices=("tiny", "full"))
    f.add("--transport", env="TRANSPORT", choices=("ref", "wire"))
    f.add(
        "--stage-calls",
        env="GATEWAY_STAGE_CALLS",
        choices=("stream", "unary", "forward"),
        help="forward (the default): a chain's stages pass its query on and the last answers; "
        "stream: the gateway calls each stage on a stream per replica; unary: a call each "
        "(docs/DATAPLANE.md)",
    )
    f.add(
        "--arenas",
        field=None,
        env="GATEWAY_ARENAS",
        default="on",
        choices=("on", "off"),
        help="query buffers from arenas borrowed from the broker (on), or a broker lease per "
        "query (off: the design before arenas)",
    )
    f.add("--arena-bytes", env="GATEWAY_ARENA_BYTES")
    f.add("--pipelines-dir", env="PIPELINES_DIR")
    f.add("--deadline-qos-multiple", env="DEADLINE_QOS_MULTIPLE", check="positive")
    f.add("--max-payload-bytes", env="MAX_PAYLOAD_BYTES", check="positive")
    f.add("--max-inflight", env="MAX_INFLIGHT", check="positive")
    f.add("--device")
    f.add("--metrics-port", env="METRICS_PORT")
    f.add(
        "--workers",
        env="GATEWAY_WORKERS",
        check="nonnegative",
        help="gateway processes sharing the port (SO_REUSEPORT; > 1 needs a fixed --port); "
        "0, the default: one per CORES_PER_WORKER cores, at most MAX_AUTO_WORKERS",
    )
    f.add(
        "--routes",
        field=None,
        default="",
        help="fixed routes without a scheduler: pipeline/stage=replica@address,...",
    )
    a = f.parse(argv)
    try:
        static = parse_routes(a.routes)
    except ValueError as err:
        f.parser.error(str(err))
    if a.workers > 1 and (a.port == 0 or a.unix):
        f.parser.error("--workers > 1 needs a fixed --port and no --unix (the workers share it)")
    if a.workers == 0:
        a.workers = auto_workers(os.cpu_count() or 1, shared_port=a.port != 0 and not a.unix)
    return f.settings(a, static_routes=static, arenas=a.arenas == "on", tls=TlsFiles.from_env(e))


# One gateway worker spent 1.4-2.2 CPU-ms per query on the H200 host (docs/DATAPLANE.md), so
# one core carries ~500-700 queries/s; a worker per three cores leaves the rest to the stages,
# the broker and the scheduler, which the same runs needed about as much.
CORES_PER_WORKER = 3
MAX_AUTO_WORKERS = 8


def auto_workers(cpus: int, shared_port: bool) -> int:
    """Workers for a host of `cpus` cores: one per CORES_PER_WORKER, 1 to MAX_AUTO_WORKERS; 1
    when the port cannot be shared (port 0 or a Unix socket)."""
    if not shared_port:
        return 1
    return max(1, min(MAX_AUTO_WORKERS, cpus // CORES_PER_WORKER))


def parse_routes(spec: str) -> tuple[tuple[str, str, str, str], ...]:
    """`pipeline/stage=replica@address,...` into entries; ValueError names the bad one."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        key, _, rest = entry.partition("=")
        pipeline, _, stage = key.partition("/")
        replica, _, address = rest.partition("@")
        if not (pipeline and stage and replica and address):
            raise ValueError(f"route {entry!r} is not pipeline/stage=replica@address")
        out.append((pipeline, stage, replica, address))
    return tuple(out)
