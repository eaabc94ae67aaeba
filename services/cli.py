"""`camelot`: run the local mesh, query it, and look at it.

camelot run [--serve]    start redis, broker, replicas and gateway; send a burst; print a table
camelot up / down        the same mesh in the background / stop it
camelot status           pipelines served and their replicas
camelot query PIPELINE   send one query and print where its time went
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from common import lifecycle
from common.backend import resolve
from common.dtypes import to_numpy, wire_from_array
from common.pipeline_config import config_path, list_pipelines, load_pipeline
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.launcher import Mesh, free_port, wait_healthy

DEFAULT_RUN_DIR = Path(os.environ.get("CAMELOT_RUN_DIR", "/tmp/camelot"))
# the serving process's pid, in the run directory: what `camelot down` signals
PID_FILE = "camelot.pid"


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
    pipelines_dir: str = "",
) -> dict[str, Any]:
    """Starts the whole mesh on this node: redis (unless CAMELOT_REDIS_URL is set), broker,
    scheduler, agent (which starts the replicas the scheduler's plan asks for) and gateway
    (which follows the scheduler's routes); returns once every pipeline has a ready replica.
    `pipelines` (default: all) are taken from `pipelines_dir` (default: the bundled configs)."""
    redis_url = os.environ.get("CAMELOT_REDIS_URL", "")
    if not redis_url:
        port = free_port()
        mesh.redis(port)
        redis_url = f"redis://127.0.0.1:{port}/0"
    token_file = mesh.run_dir / "admin.token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(16))
        token_file.chmod(0o600)
    env = {"CAMELOT_ADMIN_TOKEN_FILE": str(token_file), "CAMELOT_REDIS_URL": redis_url}
    if pipelines:
        env["CAMELOT_PIPELINES_DIR"] = pipelines_subset(mesh.run_dir, pipelines, pipelines_dir)
    elif pipelines_dir:
        env["CAMELOT_PIPELINES_DIR"] = pipelines_dir
    sock = str(mesh.run_dir / "broker.sock")
    broker_port = free_port()
    broker = mesh.python(
        "broker", "shmbroker", ["--port", str(broker_port), "--socket", sock, "--backend", backend]
    )
    await wait_healthy(f"127.0.0.1:{broker_port}", 60, broker)
    broker_addr = f"unix:{sock}"
    sched_port = free_port()
    scheduler = mesh.python(
        "scheduler",
        "scheduler",
        ["--port", str(sched_port), "--redis", redis_url, "--policy", policy, "--size", size],
        env,
    )
    sched_addr = f"127.0.0.1:{sched_port}"
    await wait_healthy(sched_addr, 60, scheduler)
    mode = share_mode or ("mps" if backend == "cuda" else "none")
    mps = os.environ.get("CAMELOT_MPS", "manage" if mode != "none" else "off")
    agent_port = free_port()
    agent = mesh.python(
        "agent",
        "services.agent",
        ["--node", "local", "--port", str(agent_port), "--broker", broker_addr,
         "--scheduler", sched_addr, "--redis", redis_url, "--backend", backend,
         "--share-mode", mode, "--mps", mps,
         "--run-dir", str(mesh.run_dir), "--size", size],
        env,
    )  # fmt: skip
    await wait_healthy(f"127.0.0.1:{agent_port}", 120, agent)
    gw_port = int(os.environ.get("CAMELOT_GATEWAY_PORT", "0")) or free_port()
    gateway = mesh.python(
        "gateway",
        "services.gateway",
        ["--port", str(gw_port), "--broker", broker_addr, "--redis", redis_url,
         "--scheduler", sched_addr, "--backend", backend, "--size", size],
        env,
    )  # fmt: skip
    gw = f"127.0.0.1:{gw_port}"
    await wait_healthy(gw, 120, gateway)
    names = pipelines or list_pipelines(pipelines_dir or None)
    await wait_routed(gw, names, timeout_s=600, procs=mesh.procs)
    return {"gateway": gw, "scheduler": sched_addr, "redis": redis_url, "broker": broker_addr,
            "token_file": str(token_file)}  # fmt: skip


async def wait_routed(
    target: str, pipelines: list[str], timeout_s: float, procs: list[Any]
) -> None:
    """Sends a probe query to each pipeline until all answer (the plan is applied and routed)."""
    deadline = time.monotonic() + timeout_s
    pending = list(pipelines)
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
                pending.pop(0)
            except grpc.aio.AioRpcError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"pipeline {name} not served after {timeout_s:.0f} s: {e.details()}"
                    ) from e
                await asyncio.sleep(0.5)


async def admin_report(info: dict[str, Any]) -> str:
    """The scheduler's plan and windowed latency, as `camelotctl` prints them (a separate process:
    services never import the scheduler)."""
    out = []
    for cmd in ("get-plan", "status"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scheduler.ctl", "--target", info["scheduler"],
            "--token-file", info["token_file"], cmd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        stdout, _ = await proc.communicate()
        out.append(stdout.decode(errors="replace").rstrip())
    return "\n\n".join(out)


async def burst_one(
    stub: gateway_pb2_grpc.GatewayStub,
    pipeline: str,
    inputs: list[tensor_pb2.WireTensor],
    queries: int,
    concurrency: int,
) -> tuple[list[float], dict[str, int], float]:
    """Latencies (ms), error counts by status, and wall time of `queries` closed-loop queries."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                request = gateway_pb2.SubmitRequest(
                    pipeline=pipeline, input=inputs[i % len(inputs)]
                )
                await stub.Submit(request, timeout=60)
                lat.append((time.perf_counter() - t0) * 1e3)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(queries)))
    return lat, errors, time.perf_counter() - t0


