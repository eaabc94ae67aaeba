"""One way to start a local mesh: its processes, ports, run directory, readiness and teardown.

Two shapes of mesh, one set of parts:

    planned   redis, broker, scheduler, agent, gateway: the agent starts the replicas the
              scheduler's plan asks for, the gateway follows the scheduler's routes
              (`start_planned`; `start_mesh` as `camelot run` and the benches use it)
    static    broker, stage replicas and a gateway on fixed routes, no control plane
              (`start_static`: tests of the data path)

Each process is started from its command line (`services.commandlines`) and kept as a `Spec`
with its environment and the target its health is polled on, so a process that was killed
starts again as it was, on the same port (`LocalMesh.restart`, for the fault harness). Ports
are chosen once, at start. The run directory holds `logs/`, the broker's socket, the admin
token and the static replicas' sockets; the `Mesh` under it stops every process in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from common import lifecycle
from common.dtypes import to_numpy, wire_from_array
from common.errors import InvalidArgument
from contract.pipeline_config import config_path, list_pipelines, load_pipeline
from protos import gateway_pb2, gateway_pb2_grpc
from services import commandlines
from services.launcher import Mesh, Proc, free_port, wait_healthy

# how long any process may take to serve after it starts (an agent or a gateway on a loaded
# machine imports the most); a process that exits first fails at once
READY_TIMEOUT_S = 120.0
# a static mesh's broker: four slabs of 64 MiB are plenty for tiny models
STATIC_SLAB_BYTES = 64 << 20


def _quiet(message: str) -> None:
    pass


@dataclass
class Spec:
    """How to (re)start one process of the mesh and how to tell it serves."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health: str  # a gRPC target, or "tcp:<host>:<port>" (redis has no gRPC health)


@dataclass
class LocalMesh:
    """A live local mesh: its processes by name and the addresses it serves on."""

    mesh: Mesh
    # told each process as it starts and once it serves
    say: Callable[[str], None] = _quiet
    specs: dict[str, Spec] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    broker: str = ""  # the broker's Unix socket, as processes of this node reach it
    broker_tcp: str = ""
    scheduler: str = ""
    agent: str = ""
    gateway: str = ""
    redis_url: str = ""
    token_file: str = ""
    # a static mesh's stage replicas by replica id (a planned mesh's are the agent's)
    replicas: dict[str, Proc] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.mesh.run_dir

    def spawn(self, spec: Spec) -> Proc:
        """Starts `spec`'s process and keeps it by name, without waiting for it to serve."""
        proc = self.mesh.spawn(spec.name, spec.argv, spec.env)
        self.specs[spec.name] = spec
        self.procs[spec.name] = proc
        return proc

    async def start(self, spec: Spec) -> Proc:
        """Starts `spec` and returns once it serves (RuntimeError if it exits first)."""
        t0 = time.monotonic()
        proc = self.spawn(spec)
        self.say(f"camelot: {proc.name} starting (pid {proc.pid})")
        await wait_up(spec.health, READY_TIMEOUT_S, proc)
        where = spec.health.removeprefix("tcp:")
        self.say(f"camelot: {proc.name} serving on {where} after {time.monotonic() - t0:.1f} s")
        return proc

    async def restart(self, name: str) -> Proc:
        """Starts `name` again with its first command line (a supervisor's restart)."""
        return await self.start(self.specs[name])

    def kill(self, name: str) -> int:
        """SIGKILL to `name`, reaped; its pid. The mesh no longer stops it."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()
        self.mesh.procs.remove(proc)
        return proc.pid

    async def stop(self, grace_s: float = 15.0) -> None:
        """Stops every process it started, in reverse order."""
        await self.mesh.stop_all(grace_s)

    def info(self) -> dict[str, Any]:
        """The addresses `start_mesh` returns (and `camelot run --serve` records)."""
        return {"gateway": self.gateway, "scheduler": self.scheduler, "redis": self.redis_url,
                "broker": self.broker, "token_file": self.token_file,
                "agent": self.agent}  # fmt: skip


async def wait_up(target: str, timeout_s: float, proc: Proc | None = None) -> None:
    """Until `target` serves: gRPC health, or a TCP connection for "tcp:<host>:<port>"."""
    if not target.startswith("tcp:"):
        await wait_healthy(target, timeout_s, proc)
        return
    host, _, port = target.removeprefix("tcp:").rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and not proc.alive():
            code = proc.popen.returncode
            raise RuntimeError(f"{proc.name} exited with {code} before serving:\n{proc.tail()}")
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not open after {timeout_s:.0f} s") from None
            await asyncio.sleep(0.05)


def admin_token(run_dir: Path) -> Path:
    """The run directory's admin token file, made (owner-only) where there is none yet."""
    token_file = run_dir / "admin.token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(16))
        token_file.chmod(0o600)
    return token_file


