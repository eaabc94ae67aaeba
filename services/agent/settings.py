"""Settings of the node agent, built once in `main()` from flags and `CAMELOT_*` variables."""

from __future__ import annotations

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
    f = env.Flags(AgentSettings, "python -m services.agent", "The node agent.", e)
    f.add("--node", env="NODE", default=socket.gethostname())
    f.add("--host", env="AGENT_HOST")
    f.add("--port", env="AGENT_PORT")
    f.add("--broker", field="broker_addr", env="BROKER_ADDR")
    f.add("--scheduler", field="scheduler_addr", env="SCHEDULER_ADDR")
    f.add("--redis", field="redis_url", env="REDIS_URL")
    f.add("--backend", env="BACKEND", choices=("auto", "host", "cuda"))
    f.add("--share-mode", env="SHARE_MODE", choices=SHARE_MODES)
    f.add("--mps", env="MPS", choices=MPS_MODES)
    f.add("--mps-pipe-dir", env="MPS_PIPE_DIR")
    f.add("--mps-log-dir", env="MPS_LOG_DIR")
    f.add("--run-dir", env="RUN_DIR")
    f.add("--size", env="SIZE", choices=("tiny", "full"))
    f.add("--metrics-port", env="METRICS_PORT")
    f.add("--replica-metrics-base", env="REPLICA_METRICS_BASE")
    f.add(
        "--replica-command",
        field=None,
        env="REPLICA_COMMAND",
        default="",
        help="replica command line template (shell words with {fields}); default: services.stage",
    )
    f.add("--heartbeat-s", env="HEARTBEAT_S", check="positive")
    f.add("--ready-timeout-s", env="READY_TIMEOUT_S", check="positive")
    f.add("--shift-s", env="SHIFT_S", check="nonnegative")
    f.add("--drain-timeout-s", env="DRAIN_TIMEOUT_S", check="positive")
    a = f.parse(argv)
    command = (
        tuple(shlex.split(a.replica_command)) if a.replica_command else DEFAULT_REPLICA_COMMAND
    )
    return f.settings(a, replica_command=command, tls=TlsFiles.from_env(e))


def python() -> str:
    """The interpreter replicas run under: this one (the same virtualenv)."""
    return sys.executable
