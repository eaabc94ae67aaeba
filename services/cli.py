"""`camelot`: run the local mesh, query it, and look at it.

camelot run [--serve]    start redis, broker, replicas and gateway; send a burst; print a table
camelot up / down        the same mesh in the background / stop it
camelot status           pipelines served and their replicas
camelot query PIPELINE   send one query and print where its time went
camelot profile PIPELINE...  profile the stages on this node's GPU (services/profiler)

`status`, `query` and `down` find the mesh that `run --serve` or `up` started from the record it
writes in its run directory (--run-dir, else CAMELOT_RUN_DIR, else one per user and checkout, so
two clones never share one); --target (or CAMELOT_GATEWAY_ADDR) names a gateway instead. A user
error prints one line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from common import lifecycle, meshrecord
from common.backend import resolve
from common.dtypes import wire_from_array
from common.errors import CamelotError
from common.progress import Progress, step
from common.settings import SettingsError
from contract.pipeline_config import config_path, list_pipelines, load_pipeline
from protos import gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.launcher import Mesh
from services.localmesh import start_mesh
from services.meshclient import UsageError, cmd_query, cmd_status

# the serving process's pid, in the run directory: what `camelot down` signals
PID_FILE = "camelot.pid"
UP_WAIT_S = 900.0
DOWN_WAIT_S = 60.0


def is_camelot(pid: int) -> bool:
    """Whether `pid` is alive and a camelot process (a stale pid file's number may be reused)."""
    if not meshrecord.pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to ask: trust the pid file
    return b"services.cli" in cmdline or b"camelot" in cmdline


def running_pid(run_dir: Path) -> int:
    """The pid of the mesh up in `run_dir` other than this process (0 when none); NoMesh when
    `run_dir` is another user's (its pid file is not to be trusted)."""
    meshrecord.check_owner(run_dir)
    try:
        pid = int((run_dir / PID_FILE).read_text())
    except (OSError, ValueError):
        return 0
    return pid if pid != os.getpid() and is_camelot(pid) else 0


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
    done: Callable[[], None] = lambda: None,
) -> tuple[list[float], dict[str, int], float]:
    """Latencies (ms), error counts by status, and wall time of `queries` closed-loop queries;
    `done` is called as each query ends."""
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
            done()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(queries)))
    return lat, errors, time.perf_counter() - t0