async def start_broker(lm: LocalMesh, backend: str, slab_bytes: int = 0) -> None:
    sock = str(lm.run_dir / "broker.sock")
    port = free_port()
    lm.broker, lm.broker_tcp = f"unix:{sock}", f"127.0.0.1:{port}"
    await lm.start(
        Spec("broker", commandlines.broker(port, sock, backend, slab_bytes), {}, lm.broker_tcp)
    )


async def start_planned(
    lm: LocalMesh,
    backend: str,
    size: str,
    policy: str = "even",
    policy_options: Mapping[str, str] | None = None,
    share_mode: str = "none",
    mps: str = "off",
    redis_url: str = "",
    gateway_port: int = 0,
    slab_bytes: int = 0,
    pipelines_dir: str = "",
) -> LocalMesh:
    """Starts redis (unless `redis_url` names one), broker, scheduler, agent and gateway in
    `lm`; returns it once each serves (the plan's replicas start after: `wait_routed`). The
    scheduler, agent and gateway share the admin token file, redis and `pipelines_dir`."""
    mesh = lm.mesh
    if not redis_url:
        port = free_port()
        redis_url = f"redis://127.0.0.1:{port}/0"
        argv = commandlines.redis(port, str(mesh.run_dir))
        await lm.start(Spec("redis", argv, {}, f"tcp:127.0.0.1:{port}"))
    lm.redis_url = redis_url
    lm.token_file = str(admin_token(mesh.run_dir))
    env = {"CAMELOT_ADMIN_TOKEN_FILE": lm.token_file, "CAMELOT_REDIS_URL": redis_url}
    if pipelines_dir:
        env["CAMELOT_PIPELINES_DIR"] = pipelines_dir
    await start_broker(lm, backend, slab_bytes)
    port = free_port()
    lm.scheduler = f"127.0.0.1:{port}"
    argv = commandlines.scheduler(port, redis_url, policy, size, policy_options)
    await lm.start(Spec("scheduler", argv, env, lm.scheduler))
    port = free_port()
    lm.agent = f"127.0.0.1:{port}"
    argv = commandlines.agent(port, lm.broker, lm.scheduler, redis_url, backend, share_mode, mps,
                              str(mesh.run_dir), size)  # fmt: skip
    await lm.start(Spec("agent", argv, env, lm.agent))
    port = gateway_port or free_port()
    lm.gateway = f"127.0.0.1:{port}"
    argv = commandlines.gateway(port, lm.broker, backend, size, lm.scheduler, redis_url)
    await lm.start(Spec("gateway", argv, env, lm.gateway))
    return lm


async def start_static(
    lm: LocalMesh,
    pipelines: Mapping[str, int],
    backend: str = "host",
    size: str = "tiny",
    redis_url: str = "",
    pipelines_dir: str = "",
    stage_args: tuple[str, ...] = (),
    gateway_args: tuple[str, ...] = (),
) -> LocalMesh:
    """Starts in `lm` a broker, `pipelines[name]` replicas of each stage of each pipeline
    (configs from `pipelines_dir`, default the bundled ones) and a gateway on fixed routes to
    them; returns it once all serve. `redis_url`: where replicas and gateway report (default:
    nowhere); `stage_args` go to every replica, `gateway_args` to the gateway."""
    mesh = lm.mesh
    lm.redis_url = redis_url
    await start_broker(lm, backend, STATIC_SLAB_BYTES)
    routes = []
    specs = []
    for name, n in pipelines.items():
        for stage in load_pipeline(name, size, pipelines_dir or None).stages:
            for i in range(n):
                rid = f"{name}.{stage.name}.{i}"
                sock = str(mesh.run_dir / f"{rid}.sock")
                argv = commandlines.stage(name, stage.name, rid, sock, lm.broker, backend, size,
                                          redis_url, pipelines_dir)  # fmt: skip
                specs.append(Spec(rid, [*argv, *stage_args], {}, f"unix:{sock}"))
                routes.append(f"{name}/{stage.name}={rid}@unix:{sock}")
    # all replicas start at once, then are waited for: their models load side by side
    for spec in specs:
        proc = lm.replicas[spec.name] = lm.spawn(spec)
        proc.target = spec.health
    for proc in lm.replicas.values():
        await wait_up(proc.target, READY_TIMEOUT_S, proc)
    port = free_port()
    lm.gateway = f"127.0.0.1:{port}"
    argv = commandlines.gateway(port, lm.broker, backend, size, redis_url=redis_url,
                                routes=",".join(routes), pipelines_dir=pipelines_dir)  # fmt: skip
    await lm.start(Spec("gateway", [*argv, *gateway_args], {}, lm.gateway))
    return lm


