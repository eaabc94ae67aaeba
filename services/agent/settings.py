"""Settings of the node agent, built once in `main()` from flags and `CAMELOT_*` variables."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import settings as env
from common.lifecycle import TlsFiles

# The replica process; `{name}` fields are filled per replica (see `replicas.render_command`).
DEFAULT_REPLICA_COMMAND: tuple[str, ...] = (
    "{python}", "-m", "services.stage",
    "--pipeline", "{pipeline}", "--stage", "{stage}", "--size", "{size}",
    "--replica-id", "{replica_id}", "--unix", "{unix}",
    "--broker", "{broker}", "--redis", "{redis}", "--backend", "{backend}",
    "--max-batch", "{max_batch}", "--max-wait-us", "{max_wait_us}",
    "--sm-percent", "{sm_percent}", "--sm-groups", "{sm_groups}",
    "--device", "{device}", "--metrics-port", "{metrics_port}", "--node", "{node}",
)  # fmt: skip

SHARE_MODES = ("mps", "green", "none")
MPS_MODES = ("manage", "external", "off")


@dataclass(frozen=True)
class AgentSettings:
    node: str = "local"
    host: str = "127.0.0.1"
    port: int = 50054
    broker_addr: str = "unix:/tmp/camelot/broker.sock"
    # empty: no scheduler (Apply RPCs and WatchRoutes only)
    scheduler_addr: str = ""
    redis_url: str = ""
    # auto | host | cuda; resolved at start (NVML decides auto)
    backend: str = "auto"
    share_mode: str = "mps"
    mps: str = "manage"
    mps_pipe_dir: str = "/tmp/nvidia-mps"
    # empty: <run_dir>/mps-log
    mps_log_dir: str = ""
    run_dir: str = "/tmp/camelot"
    size: str = "tiny"
    metrics_port: int = 0
    # > 0: replica slot i serves its metrics on base + i
    replica_metrics_base: int = 0
    replica_command: tuple[str, ...] = DEFAULT_REPLICA_COMMAND
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 2.0
    # how long a new replica may take to load its model and warm up
    ready_timeout_s: float = 180.0
    # how long gateways get to see a DRAINING route before the replica stops taking requests
    shift_s: float = 0.5
    drain_timeout_s: float = 30.0
    # SIGTERM to SIGKILL
    kill_grace_s: float = 10.0
    restart_backoff_s: float = 0.5
    restart_backoff_cap_s: float = 30.0
    grace_s: float = 5.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def mps_log_path(self) -> str:
        return self.mps_log_dir or os.path.join(self.run_dir, "mps-log")

    # mutual TLS on the TCP port and to the scheduler (CAMELOT_TLS_CERT/KEY/CA)
    tls: TlsFiles | None = None


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AgentSettings:
    e = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m services.agent", description="The node agent.")
    p.add_argument("--node", default=env.env_str("NODE", socket.gethostname(), e))
    p.add_argument("--host", default=env.env_str("AGENT_HOST", "127.0.0.1", e))
    p.add_argument("--port", type=int, default=env.env_int("AGENT_PORT", 50054, e))
    p.add_argument(
        "--broker", default=env.env_str("BROKER_ADDR", "unix:/tmp/camelot/broker.sock", e)
    )
    p.add_argument("--scheduler", default=env.env_str("SCHEDULER_ADDR", "", e))
    p.add_argument("--redis", default=env.env_str("REDIS_URL", "", e))
    p.add_argument(
        "--backend",
        default=env.env_choice("BACKEND", "auto", ("auto", "host", "cuda"), e),
        choices=("auto", "host", "cuda"),
    )
    p.add_argument(
        "--share-mode",
        default=env.env_choice("SHARE_MODE", "mps", SHARE_MODES, e),
        choices=SHARE_MODES,
    )
    p.add_argument(
        "--mps", default=env.env_choice("MPS", "manage", MPS_MODES, e), choices=MPS_MODES
    )
    p.add_argument("--mps-pipe-dir", default=env.env_str("MPS_PIPE_DIR", "/tmp/nvidia-mps", e))
    p.add_argument("--mps-log-dir", default=env.env_str("MPS_LOG_DIR", "", e))
    p.add_argument("--run-dir", default=env.env_str("RUN_DIR", "/tmp/camelot", e))
    p.add_argument(
        "--size",
        default=env.env_choice("SIZE", "tiny", ("tiny", "full"), e),
        choices=("tiny", "full"),
    )
    p.add_argument("--metrics-port", type=int, default=env.env_int("METRICS_PORT", 0, e))
    p.add_argument(
        "--replica-metrics-base", type=int, default=env.env_int("REPLICA_METRICS_BASE", 0, e)
    )
    p.add_argument(
        "--replica-command",
        default=env.env_str("REPLICA_COMMAND", "", e),
        help="replica command line template (shell words with {fields}); default: services.stage",
    )
    p.add_argument("--heartbeat-s", type=float, default=env.env_float("HEARTBEAT_S", 1.0, e))
    p.add_argument(
        "--ready-timeout-s", type=float, default=env.env_float("READY_TIMEOUT_S", 180, e)
    )
    p.add_argument("--shift-s", type=float, default=env.env_float("SHIFT_S", 0.5, e))
    p.add_argument("--drain-timeout-s", type=float, default=env.env_float("DRAIN_TIMEOUT_S", 30, e))
    a = p.parse_args(argv)
    for name in ("heartbeat_s", "ready_timeout_s", "drain_timeout_s"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.shift_s < 0:
        p.error(f"--shift-s must be >= 0, got {a.shift_s}")
    command = (
        tuple(shlex.split(a.replica_command)) if a.replica_command else DEFAULT_REPLICA_COMMAND
    )
    return AgentSettings(
        tls=TlsFiles.from_env(e),
        node=a.node,
        host=a.host,
        port=a.port,
        broker_addr=a.broker,
        scheduler_addr=a.scheduler,
        redis_url=a.redis,
        backend=a.backend,
        share_mode=a.share_mode,
        mps=a.mps,
        mps_pipe_dir=a.mps_pipe_dir,
        mps_log_dir=a.mps_log_dir,
        run_dir=a.run_dir,
        size=a.size,
        metrics_port=a.metrics_port,
        replica_metrics_base=a.replica_metrics_base,
        replica_command=command,
        heartbeat_s=a.heartbeat_s,
        ready_timeout_s=a.ready_timeout_s,
        shift_s=a.shift_s,
        drain_timeout_s=a.drain_timeout_s,
    )


def python() -> str:
    """The interpreter replicas run under: this one (the same virtualenv)."""
    return sys.executable