async def burst(
    target: str,
    pipelines: list[str],
    size: str,
    queries: int,
    concurrency: int,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Sends `queries` to each pipeline, `concurrency` at a time; per-pipeline summary rows
    (with a progress bar per pipeline on stderr when `show_progress`)."""
    from services.pipelines.runner import make_input

    rows = []
    async with lifecycle.channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        for name in pipelines:
            cfg = load_pipeline(name, size)
            inputs = [wire_from_array(make_input(cfg, seed)) for seed in range(min(queries, 16))]
            if show_progress:
                with Progress(f"camelot: burst {name:<16}", queries, "queries") as bar:
                    lat, errors, wall = await burst_one(
                        stub, name, inputs, queries, concurrency, bar.advance
                    )
            else:
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


def format_table(rows: list[dict[str, Any]], concurrency: int) -> str:
    """The burst as the client saw it: per pipeline its queries, the errors the client got, the
    latency it measured against the QoS with a verdict, and its rate (answers per second of the
    pipeline's burst: a closed-loop rate, not the scheduler's windowed ARRIVAL/s)."""
    table = [("PIPELINE", "QUERIES", "ERRORS", "P50ms", "P99ms", "QOSms", "VERDICT", "CLIENT qps")]
    codes = []
    for r in rows:
        answered = r["queries"] > r["errors"]
        verdict = "-" if not answered else "met" if r["p99_ms"] <= r["qos_p99_ms"] else "MISSED"
        table.append((
            r["pipeline"], str(r["queries"]), str(r["errors"]),
            f"{r['p50_ms']:.2f}" if answered else "-", f"{r['p99_ms']:.2f}" if answered else "-",
            f"{r['qos_p99_ms']:g}", verdict, f"{r['qps']:.1f}",
        ))  # fmt: skip
        if r["errors"]:
            got = ", ".join(f"{k} {v}" for k, v in sorted(r["error_codes"].items()))
            codes.append(f"  {r['pipeline']} errors: {got}")
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip()
             for row in table]  # fmt: skip
    caption = (
        f"client: the burst, {concurrency} queries in flight at a time per pipeline; "
        "CLIENT qps = answers / the pipeline's burst time"
    )
    return "\n".join([caption, *lines, *codes])


def print_table(rows: list[dict[str, Any]], concurrency: int) -> None:
    print(format_table(rows, concurrency))


def scheduler_note(queries: int, probes: Counter[str]) -> str:
    """What the scheduler's tables below the burst's count: every query the gateway reported in
    its window, so camelot's readiness probes too (the burst's COUNT plus these), and the
    probes refused while the replicas started are its ERR, errors no client saw."""
    refused = {k: v for k, v in sorted(probes.items()) if k != "OK"}
    said = f"{probes['OK']} answered"
    if refused:
        said += ", " + ", ".join(f"{v} {k}" for k, v in refused.items())
        said += " (sent while the replicas started)"
    return (
        "scheduler (below): its window counts every query the gateway served: besides the "
        f"burst's {queries} per pipeline, camelot's readiness probes: {said}"
    )


async def cmd_run(args: argparse.Namespace) -> int:
    try:
        backend = resolve(args.backend).value
    except RuntimeError as e:  # cuda asked for where it is not usable
        raise UsageError(str(e)) from e
    pipelines = args.pipeline or list_pipelines()
    for name in pipelines:
        config_path(name)  # an unknown pipeline is a usage error before anything starts
    run_dir = Path(args.run_dir)
    other = running_pid(run_dir)
    if other:
        raise UsageError(
            f"a mesh is already up in {run_dir} (pid {other}): stop it with `camelot down`, "
            "or give this one another --run-dir"
        )
    mesh = Mesh(meshrecord.make_own(run_dir))
    pid_file = mesh.run_dir / PID_FILE
    print(f"camelot: starting the mesh on backend {backend}, size {args.size}", flush=True)
    print(f"camelot: logs in {mesh.run_dir}/logs", flush=True)
    try:
        try:
            info = await start_mesh(
                mesh, backend, args.size, args.policy, pipelines=args.pipeline, say=step
            )
        except (RuntimeError, TimeoutError) as e:
            # no redis-server, or a process that died or never served: its own log's tail says why
            raise UsageError(f"the mesh did not start: {e}") from e
        print(f"camelot: gateway on {info['gateway']}, scheduler {info['scheduler']}", flush=True)
        rows = await burst(
            info["gateway"], pipelines, args.size, args.queries, args.concurrency, True
        )
        print_table(rows, args.concurrency)
        await asyncio.sleep(1.5)  # one report flush and a scheduler tick
        print()
        print(scheduler_note(args.queries, info["probes"]))
        print(await admin_report(info))
        if args.serve:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            # `camelot down` stops a mesh served from a terminal as it stops one from `up`
            pid_file.write_text(str(os.getpid()))
            # what `camelot status/query`, `camelotctl` and `make load` find this mesh by
            meshrecord.MeshRecord(
                gateway=info["gateway"],
                scheduler=info["scheduler"],
                token_file=info["token_file"],
                pid=os.getpid(),
                redis=info["redis"],
                broker=info["broker"],
                agent=info["agent"],
            ).write(mesh.run_dir)
            # scripts wait for "serving; Ctrl-C" (deploy/device/*.sh)
            print(
                "camelot: serving; Ctrl-C to stop. `camelot status`, `camelot query`, "
                f"`camelotctl` and `make load` find it by {mesh.run_dir / meshrecord.RECORD_FILE}",
                flush=True,
            )
            await stop.wait()
        return 1 if any(r["errors"] for r in rows) else 0
    finally:
        meshrecord.clear(mesh.run_dir, os.getpid())
        await mesh.stop_all()
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == os.getpid():
                pid_file.unlink()
        print("camelot: stopped", flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    meshrecord.make_own(run_dir)
    other = running_pid(run_dir)
    if other:
        raise UsageError(f"a mesh is already up in {run_dir} (pid {other}); `camelot down` first")
    argv = [sys.executable, "-m", "services.cli", "run", "--serve", "--run-dir", str(run_dir),
            "--backend", args.backend, "--size", args.size, "--queries", "4",
            "--policy", args.policy]  # fmt: skip
    for name in args.pipeline or ():
        argv += ["--pipeline", name]
    import subprocess

    log_path = run_dir / "camelot.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (run_dir / PID_FILE).write_text(str(p.pid))
    step(f"camelot: mesh starting in the background (pid {p.pid}); log {log_path}")
    # the steps as the background process logs them, until it serves or dies
    deadline = time.monotonic() + args.wait_s
    with open(log_path, "rb") as log:
        log.seek(offset)
        while True:
            for line in log.read().decode(errors="replace").splitlines():
                if line.startswith("camelot:"):
                    step(line)
            try:
                record = meshrecord.read(run_dir)
                if record.pid == p.pid:
                    break
            except meshrecord.NoMesh:
                pass
            if p.poll() is not None:
                raise UsageError(
                    f"the mesh exited with {p.returncode} while starting; see {log_path}"
                )
            if time.monotonic() > deadline:
                raise UsageError(
                    f"the mesh is not serving after {args.wait_s:.0f} s (still starting, pid "
                    f"{p.pid}); see {log_path}"
                )
            time.sleep(0.2)
    print(f"camelot: mesh up (pid {p.pid}): gateway {record.gateway}, scheduler "
          f"{record.scheduler}; `camelot down` stops it")  # fmt: skip
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    pid_file = run_dir / PID_FILE
    pid = running_pid(run_dir)
    if not pid:
        pid_file.unlink(missing_ok=True)  # a stale one, left by a mesh that was killed
        raise UsageError(f"no mesh is up in {run_dir}")
    os.kill(pid, signal.SIGTERM)
    step(f"camelot: stopping the mesh in {run_dir} (pid {pid})")
    deadline = time.monotonic() + args.wait_s
    while meshrecord.pid_alive(pid) and time.monotonic() < deadline:
        # reaps it if it is our child; otherwise just waits for it to go
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if meshrecord.pid_alive(pid):
        raise UsageError(f"the mesh (pid {pid}) is still stopping after {args.wait_s:.0f} s")
    with contextlib.suppress(OSError, ValueError):
        if int(pid_file.read_text()) == pid:
            pid_file.unlink()
    step("camelot: stopped")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="camelot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run_dir = str(meshrecord.default_run_dir())
    run_dir_help = f"the mesh's run directory (CAMELOT_RUN_DIR; default {run_dir})"
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
        s.add_argument("--run-dir", default=run_dir, help=run_dir_help)
        s.add_argument("--queries", type=int, default=32)
        s.add_argument("--concurrency", type=int, default=4)
        s.add_argument("--pipeline", action="append", help="only these pipelines (repeatable)")
        s.add_argument("--serve", action="store_true", help="keep the mesh up after the burst")
        s.add_argument("--policy", default=os.environ.get("CAMELOT_POLICY", "even"))
        if name == "up":
            s.add_argument("--wait-s", type=float, default=UP_WAIT_S, help="how long to wait")
    sub.add_parser("profile", help="profile stages on this GPU: camelot profile --help")
    d = sub.add_parser("down")
    d.add_argument("--run-dir", default=run_dir, help=run_dir_help)
    d.add_argument("--wait-s", type=float, default=DOWN_WAIT_S, help="how long to wait")
    for name in ("status", "query"):
        s = sub.add_parser(name)
        s.add_argument("--run-dir", default=run_dir, help=run_dir_help)
        s.add_argument(
            "--target",
            default=None,
            help="gateway host:port (CAMELOT_GATEWAY_ADDR; default: the mesh in --run-dir)",
        )
        if name == "status":
            s.add_argument(
                "--scheduler",
                default=None,
                help="scheduler host:port (CAMELOT_SCHEDULER_ADDR; default: the mesh's)",
            )
        if name == "query":
            s.add_argument("pipeline")
            s.add_argument(
                "--size", default=os.environ.get("CAMELOT_SIZE", "tiny"), choices=("tiny", "full")
            )
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--transport", default="ref", choices=("ref", "wire"))
            s.add_argument("--timeout", type=float, default=30.0)
    return p


def cmd_profile(argv: list[str]) -> int:
    """`camelot profile PIPELINE...`: the profiler (services/profiler), which parses its own
    flags; a pipeline is a bundled name or a config path (a bring-your-own-model YAML)."""
    from services.profiler.__main__ import main as profile

    profile(argv)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # the profiler's flags are its own: `camelot profile --help` shows them
    args = None if argv[:1] == ["profile"] else _parser().parse_args(argv)
    try:
        if args is None:
            code = cmd_profile(argv[1:])
        elif args.cmd == "up":
            code = cmd_up(args)
        elif args.cmd == "down":
            code = cmd_down(args)
        else:
            handler = {"run": cmd_run, "query": cmd_query, "status": cmd_status}[args.cmd]
            code = asyncio.run(handler(args))
    except (UsageError, meshrecord.NoMesh, SettingsError) as e:
        print(f"camelot: {e}", file=sys.stderr)
        code = 1
    except CamelotError as e:
        print(f"camelot: {e.message}", file=sys.stderr)
        code = 1
    except grpc.aio.AioRpcError as e:
        print(f"camelot: {e.code().name}: {e.details()}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = _reader_gone()
    sys.exit(code)


def _reader_gone() -> int:
    """stdout's reader (`| head`) left: say nothing more, and let exit not flush into it."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    main()
