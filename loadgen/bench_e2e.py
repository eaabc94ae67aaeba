"""End-to-end latency per pipeline, `ref` transport against `wire`, side by side at low load.

    python -m loadgen.bench_e2e --target 127.0.0.1:50052 [--rate 5 --duration 20 --rounds 3]
    python -m loadgen.bench_e2e --launch            # starts the local mesh (services.cli) first

For each pipeline, open-loop trials alternate ref, wire, ref, wire ... (`--rounds` pairs), so
both transports see the same machine state; each transport's records are pooled over its rounds.
Writes docs/results/e2e.json and e2e.md: rows (pipeline, transport, p50_ms, p99_ms, count,
errors) and summary `<pipeline>.wire_over_ref_p50`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import cuda_available
from common.results import module_command, write_result
from loadgen import traces
from loadgen.inputs import Mix
from loadgen.openloop import Record, list_pipelines, run_open_loop, stats_of

log = logging.getLogger(__name__)

TRANSPORTS = ("ref", "wire")
COLUMNS = ["pipeline", "transport", "p50_ms", "p99_ms", "count", "errors"]


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
                 "p999_ms": s["p999_ms"], "max_ms": s["max_ms"], "error_codes": s["error_codes"]}
            )  # fmt: skip
        ref, wire = p50["ref"], p50["wire"]
        summary[f"{name}.wire_over_ref_p50"] = wire / ref if ref and wire is not None else None
    return rows, summary


async def _launched(stack: AsyncExitStack, backend: str) -> str:
    """Starts the local mesh through `services.cli.local_mesh(backend=...)`: the gateway target."""
    cli = importlib.import_module("services.cli")
    local_mesh = getattr(cli, "local_mesh", None)
    if local_mesh is None:
        raise SystemExit("services.cli has no local_mesh(); start the mesh and pass --target")
    return str(await stack.enter_async_context(local_mesh(backend=backend)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_e2e", description=__doc__)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a running gateway, host:port")
    where.add_argument("--launch", action="store_true", help="start the local mesh first")
    p.add_argument("--pipelines", default="", help="comma list (default: every served one)")
    p.add_argument("--rate", type=float, default=5.0, help="queries/s per trial (low load)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per trial")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="ref/wire pairs per pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=10.0)
    p.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--name", default="e2e")
    return p


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    backend = args.backend
    if backend == "auto":
        backend = "cuda" if cuda_available() else "host"
    async with AsyncExitStack() as stack:
        target = args.target or await _launched(stack, backend)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    json_path, md_path = asyncio.run(run(args, argv))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
