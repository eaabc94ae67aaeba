"""A real local mesh for tests: broker, replicas and gateway as processes on the host backend
(`services.localmesh.start_static`: the gateway on fixed routes, no scheduler, no agent)."""

from __future__ import annotations

from pathlib import Path

from services.launcher import Mesh
from services.localmesh import LocalMesh, start_static

# what `start` returns: `mesh` (stop_all), `broker`, `broker_tcp`, `gateway`, `replicas`
TestMesh = LocalMesh


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
    return await start_static(
        LocalMesh(Mesh(run_dir)), pipelines, backend, size, redis_url, pipelines_dir, stage_args,
        gateway_args,
    )  # fmt: skip