def pipelines_subset(run_dir: Path, names: list[str], directory: str = "") -> str:
    """A pipelines folder holding only `names` from `directory` (default: the bundled configs):
    the whole mesh then serves just those."""
    folder = run_dir / "pipelines"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    for name in names:
        shutil.copy(config_path(name, directory or None), folder / f"{name}.yaml")
    return str(folder)


async def start_mesh(
    mesh: Mesh,
    backend: str,
    size: str,
    policy: str = "even",
    share_mode: str = "",
    pipelines: list[str] | None = None,
    say: Callable[[str], None] = _quiet,
    pipelines_dir: str = "",
    policy_options: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The planned mesh as `camelot run` starts it on this node: redis (unless
    CAMELOT_REDIS_URL is set), broker, scheduler, agent and gateway (on CAMELOT_GATEWAY_PORT,
    else a free port); returns once every pipeline has a ready replica. `say` is told each step
    as it starts and ends. `pipelines` (default: all) are taken from `pipelines_dir` (default:
    the bundled configs). Its addresses, and "probes": the readiness probes' outcomes."""
    mode = share_mode or ("mps" if backend == "cuda" else "none")
    where = pipelines_dir
    if pipelines:
        where = pipelines_subset(mesh.run_dir, pipelines, pipelines_dir)
    redis_url = os.environ.get("CAMELOT_REDIS_URL", "")
    lm = await start_planned(
        LocalMesh(mesh, say), backend, size, policy,
        policy_options=policy_options,
        share_mode=mode,
        mps=os.environ.get("CAMELOT_MPS", "manage" if mode != "none" else "off"),
        redis_url=redis_url,
        gateway_port=int(os.environ.get("CAMELOT_GATEWAY_PORT", "0")),
        pipelines_dir=where,
    )  # fmt: skip
    names = pipelines or list_pipelines(pipelines_dir or None)
    say(f"camelot: the agent starts the plan's replicas; waiting until {len(names)} "
        "pipeline(s) answer")  # fmt: skip
    t0 = time.monotonic()

    def routed(name: str) -> None:
        say(f"camelot: {name} answers after {time.monotonic() - t0:.1f} s")

    probes = await wait_routed(lm.gateway, names, timeout_s=600, procs=mesh.procs, on_routed=routed)
    return {**lm.info(), "probes": probes}


# a probe refused with one of these is refused again however long the mesh is given
FINAL_PROBE_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})


async def wait_routed(
    target: str,
    pipelines: list[str],
    timeout_s: float,
    procs: list[Any],
    on_routed: Callable[[str], None] = _quiet,
) -> Counter[str]:
    """Sends a probe query to each pipeline until all answer (the plan is applied and routed);
    `on_routed` is told each pipeline as it first answers. The probes' outcomes by status code
    ("OK" once per pipeline): the gateway reports them to the scheduler like any query."""
    deadline = time.monotonic() + timeout_s
    pending = list(pipelines)
    outcomes: Counter[str] = Counter()
    async with lifecycle.channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        listing = await stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), timeout=5)
        probes = {
            p.name: wire_from_array(np.zeros(tuple(p.input.shape), dtype=to_numpy(p.input.dtype)))
            for p in listing.pipelines
        }
        while pending:
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited while the plan was applied:\n{p.tail()}")
            name = pending[0]
            item = probes[name]
            try:
                await stub.Submit(gateway_pb2.SubmitRequest(pipeline=name, input=item), timeout=30)
                outcomes["OK"] += 1
                on_routed(pending.pop(0))
            except grpc.aio.AioRpcError as e:
                outcomes[e.code().name] += 1
                if e.code() in FINAL_PROBE_CODES:
                    # the probe is the pipeline's declared input: a refusal of it is the
                    # configs disagreeing (the pipeline's input against its stage's), which
                    # waiting does not mend
                    raise InvalidArgument(
                        f"pipeline {name} refused a query of its declared input "
                        f"({e.code().name}): {e.details()}"
                    ) from e
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"pipeline {name} not served after {timeout_s:.0f} s: {e.details()}"
                    ) from e
                await asyncio.sleep(0.5)
    return outcomes
