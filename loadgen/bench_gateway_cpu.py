"""Gateway CPU per query: the host cost that caps a mesh whose single gateway process is its
busiest (see docs/RESULTS.md, peak load). Open-loop Poisson load on one pipeline at a few rates;
the gateway's CPU time (all its threads, /proc) over the trial, divided by the queries sent.

    python -m loadgen.bench_gateway_cpu --launch            # local mesh, host backend, tiny
    python -m loadgen.bench_gateway_cpu --target HOST:PORT --rates 50,150,250
    python -m loadgen.bench_gateway_cpu                     # the mesh `camelot up` started

The load generator shares the machine; on a 2-core host the figures carry that noise, so each
rate runs `--rounds` times and rows keep every round. Writes gateway-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import label as backend_label
from common.meshrecord import resolve as mesh_target
from common.results import module_command, run_main, write_result
from loadgen import traces
from loadgen.bench_e2e import launched
from loadgen.inputs import Mix
from loadgen.openloop import list_pipelines, run_open_loop
from loadgen.records import stats_of
from loadgen.utilization import UtilizationSampler

COLUMNS = ["rate_qps", "round", "queries", "errors", "p50_ms", "p99_ms", "gateway_cpu_ms_per_query"]


async def measure(
    target: str,
    pipeline: str,
    rates: Sequence[float],
    duration_s: float,
    rounds: int,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    served = await list_pipelines(target, 10.0)
    mix = Mix(((pipeline, 1.0),))
    mix.check_served(list(served))
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        for rate in rates:
            schedule = traces.poisson(rate, duration_s, rng)
            async with UtilizationSampler(every_s=0.25) as util:
                result = await run_open_loop(
                    target, schedule, mix, seed + r, 10.0, pipelines=served,
                    duration_s=duration_s, progress=f"{rate:g} qps {r + 1}/{rounds}",
                )  # fmt: skip
            s = stats_of(result.records, duration_s)
            pct = util.summary().get("cpu_pct.gateway")
            per_query = (
                pct / 100.0 * duration_s * 1000.0 / s["count"] if pct and s["count"] else None
            )
            rows.append(
                {"rate_qps": rate, "round": r, "queries": s["count"], "errors": s["errors"],
                 "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
                 "gateway_cpu_ms_per_query": round(per_query, 3) if per_query else None,
                 "gateway_cpu_pct": pct}
            )  # fmt: skip
    summary: dict[str, Any] = {}
    for rate in rates:
        got = [x["gateway_cpu_ms_per_query"] for x in rows if x["rate_qps"] == rate]
        got = [g for g in got if g is not None]
        summary[f"gateway_cpu_ms_per_query.{rate:g}qps"] = (
            round(statistics.median(got), 3) if got else None
        )
    return rows, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_gateway_cpu", description=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--target", help="a running gateway, host:port (on this machine; default: the mesh's)"
    )
    where.add_argument("--launch", action="store_true", help="start the local mesh first")
    p.add_argument("--pipeline", default="text-to-img")
    p.add_argument("--rates", default="50,150,250", help="queries/s, comma list")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per trial")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backend", choices=["auto", "host", "cuda"], default="host")
    p.add_argument("--size", choices=["tiny", "full"], default="")
    p.add_argument("--out-dir", default="docs/results")
    return p


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    backend = backend_label(args.backend)
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    async with AsyncExitStack() as stack:
        if args.launch:
            target = await launched(stack, backend, args.size, "even")
        else:
            target, _ = mesh_target(("--target", args.target), "CAMELOT_GATEWAY_ADDR", "gateway")
        rows, summary = await measure(target, args.pipeline, rates, args.duration, args.rounds)
    return write_result(
        "gateway-cpu", rows, summary, backend, args.out_dir, COLUMNS,
        command=module_command("loadgen.bench_gateway_cpu", argv),
        notes=f"{args.pipeline}, Poisson, {args.duration:g} s per trial; gateway CPU from "
        "/proc (all its threads) over the trial, per query sent.",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
