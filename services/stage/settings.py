"""Settings of one stage replica process, built once in `main()`."""

from __future__ import annotations

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
    cuda_graphs: bool = True
    # mutual TLS on the TCP port (CAMELOT_TLS_CERT/KEY/CA), for gateways on other nodes
    tls: TlsFiles | None = None

    @property
    def name(self) -> str:
        return self.replica_id or f"{self.pipeline}.{self.stage}"


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> StageSettings:
    e = os.environ if environ is None else environ
    f = env.Flags(StageSettings, "python -m services.stage", "One stage replica.", e)
    f.add("--pipeline", required=True)
    f.add("--stage", required=True)
    f.add("--size", env="SIZE", choices=("tiny", "full"))
    f.add("--replica-id")
    f.add("--node", env="NODE")
    f.add("--host")
    f.add("--port")
    f.add("--unix", field="unix_path", help="also listen on this Unix socket")
    f.add("--broker", env="BROKER_ADDR")
    f.add("--redis", field="redis_url", env="REDIS_URL")
    f.add("--backend", env="BACKEND", choices=("auto", "host", "cuda"))
    f.add("--max-batch")
    f.add("--max-wait-us")
    f.add("--sm-percent")
    f.add(
        "--sm-groups", field=None, default="", help="comma-separated SM group indices (green mode)"
    )
    f.add("--device")
    f.add("--metrics-port")
    f.add("--max-queue", env="MAX_QUEUE", check="positive")
    f.add("--pipelines-dir", env="PIPELINES_DIR")
    f.add("--seed")
    f.add(
        "--cuda-graphs",
        field=None,
        env="CUDA_GRAPHS",
        default="on",
        choices=("on", "off"),
        help="replay graph-safe models as CUDA graphs (cuda backend, MPS mode; the default: "
        "docs/results/graphs.md)",
    )
    a = f.parse(argv)
    try:
        groups = tuple(int(g) for g in a.sm_groups.split(",") if g.strip())
    except ValueError:
        f.parser.error(f"--sm-groups {a.sm_groups!r} is not a comma-separated list of integers")
    if not 0 < a.sm_percent <= 100:
        f.parser.error(f"--sm-percent must be in (0, 100], got {a.sm_percent}")
    return f.settings(
        a, sm_groups=groups, cuda_graphs=a.cuda_graphs == "on", tls=TlsFiles.from_env(e)
    )
