"""A fatal GPU fault under load: a poisoned query makes a replica's kernel fault; the mesh recovers.

    python -m loadgen.gpu_faults --backend cuda --sharing mps --sharing green --sharing green-mps
    python -m loadgen.gpu_faults --backend host --sharing mps --duration-s 8   # the host stand-in

The mesh is the real one (redis, broker, scheduler, agent, gateway as processes; the agent starts
the replicas of a static plan), serving `fault2` (services/pipelines/faults/fault2.yaml): stage
`a` hands the input on, stage `b` is the fault plug-in (services/models/fault.py), `--replicas` of
each on one GPU, shared the `--sharing` way (MPS shares; green contexts of
`--groups-per-replica` SM groups each, with no MPS daemon; or those under the daemon at 100%,
`green-mps`, as deployments run them side by side). A Poisson load runs; a third of the way in
one poisoned query is sent: on CUDA a stage-`b` replica writes through an invalid pointer (a real
cudaErrorIllegalAddress, which under MPS reaches every client of the GPU), on the host backend it
raises the error the stage takes for one. Measured:

    poison_status      the poisoned query's status (INTERNAL, naming the replica and the fault)
    recovered          every planned replica READY again, the faulted ones restarted, and a
                       query answered, within `--recover-s`
    recovery_s         from sending the poison to that answer
    failed_queries     the load's failures by status: UNAVAILABLE where retries ran out, INTERNAL
                       for queries batched with the poison (or, under MPS, with the fault in
                       another replica of the GPU)
    leases_leaked      the broker's live leases and the gateway's local ones after the load
    replicas_restarted which replicas the agent restarted (under MPS: every one on the GPU)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from common import lifecycle
from common.dtypes import wire_from_array
from common.results import module_command, write_result
from contract.pipeline_config import load_pipeline, pipelines_dir
from loadgen import traces
from loadgen.faults import FaultMesh, count
from loadgen.inputs import uniform_mix
from loadgen.meshstate import settle
from loadgen.openloop import run_open_loop
from protos import agent_pb2, agent_pb2_grpc, gateway_pb2, gateway_pb2_grpc, plan_pb2
from services.launcher import Mesh
from services.localmesh import start_planned, wait_routed
from services.models.fault import poison_input

log = logging.getLogger(__name__)

PIPELINE = "fault2"
FAULTS_DIR = pipelines_dir() / "faults"
# green-mps: green contexts under the GPU's MPS daemon at 100%, as a deployment runs them so that
# they run side by side (green alone: no daemon, each its own context, the GPU takes them in turns)
SHARINGS = ("mps", "green", "green-mps")
READY = plan_pb2.REPLICA_STATE_READY


def plan(backend: str, sharing: str, replicas: int, groups_per_replica: int) -> dict[str, Any]:
    """`replicas` of each stage of fault2 on GPU 0 (the host: -1), MPS shares or green groups."""
    cfg = load_pipeline(PIPELINE, "tiny", FAULTS_DIR)
    total = replicas * len(cfg.stages)
    stages = []
    k = 0
    for s in cfg.stages:
        entries = []
        for _ in range(replicas):
            entry: dict[str, Any] = {"node": "local", "gpu": 0 if backend == "cuda" else -1}
            if sharing == "mps":  # green and green-mps: disjoint SM groups
                entry["sm_percent"] = max(1, 100 // total)
            else:
                entry["sm_groups"] = list(range(k, k + groups_per_replica))
                k += groups_per_replica
            entries.append(entry)
        stages.append({"pipeline": PIPELINE, "stage": s.name, "replicas": entries})
    return {"stages": stages}


async def start(
    run_dir: Path, backend: str, sharing: str, replicas: int, groups_per_replica: int
) -> FaultMesh:
    fm = FaultMesh(Mesh(run_dir), pipeline=PIPELINE)
    env = fm.mesh.env
    # Only the replicas are clients of the GPU's MPS server: a fatal fault is reported to every
    # client of the server, which takes no new one until all have exited, so a broker or a
    # gateway among them would be lost with the replicas and hold the server's recovery. They
    # (and green replicas) get contexts of their own: a pipe directory with no daemon behind
    # it, as the agent gives time-sliced replicas; the agent finds the daemon through its own
    # setting (CAMELOT_MPS_PIPE_DIR) and hands it to MPS replicas alone.
    daemon = env.get("CAMELOT_MPS_PIPE_DIR") or env.get("CUDA_MPS_PIPE_DIRECTORY", "")
    if daemon:
        env["CAMELOT_MPS_PIPE_DIR"] = daemon
    no_mps = run_dir / "no-mps"
    no_mps.mkdir(exist_ok=True)
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(no_mps)
    # the agent manages an MPS daemon on the GPU (it uses one that answers already, and then
    # can only report a server stuck in FAULT); the host backend decides as under MPS, no daemon
    mps = "manage" if backend == "cuda" and sharing in ("mps", "green-mps") else "off"
    plan_file = run_dir / "plan.json"
    plan_file.write_text(json.dumps(plan(backend, sharing, replicas, groups_per_replica)))
    try:
        await start_planned(
            fm, backend, "tiny", "static", {"file": str(plan_file)},
            share_mode=sharing.removesuffix("-mps"), mps=mps, pipelines_dir=str(FAULTS_DIR),
        )  # fmt: skip
        await wait_routed(fm.gateway, [PIPELINE], timeout_s=300, procs=fm.mesh.procs)
    except BaseException:
        await fm.stop()
        raise
    return fm


async def replicas(agent: str) -> list[plan_pb2.Endpoint]:
    async with lifecycle.channel(agent) as ch:
        status = await agent_pb2_grpc.AgentStub(ch).Status(
            agent_pb2.AgentStatusRequest(), timeout=5
        )
    return list(status.replicas)


def query_input(poisoned: bool, rng: np.random.Generator) -> Any:
    item = rng.integers(0, 250, 4096, dtype=np.uint8)
    return wire_from_array(poison_input(item) if poisoned else item)


async def submit(gateway: str, item: Any, timeout_s: float) -> tuple[str, str]:
    """(status name, message) of one query through the gateway."""
    async with lifecycle.channel(gateway) as ch:
        try:
            await gateway_pb2_grpc.GatewayStub(ch).Submit(
                gateway_pb2.SubmitRequest(pipeline=PIPELINE, input=item), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details() or ""
    return "OK", ""


async def poison_and_recover(
    fm: FaultMesh, at_s: float, deadline_s: float, recover_s: float
) -> dict[str, Any]:
    """Sends the poisoned query at `at_s`, then waits for the mesh to serve again by itself."""
    await asyncio.sleep(at_s)
    rng = np.random.default_rng(7)
    before = {ep.replica.replica_id: ep.restarts for ep in await replicas(fm.agent)}
    t0 = time.monotonic()
    status, message = await submit(fm.gateway, query_input(True, rng), deadline_s)
    answered_s = time.monotonic() - t0
    recovered = False
    restarted: list[str] = []
    while time.monotonic() - t0 < recover_s:
        eps = await replicas(fm.agent)
        restarted = sorted(
            ep.replica.replica_id
            for ep in eps
            if ep.restarts > before.get(ep.replica.replica_id, 0)
        )
        if restarted and len(eps) == len(before) and all(ep.state == READY for ep in eps):
            ok, _ = await submit(fm.gateway, query_input(False, rng), deadline_s)
            if ok == "OK":
                recovered = True
                break
        await asyncio.sleep(0.05)
    return {
        "poison_status": status,
        "poison_message": message,
        "poison_answered_s": round(answered_s, 3),
        "recovered": recovered,
        "recovery_s": round(time.monotonic() - t0, 3) if recovered else None,
        "replicas_restarted": restarted,
        "replicas_planned": len(before),
    }


async def run(
    fm: FaultMesh,
    sharing: str,
    rate_qps: float,
    duration_s: float,
    deadline_s: float = 2.0,
    recover_s: float = 60.0,
    settle_s: float = 30.0,
    seed: int = 0,
) -> dict[str, Any]:
    """One poisoned query under load; the row of the result table."""
    base, _ = await settle(fm.broker_tcp, settle_s)
    schedule = traces.poisson(rate_qps, duration_s, np.random.default_rng(seed))
    fault = asyncio.create_task(poison_and_recover(fm, duration_s / 3, deadline_s, recover_s))
    try:
        result = await run_open_loop(
            fm.gateway, schedule, uniform_mix([PIPELINE]), seed, deadline_s, duration_s=duration_s
        )
        info = await fault
    finally:
        if not fault.done():
            fault.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fault
    after, local = await settle(fm.broker_tcp, settle_s, fm.gateway)
    counted = count(result, deadline_s, len(schedule))
    row: dict[str, Any] = {
        "sharing": sharing,
        **info,
        "rate_qps": rate_qps,
        "duration_s": duration_s,
        "deadline_s": deadline_s,
        **counted,
        "failed_queries": counted["failed_by_code"],
        "leases_leaked": after.live_leases + local,
        "baseline_leases": base.live_leases,
    }
    log.info("GPU fault (%s): %s", sharing, row)
    return row


COLUMNS = [
    "sharing", "poison_status", "recovered", "recovery_s", "replicas_restarted", "queries_sent",
    "succeeded", "failed_queries", "queries_lost", "leases_leaked",
]  # fmt: skip


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    failed: dict[str, int] = {}
    for r in rows:
        for code, n in r["failed_queries"].items():
            failed[code] = failed.get(code, 0) + n
    times = [r["recovery_s"] for r in rows if r["recovery_s"] is not None]
    out: dict[str, Any] = {
        "recovered": bool(rows) and all(r["recovered"] for r in rows),
        "recovery_s": max(times) if times else None,
        "failed_queries": dict(sorted(failed.items())),
        "leases_leaked": sum(r["leases_leaked"] for r in rows),
        "poison_internal": all(r["poison_status"] == "INTERNAL" for r in rows),
        "queries_lost": sum(r["queries_lost"] for r in rows),
    }
    for r in rows:
        out[f"{r['sharing']}.recovery_s"] = r["recovery_s"]
    return out


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for i, sharing in enumerate(args.sharing or ["mps"]):
        if args.run_dir:  # kept: the processes' logs say how the fault went
            run_dir = Path(args.run_dir) / sharing
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"camelot-gpu-faults-{sharing}-"))
        fm = await start(run_dir, args.backend, sharing, args.replicas, args.groups_per_replica)
        try:
            rows.append(
                await run(fm, sharing, args.rate, args.duration_s, args.deadline_s,
                          args.recover_s, seed=i)
            )  # fmt: skip
        finally:
            await fm.stop()
    return {"rows": rows, "summary": summarize(rows)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadgen.gpu_faults", description=__doc__.split("\n")[0]
    )
    p.add_argument("--backend", choices=("cuda", "host"), default="cuda")
    p.add_argument(
        "--sharing", action="append", choices=SHARINGS, help="mps, green, green-mps (repeatable)"
    )
    p.add_argument("--replicas", type=int, default=2, help="replicas of each stage on the GPU")
    p.add_argument("--groups-per-replica", type=int, default=2, help="green SM groups each")
    p.add_argument("--rate", type=float, default=100.0, help="Poisson arrivals per second")
    p.add_argument("--duration-s", type=float, default=20.0, help="load per run")
    p.add_argument("--deadline-s", type=float, default=2.0, help="per-query gRPC deadline")
    p.add_argument("--recover-s", type=float, default=60.0, help="the bound on recovery")
    p.add_argument(
        "--run-dir", default="",
        help="the meshes' folder, one per --sharing, kept with their logs (default: temporary)",
    )  # fmt: skip
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--name", default="gpu-faults", help="the result's file name")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    doc = asyncio.run(_main(args))
    write_result(
        args.name,
        doc["rows"],
        doc["summary"],
        args.backend,
        args.out_dir,
        COLUMNS,
        command=module_command(
            "loadgen.gpu_faults", list(argv if argv is not None else sys.argv[1:])
        ),
        notes=NOTES,
    )
    json.dump(doc["summary"], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if doc["summary"]["recovered"] and doc["summary"]["leases_leaked"] == 0 else 1


NOTES = """\
Each row: a Poisson load on `fault2` (stage a hands the input on, stage b is the fault plug-in),
`--replicas` replicas of each stage on one GPU; a third of the way in, one poisoned query makes a
stage-b replica fault (on CUDA a kernel writing through an invalid pointer). `recovery_s` runs
from sending it to the first good answer once every planned replica is READY again;
`failed_queries` are the load's failures by status; `leases_leaked` the broker's live leases and
the gateway's local ones after the load. See docs/RELIABILITY.md, "Fatal GPU faults".
"""


if __name__ == "__main__":
    sys.exit(main())
