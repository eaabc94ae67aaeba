"""Faults under load: `kill -9` one process of a live mesh while open-loop load flows.

    python -m loadgen.faults                      # all six faults -> docs/results/faults.json/.md
    python -m loadgen.faults --fault broker --rate 10 --duration-s 8

The mesh is the real one (redis, broker, scheduler, agent, gateway as processes; the agent starts
the stage replicas of a static plan that gives one stage two replicas). For each fault a Poisson
load runs against the gateway; a third of the way in, the victim is killed with SIGKILL; what a
supervisor restarts (systemd's or compose's `restart: always`: broker, agent, scheduler, redis,
gateway) is started again with the same command line after `--down-s`; a stage replica is
restarted by the agent itself. After the load the broker must come back to its baseline: no live
lease, no bytes lent, and every segment of a killed broker gone from /dev/shm.

Every query is counted: sent = succeeded + failed with a gRPC status + lost, where lost means no
status at all (a client-side failure), or a status that came later than the query's deadline
plus `LATE_SLACK_S` (a hang the deadline did not end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.results import module_command, write_result
from contract.pipeline_config import load_pipeline
from loadgen import traces
from loadgen.inputs import uniform_mix
from loadgen.meshstate import broker_segments, held_bytes, replica_pid, replica_pids, settle
from loadgen.openloop import run_open_loop
from loadgen.records import OK, Result
from services.launcher import Mesh
from services.localmesh import LocalMesh, start_planned, wait_routed

log = logging.getLogger(__name__)

FAULTS = ("replica", "broker", "agent", "scheduler", "redis", "gateway")
# Processes a supervisor restarts; a stage replica is the agent's to restart.
SUPERVISED = ("redis", "broker", "scheduler", "agent", "gateway")
LATE_SLACK_S = 1.0
SHM_DIR = Path("/dev/shm")


@dataclass
class FaultMesh(LocalMesh):
    """A planned local mesh serving one pipeline, whose processes the harness kills (`kill`) and
    starts again (`restart`)."""

    pipeline: str = ""

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.mesh.stop_all(grace_s)
        # replicas are the agent's children in sessions of their own: a killed agent leaves them
        for pid in replica_pids(self.run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def static_plan(pipeline: str, size: str, replicas: dict[str, int]) -> dict[str, Any]:
    """A plan with `replicas.get(stage, 1)` host replicas per stage of one pipeline."""
    cfg = load_pipeline(pipeline, size)
    return {
        "stages": [
            {
                "pipeline": pipeline,
                "stage": s.name,
                "replicas": [{"node": "local", "gpu": -1}] * replicas.get(s.name, 1),
            }
            for s in cfg.stages
        ]
    }


async def start(
    run_dir: Path,
    pipeline: str = "img-to-text",
    two_replicas: str = "encode",
    size: str = "tiny",
    slab_bytes: int = 64 << 20,
) -> FaultMesh:
    """Starts redis, broker, scheduler (static plan), agent and gateway; returns once routed."""
    fm = FaultMesh(Mesh(run_dir), pipeline=pipeline)
    plan_file = run_dir / "plan.json"
    plan_file.write_text(json.dumps(static_plan(pipeline, size, {two_replicas: 2})))
    try:
        # its own redis always (CAMELOT_REDIS_URL or not): one of the processes it kills
        await start_planned(
            fm, "host", size, "static", {"file": str(plan_file)}, slab_bytes=slab_bytes
        )
        await wait_routed(fm.gateway, [pipeline], timeout_s=180, procs=fm.mesh.procs)
    except BaseException:
        await fm.stop()
        raise
    return fm


def count(result: Result, deadline_s: float, sent: int) -> dict[str, Any]:
    """sent / succeeded / failed_by_code / queries_lost of one open-loop run."""
    failed: dict[str, int] = {}
    ok = lost = late = 0
    for r in result.records:
        if (r.done_us - r.sent_us) / 1e6 > deadline_s + LATE_SLACK_S:
            late += 1
        if r.status == OK:
            ok += 1
        elif r.status.startswith("CLIENT_"):
            lost += 1
        else:
            failed[r.status] = failed.get(r.status, 0) + 1
    lost += late + (sent - len(result.records))
    return {
        "queries_sent": sent,
        "succeeded": ok,
        "failed": sum(failed.values()),
        "failed_by_code": dict(sorted(failed.items())),
        "queries_lost": lost,
        "late_answers": late,
    }


async def inject(fm: FaultMesh, fault: str, at_s: float, down_s: float) -> dict[str, Any]:
    """Kills the victim at `at_s`; restarts a supervised one after `down_s`; times it all."""
    await asyncio.sleep(at_s)
    info: dict[str, Any] = {}
    if fault == "replica":
        stage = two_replica_stage(fm)
        pid = replica_pid(fm.run_dir, stage)
        os.kill(pid, signal.SIGKILL)
        info["victim"] = f"{fm.pipeline}.{stage} pid {pid}"
        t0 = time.monotonic()
        # the agent notices the exit and starts the replica again
        while pid in replica_pids(fm.run_dir) or len(replica_pids(fm.run_dir)) < expected(fm):
            if time.monotonic() - t0 > 60:
                break
            await asyncio.sleep(0.05)
        info["recovered_s"] = round(time.monotonic() - t0, 3)
        return info
    if fault == "broker":
        info["old_segments"] = await broker_segments(fm.broker_tcp)
    pid = fm.kill(fault)
    info["victim"] = f"{fault} pid {pid}"
    t0 = time.monotonic()
    await asyncio.sleep(down_s)
    await fm.restart(fault)
    info["recovered_s"] = round(time.monotonic() - t0, 3)
    return info


def two_replica_stage(fm: FaultMesh) -> str:
    plan = json.loads((fm.run_dir / "plan.json").read_text())
    return str(next(s["stage"] for s in plan["stages"] if len(s["replicas"]) > 1))


def expected(fm: FaultMesh) -> int:
    plan = json.loads((fm.run_dir / "plan.json").read_text())
    return sum(len(s["replicas"]) for s in plan["stages"])


async def run_fault(
    fm: FaultMesh,
    fault: str,
    rate_qps: float,
    duration_s: float,
    deadline_s: float = 2.0,
    down_s: float = 1.0,
    seed: int = 0,
    settle_s: float = 30.0,
) -> dict[str, Any]:
    """One fault under load; the row of the result table."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    await wait_routed(fm.gateway, [fm.pipeline], timeout_s=120, procs=fm.mesh.procs)
    base, _ = await settle(fm.broker_tcp, settle_s)
    schedule = traces.poisson(rate_qps, duration_s, np.random.default_rng(seed))
    t0 = time.monotonic()
    fault_task = asyncio.create_task(inject(fm, fault, duration_s / 3, down_s))
    result = await run_open_loop(
        fm.gateway,
        schedule,
        uniform_mix([fm.pipeline]),
        seed,
        deadline_s,
        duration_s=duration_s,
    )
    info = await fault_task
    load_s = time.monotonic() - t0
    after, local_leases = await settle(fm.broker_tcp, settle_s, fm.gateway)
    # a restarted agent stops its predecessor's replicas once its own serve
    for _ in range(int(settle_s / 0.2)):
        if len(replica_pids(fm.run_dir)) == expected(fm):
            break
        await asyncio.sleep(0.2)
    old = info.pop("old_segments", [])
    leaked_shm = sum(
        (SHM_DIR / n).stat().st_size for n in old if (SHM_DIR / n).exists()
    )  # fmt: skip
    row: dict[str, Any] = {
        "fault": fault,
        **info,
        "rate_qps": rate_qps,
        "duration_s": duration_s,
        "deadline_s": deadline_s,
        **count(result, deadline_s, len(schedule)),
        "leases_leaked": after.live_leases + local_leases,
        "bytes_leaked": held_bytes(after),
        "baseline_leases": base.live_leases,
        "broker_generation_changed": after.generation != base.generation,
        "shm_leaked_bytes": leaked_shm,
        "replicas_running": len(replica_pids(fm.run_dir)),
        "replicas_planned": expected(fm),
        "load_wall_s": round(load_s, 2),
    }
    log.info("fault %s: %s", fault, row)
    return row


