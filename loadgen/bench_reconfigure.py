"""Benchmark: changing a stage's SM share under steady load, MPS shadow replacement against an
in-place green-context resize, side by side.

For each mode it starts a broker, a node agent in that share mode and a gateway following the
agent's routes; applies a plan with one replica per stage; runs open-loop Poisson load; and, a
third of the way in and then every few seconds, applies a plan that changes one stage's share.
It records per change the time from the Apply call to the new share being in effect (Apply
returns once the new replica serves and traffic moved, or once the in-place resize committed),
the multiprocessors the replica then reports, the p99 of queries sent during the change, and
every query that failed over the whole run.

    python -m loadgen.bench_reconfigure --backend cuda --size full --out docs/results
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import lifecycle
from common.results import module_command, write_result
from loadgen.inputs import Mix
from loadgen.openloop import run_open_loop
from loadgen.traces import poisson
from protos import agent_pb2, agent_pb2_grpc, plan_pb2, stage_pb2, stage_pb2_grpc
from services.launcher import Mesh, free_port, wait_healthy

STAGES = {"img-to-text": ("preprocess", "encode", "decode")}


def assignment(
    epoch: int, mode: str, pipeline: str, shares: dict[str, Any], node: str, gpu: int
) -> agent_pb2.Assignment:
    """shares: stage -> percent (mps) or tuple of group indices (green)."""
    a = agent_pb2.Assignment(epoch=epoch, node=node)
    for stage, share in shares.items():
        rp = plan_pb2.ReplicaPlan(
            replica_id=f"{pipeline}.{stage}.0", node=node, gpu=gpu, max_batch=16, max_wait_us=2000
        )
        if mode == "green":
            rp.mode = plan_pb2.SHARE_MODE_GREEN
            rp.sm_groups.extend(share)
            rp.sm_percent = 100.0
        else:
            rp.mode = plan_pb2.SHARE_MODE_MPS
            rp.sm_percent = float(share)
        a.replicas.append(plan_pb2.Endpoint(replica=rp, pipeline=pipeline, stage=stage))
    return a


async def multiprocessors(address: str) -> int:
    async with lifecycle.channel(address) as ch:
        d = await stage_pb2_grpc.StageStub(ch).Describe(stage_pb2.DescribeStageRequest(), timeout=5)
    return int(d.multiprocessors)


async def run_mode(mode: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    pipeline, target_stage = args.pipeline, args.stage
    plans: list[dict[str, Any]]
    if mode == "green":
        plans = [
            {"preprocess": (0, 1), "encode": (2, 3, 4, 5), "decode": (6, 7, 8, 9)},
            {"preprocess": (0, 1), "encode": (2, 3, 4, 5, 10, 11, 12, 13), "decode": (6, 7, 8, 9)},
        ]
    else:
        plans = [
            {"preprocess": 15, "encode": 30, "decode": 30},
            {"preprocess": 15, "encode": 60, "decode": 30},
        ]
    mesh = Mesh(run_dir / mode)
    node = "bench"
    gpu = 0 if args.backend == "cuda" else -1
    try:
        sock = str(mesh.run_dir / "broker.sock")
        bport = free_port()
        broker = mesh.python(
            "broker",
            "shmbroker",
            ["--port", str(bport), "--socket", sock, "--backend", args.backend],
        )
        await wait_healthy(f"127.0.0.1:{bport}", 60, broker)
        aport = free_port()
        agent = mesh.python(
            "agent",
            "services.agent",
            ["--node", node, "--port", str(aport), "--broker", f"unix:{sock}",
             "--backend", args.backend, "--share-mode", mode if args.backend == "cuda" else "none",
             "--mps", "external" if args.backend == "cuda" else "off",
             "--run-dir", str(mesh.run_dir), "--size", args.size, "--shift-s", "0.5"]
            + (["--mps-pipe-dir", os.environ["CUDA_MPS_PIPE_DIRECTORY"]]
               if "CUDA_MPS_PIPE_DIRECTORY" in os.environ else []),
        )  # fmt: skip
        agent_addr = f"127.0.0.1:{aport}"
        await wait_healthy(agent_addr, 120, agent)
        gport = free_port()
        gateway = mesh.python(
            "gateway",
            "services.gateway",
            ["--port", str(gport), "--broker", f"unix:{sock}", "--agent", agent_addr,
             "--backend", args.backend, "--size", args.size],
        )  # fmt: skip
        gw = f"127.0.0.1:{gport}"
        await wait_healthy(gw, 120, gateway)
        async with lifecycle.channel(agent_addr) as ch:
            stub = agent_pb2_grpc.AgentStub(ch)
            first = assignment(1, mode, pipeline, plans[0], node, gpu)
            await stub.Apply(first, timeout=600)
            # warm: a few queries through the whole pipeline
            await run_open_loop(
                gw, poisson(20, 2, np.random.default_rng(0)), Mix(((pipeline, 1.0),)), 0, 30
            )
            rng = np.random.default_rng(1)
            schedule = poisson(args.rate, args.duration_s, rng)
            load = asyncio.create_task(
                run_open_loop(
                    gw,
                    schedule,
                    Mix(((pipeline, 1.0),)),
                    1,
                    30,
                    duration_s=args.duration_s,
                    progress=f"{mode}: load while re-planning",
                )  # fmt: skip
            )
            changes = []
            t_start = time.monotonic()
            await asyncio.sleep(args.duration_s / 3)
            epoch = 1
            while time.monotonic() - t_start < args.duration_s - args.settle_s:
                epoch += 1
                plan = plans[epoch % 2]
                t0 = time.monotonic()
                t0_us = time.monotonic_ns() // 1000
                reply = await stub.Apply(
                    assignment(epoch, mode, pipeline, plan, node, gpu), timeout=600
                )
                apply_s = time.monotonic() - t0
                t1_us = time.monotonic_ns() // 1000
                address = next(
                    e.address for e in reply.endpoints
                    if e.stage == target_stage and e.state == plan_pb2.REPLICA_STATE_READY
                )  # fmt: skip
                changes.append(
                    {
                        "mode": mode,
                        "epoch": epoch,
                        "share": list(plan[target_stage])
                        if mode == "green"
                        else plan[target_stage],
                        "apply_s": apply_s,
                        "agent_apply_us": reply.apply_us,
                        "multiprocessors": await multiprocessors(address),
                        "window_us": (t0_us, t1_us),
                    }
                )
                await asyncio.sleep(args.settle_s)
            result = await load
        records = result.records
        failed = [r for r in records if not r.ok]
        rows = []
        for c in changes:
            lo, hi = c.pop("window_us")
            during = [
                r.latency_us for r in records if lo <= r.intended_us <= hi + 1_000_000 and r.ok
            ]
            c["p99_during_ms"] = float(np.percentile(during, 99)) / 1e3 if during else None
            c["queries_during"] = len(during)
            rows.append(c)
        ok_lat = [r.latency_us for r in records if r.ok]
        return {
            "rows": rows,
            "sent": len(records),
            "failed": len(failed),
            "failed_codes": sorted({r.status for r in failed}),
            "p99_ms": float(np.percentile(ok_lat, 99)) / 1e3 if ok_lat else None,
        }
    finally:
        await mesh.stop_all()


async def amain(args: argparse.Namespace) -> int:
    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    dropped = 0
    with tempfile.TemporaryDirectory(prefix="camelot-reconf-") as tmp:
        for mode in modes:
            out = await run_mode(mode, args, Path(args.run_dir or tmp))
            rows += out["rows"]
            dropped += out["failed"]
            summary[f"{mode}.sent"] = out["sent"]
            summary[f"{mode}.failed"] = out["failed"]
            summary[f"{mode}.failed_codes"] = out["failed_codes"]
            summary[f"{mode}.p99_ms_whole_run"] = out["p99_ms"]
            applies = [r["apply_s"] for r in out["rows"]]
            if applies and mode == "mps":
                summary["mps_apply_s_p50"] = float(np.median(applies))
            if applies and mode == "green":
                summary["green_apply_ms_p50"] = float(np.median(applies)) * 1e3
                summary["green_resize_us_p50"] = float(
                    np.median([r["agent_apply_us"] for r in out["rows"]])
                )
    summary["dropped_requests"] = dropped
    probe = Path(args.out) / "green-probe.json"
    if probe.exists():
        import json

        frac = (
            json.loads(probe.read_text()).get("summary", {}).get("green_disjoint_min_solo_fraction")
        )
        if frac is not None:
            summary["green_disjoint_min_solo_fraction"] = frac
    write_result(
        "reconfigure",
        rows,
        summary,
        args.backend,
        args.out,
        command=module_command("loadgen.bench_reconfigure", sys.argv[1:]),
    )
    print({k: v for k, v in summary.items()})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_reconfigure", description=__doc__)
    p.add_argument("--backend", default="cuda", choices=("cuda", "host"))
    p.add_argument("--size", default="full", choices=("tiny", "full"))
    p.add_argument("--modes", default="mps,green")
    p.add_argument("--pipeline", default="img-to-text", choices=sorted(STAGES))
    p.add_argument("--stage", default="encode")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--settle-s", type=float, default=4.0)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--run-dir", default="", help="keep logs here (default: a temporary folder)")
    args = p.parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