async def burst(
    target: str, pipelines: list[str], size: str, queries: int, concurrency: int
) -> list[dict[str, Any]]:
    """Sends `queries` to each pipeline, `concurrency` at a time; per-pipeline summary rows."""
    from services.pipelines.runner import make_input

    rows = []
    async with lifecycle.channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for name in pipelines:
            cfg = load_pipeline(name, size)
            inputs = [wire_from_array(make_input(cfg, seed)) for seed in range(min(queries, 16))]
            lat, errors, wall = await burst_one(stub, name, inputs, queries, concurrency)
            rows.append(
                {
                    "pipeline": name,
                    "queries": queries,
                    "errors": sum(errors.values()),
                    "error_codes": errors,
                    "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
                    "p99_ms": float(np.percentile(lat, 99)) if lat else float("nan"),
                    "qos_p99_ms": cfg.qos_p99_ms,
                    "qps": len(lat) / wall if wall > 0 else 0.0,
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'pipeline':<18}{'queries':>8}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'QoS ms':>10}{'':2}{'qps':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ok = "ok" if r["p99_ms"] <= r["qos_p99_ms"] else "!!"
        print(
            f"{r['pipeline']:<18}{r['queries']:>8}{r['errors']:>8}{r['p50_ms']:>10.2f}"
            f"{r['p99_ms']:>10.2f}{r['qos_p99_ms']:>10.1f}{ok:>2}{r['qps']:>8.1f}"
        )
        if r["errors"]:
            print(f"{'':<18}error codes: {r['error_codes']}")


async def cmd_run(args: argparse.Namespace) -> int:
    backend = resolve(args.backend).value
    pipelines = args.pipeline or list_pipelines()
    mesh = Mesh(Path(args.run_dir))
    pid_file = mesh.run_dir / PID_FILE
    print(f"camelot: starting the mesh on backend {backend}, size {args.size}")
    print(f"camelot: logs in {mesh.run_dir}/logs")
    try:
        info = await start_mesh(mesh, backend, args.size, args.policy, pipelines=args.pipeline)
        print(f"camelot: gateway on {info['gateway']}, scheduler {info['scheduler']}")
        rows = await burst(info["gateway"], pipelines, args.size, args.queries, args.concurrency)
        print_table(rows)
        await asyncio.sleep(1.5)  # one report flush and a scheduler tick
        print()
        print(await admin_report(info))
        if args.serve:
            print("camelot: serving; Ctrl-C to stop")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            (mesh.run_dir / "mesh.json").write_text(
                json.dumps({**info, "pids": [p.pid for p in mesh.procs]})
            )
            # `camelot down` stops a mesh served from a terminal as it stops one from `up`
            pid_file.write_text(str(os.getpid()))
            await stop.wait()
        return 1 if any(r["errors"] for r in rows) else 0
    finally:
        await mesh.stop_all()
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == os.getpid():
                pid_file.unlink()
        print("camelot: stopped")


async def cmd_query(args: argparse.Namespace) -> int:
    from services.pipelines.runner import make_input

    cfg = load_pipeline(args.pipeline, args.size)
    item = make_input(cfg, args.seed)
    async with lifecycle.channel(args.target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        r = await stub.Submit(
            gateway_pb2.SubmitRequest(
                pipeline=args.pipeline,
                input=wire_from_array(item),
                transport=tensor_pb2.TRANSPORT_WIRE
                if args.transport == "wire"
                else tensor_pb2.TRANSPORT_REF,
            ),
            timeout=args.timeout,
        )
    print(f"query {r.query_id}: {r.e2e_us / 1e3:.2f} ms end to end, plan epoch {r.plan_epoch}")
    for s in r.stages:
        print(
            f"  {s.stage:<16} rpc {s.rpc_us / 1e3:8.2f} ms  queue {s.queue_us / 1e3:7.2f}  "
            f"batch-wait {s.batch_wait_us / 1e3:7.2f}  compute {s.compute_us / 1e3:7.2f}  "
            f"on {s.replica_id}"
        )
    print(f"  output: dtype {tensor_pb2.DType.Name(r.output.dtype)} shape {list(r.output.shape)}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    async with lifecycle.channel(args.target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        listing = await stub.ListPipelines(gateway_pb2.ListPipelinesRequest(), timeout=5)
    for p in listing.pipelines:
        print(f"{p.name:<18} QoS p99 {p.qos_p99_ms:8.1f} ms   stages: {' -> '.join(p.stages)}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "services.cli", "run", "--serve", "--run-dir", str(run_dir),
            "--backend", args.backend, "--size", args.size, "--queries", "4"]  # fmt: skip
    import subprocess

    with open(run_dir / "camelot.log", "ab") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (run_dir / PID_FILE).write_text(str(p.pid))
    print(f"camelot: mesh starting in the background (pid {p.pid}); log {run_dir / 'camelot.log'}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    pid_file = Path(args.run_dir) / PID_FILE
    if not pid_file.exists():
        print("camelot: no mesh is up", file=sys.stderr)
        return 1
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"camelot: pid {pid} is gone")
    pid_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="camelot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "up"):
        s = sub.add_parser(name)
        s.add_argument(
            "--backend",
            default=os.environ.get("CAMELOT_BACKEND", "auto"),
            choices=("auto", "host", "cuda"),
        )
        s.add_argument(
            "--size", default=os.environ.get("CAMELOT_SIZE", "tiny"), choices=("tiny", "full")
        )
        s.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
        s.add_argument("--queries", type=int, default=32)
        s.add_argument("--concurrency", type=int, default=4)
        s.add_argument("--pipeline", action="append", help="only these pipelines (repeatable)")
        s.add_argument("--serve", action="store_true", help="keep the mesh up after the burst")
        s.add_argument("--policy", default=os.environ.get("CAMELOT_POLICY", "even"))
    d = sub.add_parser("down")
    d.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    for name in ("status", "query"):
        s = sub.add_parser(name)
        s.add_argument(
            "--target", default=os.environ.get("CAMELOT_GATEWAY_ADDR", "127.0.0.1:50052")
        )
        if name == "query":
            s.add_argument("pipeline")
            s.add_argument(
                "--size", default=os.environ.get("CAMELOT_SIZE", "tiny"), choices=("tiny", "full")
            )
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--transport", default="ref", choices=("ref", "wire"))
            s.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.cmd == "up":
        sys.exit(cmd_up(args))
    if args.cmd == "down":
        sys.exit(cmd_down(args))
    handler = {"run": cmd_run, "query": cmd_query, "status": cmd_status}[args.cmd]
    sys.exit(asyncio.run(handler(args)))


if __name__ == "__main__":
    main()
