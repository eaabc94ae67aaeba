"""The host path's cost: how many queries a mesh of null stages carries, and what each one costs
in host CPU per process kind. The benchmark of issue 23, for the data plane's before and after.

    python -m loadgen.bench_host                          # null1, null3, null-dag; best backend
    python -m loadgen.bench_host --pipelines null3 --rates 500,1000,2000 --backend host
    python -m loadgen.bench_host --reference --backend cuda   # the four full pipelines, exclusive

It knows nothing of the data plane's insides: for each workload it starts a whole mesh of real
processes (`services.localmesh.start_mesh`: redis, broker, scheduler, agent and its replicas,
gateway with `--gateway-workers` workers), drives it through the gateway's public `Submit` with
open-loop Poisson arrivals from `--client-processes` processes (`loadgen.clients`), at each rate
of `--rates` in turn, and stops it.

- Null mode (default): each pipeline of services/pipelines/null (`null1`: one stage, `null3`: a
  three-stage chain, `null-dag`: the DAG of video-analytics; 4 KiB tensors, the null model of
  services/models/null.py, which does no arithmetic) in a mesh of its own, under `even` (one
  replica per stage), at size tiny; a rate holds when its p99 is <= `--p99-ms` (25).
- `--reference`: the bundled pipelines (default all four) in one mesh, at size full under
  `exclusive` (`even` on the host backend, which has no GPUs to deal), loaded as an equal mix;
  a rate holds when every pipeline's p99 is within its own QoS target (or `--p99-ms`).

A rate also needs errors <= `--max-error-frac`. The ladder stops at the first rate that collapses
(a pipeline's median over its target, or more than 5% errors) or after two missed rates in a row.
Each row: latency (from the intended send time, so the client's lag counts), errors, and host
CPU per query sent, per process kind (`loadgen.hostcost`: gateway, broker, stage and each stage,
scheduler, agent, redis, mps, loadgen), over the trial after its warm-up; `mesh_cpu_ms_per_query`
is every kind but the load generator. Summary per workload: `<w>_max_qps` (the highest rate
held; None where none held), `<w>_cpu_ms_per_query` (mesh CPU per query there),
`<w>_p99_ms_at_max`, and `<w>_collapsed_at_qps`. Writes docs/results/host-path.json and .md
(`--name`, `--out-dir`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from common.backend import label as backend_label
from common.errors import InvalidArgument
from common.results import REPO_ROOT, module_command, run_main, write_result
from common.settings import options_of
from contract.pipeline_config import list_pipelines, pipelines_dir
from loadgen import hostprofile
from loadgen.hostcost import ProcessTree
from loadgen.hostladder import COLUMNS, Trials, Workload, ladder, mesh_for
from services.models.null import PAYLOAD_BYTES

NULL_DIR = pipelines_dir() / "null"
NULL_PIPELINES = ("null1", "null3", "null-dag")
NULL_RATES = "250,500,1000,1500,2000,3000,4000,5000,6000,8000"
REFERENCE_RATES = "50,100,200,300,400,600,800,1200,1600,2400"
P99_MS = 25.0
MAX_INPUT_BYTES = 64 << 20


def summarize(workload: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    rows = [r for r in rows if r["workload"] == workload]
    held = [r for r in rows if r["held"]]
    best = max(held, key=lambda r: r["rate_qps"]) if held else None
    collapsed = [r["rate_qps"] for r in rows if r["collapsed"]]
    return {
        f"{workload}_max_qps": best["rate_qps"] if best else None,
        f"{workload}_cpu_ms_per_query": best["mesh_cpu_ms_per_query"] if best else None,
        f"{workload}_p99_ms_at_max": best["p99_ms"] if best else None,
        f"{workload}_collapsed_at_qps": collapsed[0] if collapsed else None,
        f"{workload}_idle_mesh_cpu_pct": (
            rows[0].get("idle_cpu_pct", {}).get("mesh") if rows else None
        ),
    }


def resized(name: str, nbytes: int, into: Path) -> str:
    """A copy of null pipeline `name`, written into `into`, whose input and every stage's tensor
    are `nbytes` of uint8 (the null model's `inputs` option): `<name>-<nbytes>b`."""
    data = yaml.safe_load((NULL_DIR / f"{name}.yaml").read_text())
    spec = {"name": "x", "dtype": "uint8", "shape": [nbytes]}
    default = {"name": "x", "dtype": "uint8", "shape": [PAYLOAD_BYTES]}
    if any(size.get("input") != default for size in data["sizes"].values()) or any(
        "options" in stage for stage in data["stages"]
    ):
        raise InvalidArgument(
            f"--input-bytes resizes the null pipelines of one {PAYLOAD_BYTES}-byte tensor x "
            f"through every stage (null1, null3), not {name}"
        )
    for size in data["sizes"].values():
        size["input"] = dict(spec)
    for stage in data["stages"]:
        stage["options"] = {"inputs": [dict(spec)]}
    new = data["name"] = f"{name}-{nbytes}b"
    data["description"] = f"{name} with {nbytes}-byte tensors (loadgen.bench_host --input-bytes)"
    (into / f"{new}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return new


def input_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"--input-bytes {text!r} is not a comma list of integers") from None
    if not sizes or any(n < 1 or n > MAX_INPUT_BYTES for n in sizes):
        raise InvalidArgument(
            f"--input-bytes must be sizes in 1..{MAX_INPUT_BYTES} bytes, got {text!r}"
        )
    return sizes


def workloads(
    args: argparse.Namespace, backend: str, scratch: Path | None = None
) -> list[Workload]:
    """The meshes to measure; `--input-bytes` writes its resized null pipelines into `scratch`."""
    options = tuple(options_of(args.option).items())
    names = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    if args.input_bytes and args.reference:
        raise InvalidArgument("--input-bytes resizes null pipelines; --reference has its own")
    if args.reference:
        names = names or list_pipelines()
        # exclusive deals whole GPUs: on the host backend it has nothing to plan with
        policy = args.policy or ("exclusive" if backend == "cuda" else "even")
        return [Workload("reference", tuple(names), "", args.size or "full", policy, options)]
    names = names or list(NULL_PIPELINES)
    unknown = sorted(set(names) - set(list_pipelines(NULL_DIR)))
    if unknown:
        raise InvalidArgument(
            f"not null pipelines: {', '.join(unknown)} (have {', '.join(list_pipelines(NULL_DIR))};"
            " --reference measures the bundled ones)"
        )
    if args.input_bytes:
        sizes = input_sizes(args.input_bytes)
        if scratch is None:
            raise InvalidArgument("--input-bytes needs a folder for its resized pipelines")
        return [
            Workload(r, (r,), str(scratch), args.size or "tiny", args.policy or "even", options)
            for n in names
            for r in (resized(n, b, scratch) for b in sizes)
        ]
    return [Workload(n, (n,), str(NULL_DIR), args.size or "tiny", args.policy or "even", options)
            for n in names]  # fmt: skip


def relative(path: str) -> str:
    """`path` from the repository root where it lies inside it (results name no checkout)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT)) if path else ""
    except ValueError:
        return path


def stage_table(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """Markdown: per workload, CPU-ms per query of each stage at its highest held rate."""
    lines = ["Per stage at each workload's highest held rate (CPU-ms per query):", "",
             "| workload | rate_qps | stage | cpu_ms |", "| --- | --- | --- | --- |"]  # fmt: skip
    for name in names:
        held = [r for r in rows if r["workload"] == name and r["held"]]
        if not held:
            continue
        best = max(held, key=lambda r: r["rate_qps"])
        for stage, ms in best.get("cpu_ms_by_stage", {}).items():
            lines.append(f"| {name} | {best['rate_qps']:g} | {stage} | {ms:.4g} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadgen.bench_host", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--pipelines", default="", help="comma list (default: null1,null3,null-dag; "
                   "with --reference every bundled pipeline)")  # fmt: skip
    p.add_argument(
        "--reference", action="store_true",
        help="the bundled pipelines at size full under exclusive, as one mix",
    )  # fmt: skip
    p.add_argument("--input-bytes", default="", metavar="N[,N...]",
                   help="the null pipelines again with tensors of these sizes (uint8 [N] in and "
                   "through every stage; one mesh each, named <pipeline>-<N>b): what a query's "
                   "bytes cost each process")  # fmt: skip
    p.add_argument("--backend", choices=["auto", "host", "cuda"], default="auto")
    p.add_argument("--rates", default="", help=f"queries/s, ascending (default: {NULL_RATES}; "
                   f"with --reference {REFERENCE_RATES})")  # fmt: skip
    p.add_argument("--duration-s", type=float, default=8.0, help="seconds per trial")
    p.add_argument("--warmup-s", type=float, default=2.0, help="per trial, not measured")
    p.add_argument("--prime-s", type=float, default=3.0,
                   help="unmeasured load at the first rate after each mesh starts")  # fmt: skip
    p.add_argument("--idle-s", type=float, default=3.0,
                   help="the mesh's CPU with no load, measured first (0: skip)")  # fmt: skip
    p.add_argument("--gap-s", type=float, default=1.0, help="pause before each trial")
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--connections", type=int, default=16, help="split among the client processes")
    p.add_argument("--gateway-workers", type=int, default=3)
    p.add_argument(
        "--submit",
        choices=("stream", "unary"),
        default="stream",
        help="how the clients send: many queries on one SubmitStream per connection (a local "
        "client's path, the default) or a unary Submit each (as remote clients and Locust do)",
    )
    p.add_argument(
        "--shm",
        action="store_true",
        help="clients pass inputs by shared memory: each writes its input into a buffer it "
        "borrowed from the mesh's broker and submits the ref (Triton's shared-memory extension)",
    )
    p.add_argument(
        "--stage-calls",
        choices=("stream", "forward", "unary"),
        default="forward",
        help="the gateway's stage calls (its --stage-calls): forward (the default: a chain's "
        "stages pass its query on; docs/DATAPLANE.md), a stream per replica, or unary",
    )
    p.add_argument("--deadline-s", type=float, default=2.0, help="per query")
    p.add_argument("--p99-ms", type=float, default=None,
                   help=f"the target a rate must hold (default {P99_MS:g}; with --reference each "
                   "pipeline's QoS target)")  # fmt: skip
    p.add_argument("--max-error-frac", type=float, default=0.01)
    p.add_argument("--size", choices=["tiny", "full"], default="",
                   help="default: tiny (null), full (--reference)")  # fmt: skip
    p.add_argument("--policy", default="", help="default: even (null), exclusive (--reference)")
    p.add_argument("--option", action="append", default=[], metavar="K=V",
                   help="the policy's option, repeatable (e.g. replicas=3 for even)")  # fmt: skip
    p.add_argument("--profile-at", type=float, default=None, metavar="RATE",
                   help="at this rate (one of --rates) also sample the busiest gateway workers' "
                   "and stage replicas' stacks with py-spy after the warm-up (loadgen.hostprofile;"
                   " py-spy must be installed); raw stacks in <out-dir>/<name>-pyspy/")  # fmt: skip
    p.add_argument("--profile-s", type=float, default=3.0, help="seconds of samples per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="", help="keep each mesh's folder and logs here")
    p.add_argument("--note", default="", help="a line for the result's notes (the machine...)")
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--name", default="host-path")
    return p


def trials_of(args: argparse.Namespace) -> Trials:
    text = args.rates or (REFERENCE_RATES if args.reference else NULL_RATES)
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidArgument(f"--rates {text!r} is not a comma list of numbers") from None
    if list(rates) != sorted(rates):
        raise InvalidArgument(f"--rates must rise, got {text!r}")
    p99 = args.p99_ms if args.p99_ms is not None else (None if args.reference else P99_MS)
    if args.profile_at is not None and hostprofile.py_spy() is None:
        raise InvalidArgument("--profile-at needs py-spy (pip install py-spy)")
    return Trials(
        rates, args.duration_s, args.warmup_s, args.prime_s, args.idle_s, args.gap_s,
        args.client_processes,
        args.connections, args.deadline_s, p99, args.max_error_frac, args.seed, args.submit,
        profile_at=args.profile_at, profile_s=args.profile_s,
        profile_dir=str(Path(args.out_dir) / f"{args.name}-pyspy"),
    )  # fmt: skip


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    backend = backend_label(args.backend)
    if args.gateway_workers < 1:
        raise InvalidArgument(f"--gateway-workers must be >= 1, got {args.gateway_workers}")
    t = trials_of(args)
    # --input-bytes writes its resized pipelines here for the run
    scratch = None
    if args.input_bytes:
        scratch = Path(tempfile.mkdtemp(prefix="camelot-bench-pipelines-"))
    try:
        return await _run(args, argv, backend, t, workloads(args, backend, scratch))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


async def _run(
    args: argparse.Namespace,
    argv: Sequence[str],
    backend: str,
    t: Trials,
    loads: list[Workload],
) -> tuple[Path, Path]:
    # the mesh's processes take their environment from this one (services.launcher.Mesh)
    os.environ["CAMELOT_GATEWAY_STAGE_CALLS"] = args.stage_calls
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for w in loads:
        async with mesh_for(w, backend, args.gateway_workers, args.run_dir) as (
            target,
            roots,
            broker,
        ):
            tw = replace(t, shm_broker=broker if args.shm else "")
            rows += await ladder(target, w, tw, ProcessTree(roots))
        summary.update(summarize(w.name, rows))
    target_text = (f"p99 <= {t.p99_ms:g} ms" if t.p99_ms is not None
                   else "every pipeline's p99 within its QoS target")  # fmt: skip
    notes = (
        f"{'Reference pipelines' if args.reference else 'Null pipelines'} "
        f"({', '.join(w.name + ': ' + '+'.join(w.pipelines) for w in loads)}), "
        f"size {loads[0].size}, policy {loads[0].policy}"
        f"{''.join(f' {k}={v}' for k, v in loads[0].options)}, {args.gateway_workers} gateway "
        f"worker(s) with --stage-calls {args.stage_calls}, {t.client_processes} client "
        f"process(es) over {t.connections} connections; "
        f"open-loop Poisson, {t.duration_s:g} s per rate of which {t.warmup_s:g} s warm-up; a "
        f"rate holds at {target_text} and <= {100 * t.max_error_frac:g}% errors. CPU-ms per "
        "query: each kind's CPU time (all threads, /proc) over the measured window per query "
        "sent in it; mesh = every kind but the load generator. It includes the mesh's idle cost "
        "(heartbeats, reports, scheduler ticks; `<w>_idle_mesh_cpu_pct`, percent of one core "
        "with no load), which at a low rate is most of a query's figure."
    )
    if args.note:
        notes += f"\n\n{args.note}"
    notes += "\n\n" + stage_table(rows, [w.name for w in loads])
    for row in rows:
        if "host_profile" in row:
            notes += (
                f"\n\nWhere the host CPU went at {row['rate_qps']:g} qps ({row['workload']}): "
                "py-spy samples of the busiest processes after the warm-up (loadgen.hostprofile;"
                " a function's self share is the part of the process's running samples it was on"
                " top of the stack, C code counting as its Python caller; raw stacks in "
                f"`{args.name}-pyspy/`)\n\n" + hostprofile.table(row["host_profile"])
            )
    return write_result(
        args.name, rows, summary, backend, args.out_dir, COLUMNS,
        command=module_command("loadgen.bench_host", argv), notes=notes,
        extra={"settings": {**asdict(t), "gateway_workers": args.gateway_workers,
                            "stage_calls": args.stage_calls,
                            "workloads": [{**asdict(w), "directory": relative(w.directory)}
                                          for w in loads]}},
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
