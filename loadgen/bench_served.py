"""Every pipeline of some folders served together at low load: does each one answer, and how fast.

    python -m loadgen.bench_served --backend cuda --size full --name torch-e2e \\
        --from services/pipelines --from services/pipelines/torch

The configs of every `--from` folder (default: the bundled pipelines and the torch ones) go into
one folder, and one mesh of real processes serves them all on this node's GPU
(`hostladder.mesh_for`: redis, broker, scheduler, agent, replicas, gateway) under `--policy`
(default `even`: every stage on the GPU with an equal SM share, a plan that needs no profile, so
a pipeline never profiled is served too). It is loaded open-loop (Poisson) with
`--per-pipeline-qps` for each pipeline for `--duration-s`, after a warm-up that is not measured.

One row per pipeline: queries, errors (by code), p50/p99/max from the intended send time, and
`gpu_ms_per_query`, the median over its answered queries of the compute its replicas timed
(summed over its stages; at this load nearly every batch holds one query, so it is the GPU time
of one query). `suggested_qos_p99_ms` applies the rule the pipelines' targets follow: `--qos-factor`
(2.5) times this low-load p99, rounded up to `--qos-round-ms` (5). Summary: `pipelines_served`
(pipelines with answers and no error), `errors` (all pipelines), and per pipeline its p99.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import label as backend_label
from common.errors import InvalidArgument
from common.results import module_command, run_main, write_result
from contract.pipeline_config import bundled_dirs, gather_configs
from loadgen import traces
from loadgen.bench_host import relative
from loadgen.hostladder import Workload, mesh_for
from loadgen.openloop import list_pipelines as served_pipelines
from loadgen.openloop import run_open_loop
from loadgen.records import Record, stats_of

COLUMNS = [
    "pipeline", "qos_p99_ms", "count", "errors", "p50_ms", "p99_ms", "max_ms",
    "gpu_ms_per_query", "suggested_qos_p99_ms",
]  # fmt: skip
DEFAULT_FROM = bundled_dirs()


def suggested_qos(p99_ms: float | None, factor: float, round_ms: float) -> float | None:
    if p99_ms is None:
        return None
    return math.ceil(factor * p99_ms / round_ms) * round_ms


def pipeline_row(
    name: str, records: Sequence[Record], qos_ms: float, factor: float, round_ms: float
) -> dict[str, Any]:
    mine = [r for r in records if r.pipeline == name]
    stats = stats_of(mine, 0.0)
    compute = [r.compute_us for r in mine if r.ok]
    gpu = float(np.median(compute)) / 1000.0 if compute else None
    return {
        "pipeline": name,
        "qos_p99_ms": qos_ms,
        **{k: stats[k] for k in ("count", "errors", "error_codes", "p50_ms", "p99_ms", "max_ms")},
        "gpu_ms_per_query": None if gpu is None else round(gpu, 3),
        "suggested_qos_p99_ms": suggested_qos(stats["p99_ms"], factor, round_ms),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    served = [r for r in rows if r["count"] > r["errors"] == 0]
    return {
        "pipelines": len(rows),
        "pipelines_served": len(served),
        "errors": sum(r["errors"] for r in rows),
        **{f"{r['pipeline']}_p99_ms": r["p99_ms"] for r in rows},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_served", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--from", dest="folders", action="append", default=[],
        help="a folder of pipeline configs (repeat; default: bundled and torch)",
    )  # fmt: skip
    p.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--policy", default="even")
    p.add_argument("--per-pipeline-qps", type=float, default=5.0)
    p.add_argument("--duration-s", type=float, default=60.0, help="measured, after the warm-up")
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--deadline-s", type=float, default=5.0, help="per query")
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--gateway-workers", type=int, default=2)
    p.add_argument("--qos-factor", type=float, default=2.5)
    p.add_argument("--qos-round-ms", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="", help="keep the mesh's folder and logs here")
    p.add_argument("--note", default="")
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--name", default="served")
    return p


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    if not args.per_pipeline_qps > 0 or not args.duration_s > 0 or args.warmup_s < 0:
        raise InvalidArgument("need --per-pipeline-qps > 0, --duration-s > 0, --warmup-s >= 0")
    backend = backend_label(args.backend)
    folders = args.folders or [str(d) for d in DEFAULT_FROM]
    with ExitStack() as stack:
        configs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="camelot-cfg-")))
        names = gather_configs(folders, configs)
        workload = Workload(args.name, tuple(names), str(configs), args.size, args.policy)
        rate = args.per_pipeline_qps * len(names)
        total_s = args.warmup_s + args.duration_s
        async with mesh_for(workload, backend, args.gateway_workers, args.run_dir) as (
            target,
            _roots,
            _broker,
        ):
            served = await served_pipelines(target, 30.0)
            workload.mix.check_served(list(served))
            schedule = traces.poisson(rate, total_s, np.random.default_rng(args.seed))
            result = await run_open_loop(
                target, schedule, workload.mix, args.seed, args.deadline_s, pipelines=served,
                connections=args.connections, duration_s=total_s,
                processes=args.client_processes,
            )  # fmt: skip
        t0 = result.t0_us + int(args.warmup_s * 1e6)
        measured = [r for r in result.records if r.intended_us >= t0]
        rows = [
            pipeline_row(
                n, measured, float(served[n].qos_p99_ms), args.qos_factor, args.qos_round_ms
            )
            for n in names
        ]
    notes = (
        f"{len(names)} pipelines ({', '.join(names)}) from {', '.join(map(relative, folders))}, "
        f"size {args.size}, one mesh under `{args.policy}`, {args.per_pipeline_qps:g} queries/s "
        f"each (open-loop Poisson), {args.duration_s:g} s measured after {args.warmup_s:g} s of "
        f"warm-up; latency from the intended send time. gpu_ms_per_query: the median compute the "
        f"replicas timed, summed over a query's stages. suggested_qos_p99_ms: "
        f"{args.qos_factor:g} x p99, rounded up to {args.qos_round_ms:g} ms."
    )
    if args.note:
        notes += f"\n\n{args.note}"
    return write_result(
        args.name, rows, summarize(rows), backend, args.out_dir, COLUMNS,
        command=module_command("loadgen.bench_served", argv), notes=notes,
        extra={"settings": {k: v for k, v in vars(args).items() if k != "folders"}
               | {"folders": [relative(f) for f in folders]}},
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
