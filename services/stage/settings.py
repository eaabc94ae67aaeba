"""Settings of one stage replica process, built once in `main()`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import settings as env
from common.lifecycle import TlsFiles


@dataclass(frozen=True)
class StageSettings:
    pipeline: str
    stage: str
    size: str = "tiny"
    replica_id: str = ""
    node: str = "local"
    host: str = "127.0.0.1"
    port: int = 0
    unix_path: str = ""
    broker: str = "unix:/tmp/camelot/broker.sock"
    redis_url: str = ""
    backend: str = "auto"
    # 0 means the pipeline config's value
    max_batch: int = 0
    max_wait_us: int = -1
    sm_percent: float = 100.0
    sm_groups: tuple[int, ...] = ()
    device: int = 0
    metrics_port: int = 0
    max_queue: int = 1024
    grace_s: float = 10.0
    pipelines_dir: str = ""
    seed: int = 0
    # CUDA graphs for graph-safe models. Off by default until the captured decoder has been
    # measured on a GPU (docs/results/graphs.md); never in green mode (a graph is captured per
    # stream, and a resize would pay a capture per batch bucket on the new slice's stream)
    cuda_graphs: bool = False
    # mutual TLS on the TCP port (CAMELOT_TLS_CERT/KEY/CA), for gateways on other nodes
    tls: TlsFiles | None = None

    @property
    def name(self) -> str:
        return self.replica_id or f"{self.pipeline}.{self.stage}"


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> StageSettings:
    e = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m services.stage", description="One stage replica.")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--size", default=env.env_str("SIZE", "tiny", e), choices=("tiny", "full"))
    p.add_argument("--replica-id", default="")
    p.add_argument("--node", default=env.env_str("NODE", "local", e))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--unix", default="", help="also listen on this Unix socket")
    p.add_argument(
        "--broker", default=env.env_str("BROKER_ADDR", "unix:/tmp/camelot/broker.sock", e)
    )
    p.add_argument("--redis", default=env.env_str("REDIS_URL", "", e))
    p.add_argument(
        "--backend", default=env.env_str("BACKEND", "auto", e), choices=("auto", "host", "cuda")
    )
    p.add_argument("--max-batch", type=int, default=0)
    p.add_argument("--max-wait-us", type=int, default=-1)
    p.add_argument("--sm-percent", type=float, default=100.0)
    p.add_argument("--sm-groups", default="", help="comma-separated SM group indices (green mode)")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--max-queue", type=int, default=env.env_int("MAX_QUEUE", 1024, e))
    p.add_argument("--pipelines-dir", default=env.env_str("PIPELINES_DIR", "", e))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cuda-graphs",
        default=env.env_str("CUDA_GRAPHS", "off", e),
        choices=("on", "off"),
        help="replay graph-safe models as CUDA graphs (cuda backend, MPS mode)",
    )
    a = p.parse_args(argv)
    try:
        groups = tuple(int(g) for g in a.sm_groups.split(",") if g.strip())
    except ValueError:
        p.error(f"--sm-groups {a.sm_groups!r} is not a comma-separated list of integers")
    if not 0 < a.sm_percent <= 100:
        p.error(f"--sm-percent must be in (0, 100], got {a.sm_percent}")
    if a.max_queue <= 0:
        p.error(f"--max-queue must be > 0, got {a.max_queue}")
    return StageSettings(
        pipeline=a.pipeline,
        stage=a.stage,
        size=a.size,
        replica_id=a.replica_id,
        node=a.node,
        host=a.host,
        port=a.port,
        unix_path=a.unix,
        broker=a.broker,
        redis_url=a.redis,
        backend=a.backend,
        max_batch=a.max_batch,
        max_wait_us=a.max_wait_us,
        sm_percent=a.sm_percent,
        sm_groups=groups,
        device=a.device,
        metrics_port=a.metrics_port,
        max_queue=a.max_queue,
        pipelines_dir=a.pipelines_dir,
        seed=a.seed,
        cuda_graphs=a.cuda_graphs == "on",
        tls=TlsFiles.from_env(e),
    )