COLUMNS = [
    "fault", "victim", "recovered_s", "queries_sent", "succeeded", "failed_by_code",
    "queries_lost", "leases_leaked", "bytes_leaked", "shm_leaked_bytes", "replicas_running",
    "replicas_planned",
]  # fmt: skip


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "total_lost": sum(r["queries_lost"] for r in rows),
        "total_leases_leaked": sum(r["leases_leaked"] for r in rows),
        "total_bytes_leaked": sum(r["bytes_leaked"] for r in rows),
        "total_sent": sum(r["queries_sent"] for r in rows),
        "total_succeeded": sum(r["succeeded"] for r in rows),
        "faults": len(rows),
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="camelot-faults-"))
    fm = await start(run_dir, args.pipeline, args.stage)
    rows = []
    try:
        for i, fault in enumerate(args.fault or FAULTS):
            rows.append(
                await run_fault(
                    fm, fault, args.rate, args.duration_s, args.deadline_s, args.down_s, seed=i
                )
            )
    finally:
        await fm.stop()
    return {"rows": rows, "summary": summarize(rows)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.faults", description=__doc__.split("\n")[0])
    p.add_argument("--fault", action="append", choices=FAULTS, help="only these (repeatable)")
    p.add_argument("--rate", type=float, default=20.0, help="Poisson arrivals per second")
    p.add_argument("--duration-s", type=float, default=12.0, help="load per fault")
    p.add_argument("--deadline-s", type=float, default=2.0, help="per-query gRPC deadline")
    p.add_argument("--down-s", type=float, default=1.0, help="supervisor restart delay")
    p.add_argument("--pipeline", default="img-to-text")
    p.add_argument("--stage", default="encode", help="the stage given two replicas")
    p.add_argument("--run-dir", default="")
    p.add_argument("--out-dir", default="docs/results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    doc = asyncio.run(_main(args))
    write_result(
        "faults",
        doc["rows"],
        doc["summary"],
        "host",
        args.out_dir,
        COLUMNS,
        command=module_command("loadgen.faults", list(argv if argv is not None else sys.argv[1:])),
        notes=NOTES,
    )
    json.dump(doc["summary"], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if doc["summary"]["total_lost"] == 0 else 1


NOTES = """\
Measured on a CPU-only machine (host backend, tiny models), not on the GPU host.
Each row: a Poisson load on one pipeline whose `encode` stage has two replicas; the victim is
killed with SIGKILL a third of the way in and (except a replica, which its agent restarts)
started again by the harness after 1 s, as `restart: always` would. `queries_lost` counts
queries with no status or a status later than their deadline; `leases_leaked` and
`bytes_leaked` are the broker's live leases and lent bytes once the load has stopped;
`shm_leaked_bytes` the /dev/shm segments a killed broker left behind. See docs/RELIABILITY.md.
"""


if __name__ == "__main__":
    sys.exit(main())
