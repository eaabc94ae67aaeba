"""End-to-end latency per pipeline, `ref` transport against `wire`, side by side at low load.

    python -m loadgen.bench_e2e [--target 127.0.0.1:50052] [--rate 5 --duration 20 --rounds 3]
    python -m loadgen.bench_e2e --launch            # starts the local mesh (as camelot run) first

Without --target or --launch it measures the mesh `camelot up` started (its run directory's
record; CAMELOT_GATEWAY_ADDR names another gateway).

For each pipeline, open-loop trials alternate ref, wire, ref, wire ... (`--rounds` pairs), so
both transports see the same machine state; each transport's records are pooled over its rounds.
Writes docs/results/e2e.json and e2e.md: rows (pipeline, transport, p50_ms, p99_ms, count,
errors), where the median query's time went (`*_ms` parts, below) and summary
`<pipeline>.wire_over_ref_p50`.

Each query's latency splits into parts (the rows give each part's median over successful
queries, so they add up to about the median latency): `client_ms` (the
client's send and receive outside the gateway), `gateway_ms` (the gateway's own work: lease,
input copy, output copy), `hops_ms` (stage round trips outside the replicas' queue, batch and
compute: gRPC, (de)serialization, the replica's buffer allocation and views), `waiting_ms`
(queue and batch wait inside the replicas) and `compute_ms`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import label as backend_label
from common.meshrecord import resolve as mesh_target
from common.progress import step
from common.results import module_command, run_main, write_result
from loadgen import tails, traces
from loadgen.inputs import Mix
from loadgen.openloop import list_pipelines, run_open_loop
from loadgen.records import Record, stats_of
from services.launcher import Mesh
from services.localmesh import start_mesh

log = logging.getLogger(__name__)

TRANSPORTS = ("ref", "wire")
COLUMNS = [
    "pipeline", "transport", "p50_ms", "p99_ms", "count", "errors",
    "client_ms", "gateway_ms", "hops_ms", "waiting_ms", "compute_ms",
]  # fmt: skip


def breakdown(records: Sequence[Record]) -> dict[str, float | None]:
    """Median milliseconds of each part of a successful query's latency (`tails.split_us`; the
    client's part here includes its lag behind the timeline)."""
    splits = [tails.split_us(r) for r in records if r.ok]
    parts = {
        "client_ms": [s["lag"] + s["client"] for s in splits],
        **{f"{k}_ms": [s[k] for s in splits] for k in ("gateway", "hops", "waiting", "compute")},
    }
    return {k: float(np.median(v)) / 1000.0 if v else None for k, v in parts.items()}


async def measure(
    target: str,
    pipelines: Sequence[str] | None = None,
    *,
    rate_qps: float = 5.0,
    duration_s: float = 10.0,
    warmup_s: float = 1.0,
    rounds: int = 1,
    seed: int = 0,
    deadline_s: float = 10.0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and summary of the e2e comparison (no files written)."""
    served = await list_pipelines(target, deadline_s)
    names = list(pipelines) if pipelines else sorted(served)
    Mix(tuple((n, 1.0) for n in names)).check_served(list(served))
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for name in names:
        kept: dict[str, list[Record]] = {t: [] for t in TRANSPORTS}
        for r in range(rounds):
            for transport in TRANSPORTS:
                schedule = traces.poisson(rate_qps, duration_s, rng)
                result = await run_open_loop(
                    target, schedule, Mix(((name, 1.0),)), seed + r, deadline_s,
                    transport=transport, pipelines=served, duration_s=duration_s,
                    progress=f"{name} {transport} {r + 1}/{rounds}",
                )  # fmt: skip
                kept[transport] += result.measured(warmup_s)
        span = max(duration_s - warmup_s, 1e-9) * rounds
        p50: dict[str, float | None] = {}
        for transport in TRANSPORTS:
            s = stats_of(kept[transport], span)
            p50[transport] = s["p50_ms"]
            rows.append(
                {"pipeline": name, "transport": transport, "p50_ms": s["p50_ms"],
                 "p99_ms": s["p99_ms"], "count": s["count"], "errors": s["errors"],
                 **breakdown(kept[transport]), "p999_ms": s["p999_ms"], "max_ms": s["max_ms"],
                 "error_codes": s["error_codes"]}
            )  # fmt: skip
        ref, wire = p50["ref"], p50["wire"]
        summary[f"{name}.wire_over_ref_p50"] = wire / ref if ref and wire is not None else None
    return rows, summary


async def launched(stack: AsyncExitStack, backend: str, size: str, policy: str) -> str:
    """Starts the local mesh (as `camelot run` does) in a scratch folder: the gateway target.
    `size` "" is full on cuda, tiny on host. The stack stops it."""
    size = size or ("full" if backend == "cuda" else "tiny")
    run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="camelot-e2e-")))
    mesh = Mesh(run_dir)
    stack.push_async_callback(mesh.stop_all)
    info = await start_mesh(mesh, backend, size, policy, say=step)
    return str(info["gateway"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_e2e", description=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", help="a running gateway, host:port (default: the mesh's)")
    where.add_argument("--launch", action="store_true", help="start the local mesh first")
    p.add_argument("--pipelines", default="", help="comma list (default: every served one)")
    p.add_argument("--rate", type=float, default=5.0, help="queries/s per trial (low load)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per trial")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="ref/wire pairs per pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=10.0)
    p.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    p.add_argument("--size", choices=["tiny", "full"], default="", help="with --launch "
                   "(default: full on cuda, tiny on host)")  # fmt: skip
    p.add_argument("--policy", default="exclusive", help="with --launch: the scheduler's policy")
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--name", default="e2e")
    return p


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    backend = backend_label(args.backend)
    async with AsyncExitStack() as stack:
        if args.launch:
            target = await launched(stack, backend, args.size, args.policy)
        else:
            target, _ = mesh_target(("--target", args.target), "CAMELOT_GATEWAY_ADDR", "gateway")
        rows, summary = await measure(
            target,
            [p for p in args.pipelines.split(",") if p] or None,
            rate_qps=args.rate,
            duration_s=args.duration,
            warmup_s=args.warmup_s,
            rounds=args.rounds,
            seed=args.seed,
            deadline_s=args.deadline_s,
        )
    return write_result(
        args.name,
        rows,
        summary,
        backend,
        args.out_dir,
        COLUMNS,
        command=module_command("loadgen.bench_e2e", argv),
        notes=f"Open loop, Poisson at {args.rate:g} queries/s, {args.duration:g} s per trial, "
        f"{args.rounds} ref/wire round(s); latency from the intended send time.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
