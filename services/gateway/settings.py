"""Settings of the gateway process, built once in `main()`."""

from __future__ import annotations

import argparse
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
    pipelines_dir: str = ""
    # deadline when the client gives none: this many times the pipeline's QoS target
    deadline_qos_multiple: float = 10.0
    max_payload_bytes: int = 64 * 1024 * 1024
    max_inflight: int = 4096
    device: int = 0
    metrics_port: int = 0
    grace_s: float = 10.0
    # fixed routes, for launchers without a scheduler: (pipeline, stage, replica_id, address)
    static_routes: tuple[tuple[str, str, str, str], ...] = ()
    # mutual TLS for hops that leave the node (CAMELOT_TLS_CERT/KEY/CA); Unix sockets stay plain
    tls: TlsFiles | None = None


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GatewaySettings:
    e = os.environ if environ is None else environ
    d = GatewaySettings()
    p = argparse.ArgumentParser(
        prog="python -m services.gateway", description="The Camelot gateway."
    )
    p.add_argument("--node", default=env.env_str("NODE", d.node, e))
    p.add_argument("--host", default=env.env_str("GATEWAY_HOST", d.host, e))
    p.add_argument("--port", type=int, default=env.env_int("GATEWAY_PORT", d.port, e))
    p.add_argument("--unix", default="")
    p.add_argument("--broker", default=env.env_str("BROKER_ADDR", d.broker, e))
    p.add_argument("--scheduler", default=env.env_str("SCHEDULER_ADDR", d.scheduler, e))
    p.add_argument("--agent", default=env.env_str("AGENT_ADDR", d.agent, e))
    p.add_argument("--redis", default=env.env_str("REDIS_URL", d.redis_url, e))
    p.add_argument(
        "--backend", default=env.env_choice("BACKEND", d.backend, ("auto", "host", "cuda"), e)
    )
    p.add_argument("--size", default=env.env_choice("SIZE", d.size, ("tiny", "full"), e))
    p.add_argument(
        "--transport", default=env.env_choice("TRANSPORT", d.transport, ("ref", "wire"), e)
    )
    p.add_argument("--pipelines-dir", default=env.env_str("PIPELINES_DIR", "", e))
    p.add_argument(
        "--deadline-qos-multiple",
        type=float,
        default=env.env_float("DEADLINE_QOS_MULTIPLE", d.deadline_qos_multiple, e),
    )
    p.add_argument(
        "--max-payload-bytes",
        type=int,
        default=env.env_int("MAX_PAYLOAD_BYTES", d.max_payload_bytes, e),
    )
    p.add_argument(
        "--max-inflight", type=int, default=env.env_int("MAX_INFLIGHT", d.max_inflight, e)
    )
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--metrics-port", type=int, default=env.env_int("METRICS_PORT", 0, e))
    p.add_argument(
        "--routes",
        default="",
        help="fixed routes without a scheduler: pipeline/stage=replica@address,...",
    )
    a = p.parse_args(argv)
    try:
        static = parse_routes(a.routes)
    except ValueError as err:
        p.error(str(err))
    for name in ("deadline_qos_multiple", "max_payload_bytes", "max_inflight"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    return GatewaySettings(
        node=a.node,
        host=a.host,
        port=a.port,
        unix_path=a.unix,
        broker=a.broker,
        scheduler=a.scheduler,
        agent=a.agent,
        redis_url=a.redis,
        backend=a.backend,
        size=a.size,
        transport=a.transport,
        pipelines_dir=a.pipelines_dir,
        deadline_qos_multiple=a.deadline_qos_multiple,
        max_payload_bytes=a.max_payload_bytes,
        max_inflight=a.max_inflight,
        device=a.device,
        metrics_port=a.metrics_port,
        static_routes=static,
        tls=TlsFiles.from_env(e),
    )


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
