"""A real local mesh for tests: broker, replicas and gateway as processes on the host backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.pipeline_config import load_pipeline
from services.launcher import Mesh, Proc, free_port, wait_healthy


@dataclass
class TestMesh:
    mesh: Mesh
    broker: str = ""
    broker_tcp: str = ""
    gateway: str = ""
    replicas: dict[str, Proc] = field(default_factory=dict)


async def start(
    run_dir: Path,
    pipelines: dict[str, int],
    redis_url: str = "",
    gateway_args: tuple[str, ...] = (),
    backend: str = "host",
    size: str = "tiny",
    stage_args: tuple[str, ...] = (),
    pipelines_dir: str = "",
) -> TestMesh:
    """pipelines: name -> replicas per stage. Everything on `backend` at `size` (host and tiny
    by default); `stage_args` go to every replica; configs from `pipelines_dir` (default: the
    bundled ones)."""
    where = ("--pipelines-dir", pipelines_dir) if pipelines_dir else ()
    mesh = Mesh(run_dir)
    tm = TestMesh(mesh)
    sock = str(run_dir / "broker.sock")
    port = free_port()
    broker = mesh.python(
        "broker",
        "shmbroker",
        [
            "--port",
            str(port),
            "--socket",
            sock,
            "--backend",
            backend,
            "--slab-bytes",
            str(64 << 20),
        ],  # fmt: skip
    )
    await wait_healthy(f"127.0.0.1:{port}", 30, broker)
    tm.broker, tm.broker_tcp = f"unix:{sock}", f"127.0.0.1:{port}"
    routes = []
    for name, n in pipelines.items():
        for stage in load_pipeline(name, size, pipelines_dir or None).stages:
            for i in range(n):
                rid = f"{name}.{stage.name}.{i}"
                rsock = str(run_dir / f"{rid}.sock")
                args = ["--pipeline", name, "--stage", stage.name, "--replica-id", rid,
                        "--unix", rsock, "--broker", tm.broker, "--backend", backend,
                        "--size", size, *where, *stage_args]  # fmt: skip
                if redis_url:
                    args += ["--redis", redis_url]
                proc = mesh.python(rid, "services.stage", args)
                proc.target = f"unix:{rsock}"
                tm.replicas[rid] = proc
                routes.append(f"{name}/{stage.name}={rid}@{proc.target}")
    for proc in tm.replicas.values():
        await wait_healthy(proc.target, 60, proc)
    gw_port = free_port()
    args = ["--port", str(gw_port), "--broker", tm.broker, "--backend", backend, "--size", size,
            "--routes", ",".join(routes), *where, *gateway_args]  # fmt: skip
    if redis_url:
        args += ["--redis", redis_url]
    gateway = mesh.python("gateway", "services.gateway", args)
    await wait_healthy(f"127.0.0.1:{gw_port}", 30, gateway)
    tm.gateway = f"127.0.0.1:{gw_port}"
    return tm
