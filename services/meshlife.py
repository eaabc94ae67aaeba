"""`camelot run`, `up` and `down`: a local mesh's life from a terminal.

`run` starts the mesh (services.localmesh), sends its burst and prints the tables
(services.burst); with `--serve` it stays up, writing its pid file and the mesh record that
`status`, `query`, `camelotctl` and `make load` find it by. `up` is `run --serve` in the
background, followed until it serves; `down` signals the pid in the pid file and waits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from common import meshrecord
from common.backend import resolve
from common.progress import step
from contract.pipeline_config import config_path, gather_configs, list_pipelines
from services.burst import admin_report, burst, print_table, scheduler_note
from services.launcher import Mesh
from services.localmesh import start_mesh
from services.meshclient import UsageError

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


async def cmd_run(args: argparse.Namespace) -> int:
    try:
        backend = resolve(args.backend).value
    except RuntimeError as e:  # cuda asked for where it is not usable
        raise UsageError(str(e)) from e
    folders = list(getattr(args, "from_dirs", None) or [])
    run_dir = Path(args.run_dir)
    other = running_pid(run_dir)
    if other:
        raise UsageError(
            f"a mesh is already up in {run_dir} (pid {other}): stop it with `camelot down`, "
            "or give this one another --run-dir"
        )
    mesh = Mesh(meshrecord.make_own(run_dir))
    configs = ""
    if folders:
        # the folders' configs in one (a missing folder, or a name in two, refused by name)
        where = mesh.run_dir / "configs"
        shutil.rmtree(where, ignore_errors=True)
        gather_configs(folders, where)
        configs = str(where)
    pipelines = args.pipeline or list_pipelines(configs or None)
    for name in pipelines:
        config_path(name, configs or None)  # an unknown pipeline is refused before anything starts
    pid_file = mesh.run_dir / PID_FILE
    # SIGTERM (`timeout`, a supervisor, `kill`) before the mesh serves: stop what has started,
    # as Ctrl-C does; its default would end this process and leave the mesh's processes running
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    print(f"camelot: starting the mesh on backend {backend}, size {args.size}", flush=True)
    print(f"camelot: logs in {mesh.run_dir}/logs", flush=True)
    try:
        try:
            info = await start_mesh(
                mesh, backend, args.size, args.policy, pipelines=args.pipeline, say=step,
                pipelines_dir=configs,
            )  # fmt: skip
        except (RuntimeError, TimeoutError) as e:
            # no redis-server, or a process that died or never served: its own log's tail says why
            raise UsageError(f"the mesh did not start: {e}") from e
        print(f"camelot: gateway on {info['gateway']}, scheduler {info['scheduler']}", flush=True)
        rows = await burst(
            info["gateway"], pipelines, args.size, args.queries, args.concurrency, True,
            pipelines_dir=configs,
        )  # fmt: skip
        print_table(rows, args.concurrency)
        await asyncio.sleep(1.5)  # one report flush and a scheduler tick
        print()
        print(scheduler_note(args.queries, info["probes"]))
        print(await admin_report(info))
        if args.serve:
            stop = asyncio.Event()
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
        # a SIGTERM during the stop does not cut it short (the stop kills what will not exit)
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
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
    for folder in getattr(args, "from_dirs", None) or ():
        argv += ["--from", str(Path(folder).resolve())]
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
