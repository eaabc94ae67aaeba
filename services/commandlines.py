"""The command line of each process of a local mesh, spelled once.

Whoever starts a process (the local mesh, the fault harness restarting one it killed) takes
its command from here: `python -m <package>` with the flags that package's settings parse
(tests/test_commandlines.py holds each against its parser). A flag left at its empty value is
not written, so the process takes its `CAMELOT_*` variable, else its default, as when started
by hand. The scheduler's is here too, not in its package: services never import the scheduler.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping


def python(module: str, *flags: tuple[str, object]) -> list[str]:
    """`python -m module` with each (flag, value) whose value is not empty ("" or 0)."""
    argv = [sys.executable, "-m", module]
    for flag, value in flags:
        if value not in ("", 0):
            argv += [flag, str(value)]
    return argv


def redis(port: int, directory: str) -> list[str]:
    """A private redis-server: no snapshot, no append-only file (its data is the mesh's)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(
            "redis-server not found: install it (apt-get install redis-server) "
            "or point CAMELOT_REDIS_URL at an existing one"
        )
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", directory]  # fmt: skip


def broker(port: int, socket_path: str, backend: str, slab_bytes: int = 0) -> list[str]:
    """`python -m shmbroker`; slab_bytes 0: the backend's default."""
    return python("shmbroker", ("--port", port), ("--socket", socket_path),
                  ("--backend", backend), ("--slab-bytes", slab_bytes))  # fmt: skip


def scheduler(
    port: int, redis_url: str, policy: str, size: str, options: Mapping[str, str] | None = None
) -> list[str]:
    """`python -m scheduler`, with the policy's options (`--option key=value`)."""
    argv = python("scheduler", ("--port", port), ("--redis", redis_url), ("--policy", policy))
    for key, value in (options or {}).items():
        argv += ["--option", f"{key}={value}"]
    return argv + ["--size", size]


def agent(
    port: int,
    broker: str,
    scheduler: str,
    redis_url: str,
    backend: str,
    share_mode: str,
    mps: str,
    run_dir: str,
    size: str,
    node: str = "local",
) -> list[str]:
    """`python -m services.agent`: the node agent, which starts the stage replicas itself."""
    return python("services.agent", ("--node", node), ("--port", port), ("--broker", broker),
                  ("--scheduler", scheduler), ("--redis", redis_url), ("--backend", backend),
                  ("--share-mode", share_mode), ("--mps", mps), ("--run-dir", run_dir),
                  ("--size", size))  # fmt: skip


def gateway(
    port: int,
    broker: str,
    backend: str,
    size: str,
    scheduler: str = "",
    redis_url: str = "",
    routes: str = "",
    pipelines_dir: str = "",
) -> list[str]:
    """`python -m services.gateway`: routes from the scheduler, or fixed `routes` without one."""
    return python("services.gateway", ("--port", port), ("--broker", broker),
                  ("--redis", redis_url), ("--scheduler", scheduler), ("--backend", backend),
                  ("--size", size), ("--routes", routes),
                  ("--pipelines-dir", pipelines_dir))  # fmt: skip


def stage(
    pipeline: str,
    stage: str,
    replica_id: str,
    unix: str,
    broker: str,
    backend: str,
    size: str,
    redis_url: str = "",
    pipelines_dir: str = "",
) -> list[str]:
    """`python -m services.stage`: one replica, serving on a Unix socket (the agent's replicas
    are started from its own template: services.agent.settings.DEFAULT_REPLICA_COMMAND)."""
    return python("services.stage", ("--pipeline", pipeline), ("--stage", stage),
                  ("--replica-id", replica_id), ("--unix", unix), ("--broker", broker),
                  ("--backend", backend), ("--size", size), ("--pipelines-dir", pipelines_dir),
                  ("--redis", redis_url))  # fmt: skip
