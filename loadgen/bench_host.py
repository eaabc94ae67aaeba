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
import asyncio
import logging
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.backend import label as backend_label
from common.errors import InvalidArgument
from common.results import REPO_ROOT, module_command, run_main, write_result
from contract.pipeline_config import list_pipelines, pipelines_dir
from loadgen import tails, traces
from loadgen.hostcost import LOADGEN, STAGE, CpuSampler, ProcessTree, Window, roots_of
from loadgen.inputs import Mix, uniform_mix
from loadgen.openloop import list_pipelines as served_pipelines
from loadgen.openloop import run_open_loop
from loadgen.records import Record, percentiles_ms
from services.launcher import Mesh
from services.localmesh import start_mesh

log = logging.getLogger(__name__)

NULL_DIR = pipelines_dir() / "null"
NULL_PIPELINES = ("null1", "null3", "null-dag")
NULL_RATES = "250,500,1000,1500,2000,3000,4000,5000,6000,8000"
REFERENCE_RATES = "50,100,200,300,400,600,800,1200,1600,2400"
P99_MS = 25.0
# a rate collapses when a pipeline's median is over its target or this many queries fail
COLLAPSE_ERROR_FRAC = 0.05
STOP_AFTER_MISSES = 2
KINDS = ("gateway", "broker", STAGE, "scheduler", "agent", "redis", "mps", LOADGEN)
COLUMNS = [
    "workload", "rate_qps", "achieved_qps", "count", "errors", "p50_ms", "p99_ms", "lag_p99_ms",
    "held", "mesh_cpu_ms_per_query", *(f"cpu_ms.{k}" for k in KINDS), "host_cpu_pct",
    "gpu_util_pct",
]  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """What one mesh serves and how it is loaded: `name` keys the summary."""

    name: str
    pipelines: tuple[str, ...]
    directory: str  # "" for the bundled configs
    size: str
    policy: str

    @property
    def mix(self) -> Mix:
        return uniform_mix(self.pipelines)


@dataclass(frozen=True)
class Trials:
    rates: tuple[float, ...]
    duration_s: float = 8.0
    warmup_s: float = 2.0
    prime_s: float = 3.0
    idle_s: float = 3.0
    gap_s: float = 1.0
    client_processes: int = 4
    connections: int = 16
    deadline_s: float = 2.0
    p99_ms: float | None = None  # None: each pipeline's QoS target
    max_error_frac: float = 0.01
    seed: int = 0
    # clients on the node send on SubmitStream (the local client's path); "unary" as Locust does
    submit: str = "stream"
    # the broker a client on the node writes its inputs into (inputs by reference); "": bytes
    shm_broker: str = ""

    def __post_init__(self) -> None:
        if not self.rates or any(not r > 0 for r in self.rates):
            raise InvalidArgument(f"rates must be positive queries/s, got {list(self.rates)}")
        if not 0 <= self.warmup_s < self.duration_s:
            raise InvalidArgument(
                f"need duration_s > warmup_s >= 0, got {self.duration_s} and {self.warmup_s}"
            )
        if self.client_processes < 1 or self.connections < self.client_processes:
            raise InvalidArgument(
                f"need client_processes >= 1 and connections >= client_processes, got "
                f"{self.client_processes} and {self.connections}"
            )


def judge(
    records: Sequence[Record], targets: Mapping[str, float], max_error_frac: float
) -> tuple[bool, bool, dict[str, dict[str, float | None]]]:
    """(held, collapsed, per pipeline p50/p99) of a trial's measured queries."""
    per: dict[str, dict[str, float | None]] = {}
    for name in targets:
        lat = [r.latency_us for r in records if r.ok and r.pipeline == name]
        q = percentiles_ms(lat)
        per[name] = {"p50_ms": q["p50_ms"], "p99_ms": q["p99_ms"]}
    errors = sum(not r.ok for r in records) / len(records) if records else 1.0
    held = errors <= max_error_frac and all(
        v["p99_ms"] is not None and v["p99_ms"] <= targets[k] for k, v in per.items()
    )
    collapsed = not held and (
        errors > COLLAPSE_ERROR_FRAC
        or any(v["p50_ms"] is None or v["p50_ms"] > targets[k] for k, v in per.items())
    )
    return held, collapsed, per


def cost_row(window: Window, queries: int) -> dict[str, Any]:
    """CPU milliseconds per query per kind (and per stage), and the mesh's (loadgen excluded)."""
    if queries <= 0:
        return {"mesh_cpu_ms_per_query": None}
    kinds = window.by_kind()
    mesh = sum(v for k, v in kinds.items() if k != LOADGEN)
    return {
        "mesh_cpu_ms_per_query": round(mesh / queries, 4),
        **{f"cpu_ms.{k}": round(kinds[k] / queries, 4) if k in kinds else None for k in KINDS},
        "cpu_ms_by_stage": {
            label.partition(":")[2]: round(ms / queries, 4)
            for label, ms in sorted(window.cpu_ms.items())
            if label.startswith(f"{STAGE}:")
        },
        "cpu_pct": {k: round(100.0 * v / 1000.0 / window.seconds, 1) for k, v in kinds.items()},
        "host_cpu_pct": None if window.host_cpu_pct is None else round(window.host_cpu_pct, 1),
        "gpu_util_pct": None if window.gpu_util_pct is None else round(window.gpu_util_pct, 1),
    }


async def trial(
    target: str,
    workload: Workload,
    served: Mapping[str, Any],
    targets: Mapping[str, float],
    rate: float,
    t: Trials,
    tree: ProcessTree,
    seed: int,
) -> dict[str, Any]:
    """One open-loop trial at `rate`, and its row."""
    schedule = traces.poisson(rate, t.duration_s, np.random.default_rng(seed))
    async with CpuSampler(tree) as sampler:
        result = await run_open_loop(
            target, schedule, workload.mix, seed, t.deadline_s, pipelines=served,
            connections=t.connections, duration_s=t.duration_s, processes=t.client_processes,
            submit=t.submit, shm_broker=t.shm_broker,
        )  # fmt: skip
    window = sampler.window(
        result.t0_us + int(t.warmup_s * 1e6), result.t0_us + int(t.duration_s * 1e6)
    )
    records = [r for r in result.records if window.t0_us <= r.intended_us < window.t1_us]
    held, collapsed, per = judge(records, targets, t.max_error_frac)
    ok = [r for r in records if r.ok]
    codes: dict[str, int] = {}
    for r in records:
        if not r.ok:
            codes[r.status] = codes.get(r.status, 0) + 1
    lat = percentiles_ms([r.latency_us for r in ok])
    lag = percentiles_ms([max(0, r.sent_us - r.intended_us) for r in records])
    row: dict[str, Any] = {
        "workload": workload.name,
        "rate_qps": rate,
        "window_s": round(window.seconds, 3),
        "offered_qps": round(len(records) / window.seconds, 1),
        "achieved_qps": round(len(ok) / window.seconds, 1),
        "count": len(records),
        "errors": len(records) - len(ok),
        "error_codes": codes,
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "max_ms": lat["max_ms"],
        "lag_p99_ms": lag["p99_ms"],
        "held": held,
        "collapsed": collapsed,
        **cost_row(window, len(records)),
        "by_pipeline": per,
        "tails": tails.breakdown(records, targets),
    }
    log.info("%s at %g qps: p50 %s ms, p99 %s ms, %d errors, mesh %s CPU-ms/query, %s",
             workload.name, rate, row["p50_ms"], row["p99_ms"], row["errors"],
             row["mesh_cpu_ms_per_query"], "held" if held else "missed")  # fmt: skip
    return row


async def idle_cpu_pct(tree: ProcessTree, seconds: float) -> dict[str, float]:
    """Percent of one core each kind spends with no load (heartbeats, reports, scheduler ticks):
    at a low rate this fixed cost, spread over few queries, is most of a query's figure."""
    async with CpuSampler(tree) as sampler:
        await asyncio.sleep(seconds)
    w = sampler.window(sampler.samples[0].t_us, sampler.samples[-1].t_us)
    kinds = w.by_kind()
    mesh = sum(v for k, v in kinds.items() if k != LOADGEN)
    return {"mesh": round(mesh / 10.0 / w.seconds, 2),
            **{k: round(v / 10.0 / w.seconds, 2) for k, v in sorted(kinds.items())}}  # fmt: skip


async def ladder(
    target: str, workload: Workload, t: Trials, tree: ProcessTree
) -> list[dict[str, Any]]:
    """The rates in turn until one collapses or two in a row miss."""
    served = await served_pipelines(target, 10.0)
    workload.mix.check_served(list(served))
    targets = {
        p: t.p99_ms if t.p99_ms is not None else float(served[p].qos_p99_ms)
        for p in workload.pipelines
    }
    idle = await idle_cpu_pct(tree, t.idle_s) if t.idle_s > 0 else {}
    if t.prime_s > 0:  # the first queries through new replicas and connections cost more
        prime = traces.poisson(t.rates[0], t.prime_s, np.random.default_rng(t.seed))
        await run_open_loop(
            target, prime, workload.mix, t.seed, t.deadline_s, pipelines=served,
            connections=t.connections, duration_s=t.prime_s, processes=1, submit=t.submit,
        )  # fmt: skip
    rows: list[dict[str, Any]] = []
    misses = 0
    for i, rate in enumerate(t.rates):
        await asyncio.sleep(t.gap_s)
        row = await trial(target, workload, served, targets, rate, t, tree, t.seed + 1 + i)
        row["idle_cpu_pct"] = idle
        rows.append(row)
        misses = 0 if row["held"] else misses + 1
        if row["collapsed"] or misses >= STOP_AFTER_MISSES:
            break
    return rows


@asynccontextmanager
async def mesh_for(
    workload: Workload, backend: str, gateway_workers: int, run_dir: str
) -> AsyncIterator[tuple[str, dict[int, str], str]]:
    """A whole mesh serving `workload`: the gateway's address, the processes' roots (pid ->
    kind) and the broker. In a scratch folder, or in `run_dir/<workload>` (kept, with its logs)."""
    async with AsyncExitStack() as stack:
        if run_dir:
            where = Path(run_dir) / workload.name
        else:
            where = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="camelot-host-")))
        mesh = Mesh(where)
        mesh.env["CAMELOT_GATEWAY_WORKERS"] = str(gateway_workers)
        stack.push_async_callback(mesh.stop_all)
        log.info("%s: starting the mesh (%s, size %s, policy %s) in %s", workload.name, backend,
                 workload.size, workload.policy, where)  # fmt: skip
        info = await start_mesh(
            mesh, backend, workload.size, workload.policy,
            pipelines=list(workload.pipelines), pipelines_dir=workload.directory,
        )  # fmt: skip
        yield str(info["gateway"]), roots_of(mesh.procs), str(info["broker"])


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


def workloads(args: argparse.Namespace, backend: str) -> list[Workload]:
    names = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    if args.reference:
        names = names or list_pipelines()
        # exclusive deals whole GPUs: on the host backend it has nothing to plan with
        policy = args.policy or ("exclusive" if backend == "cuda" else "even")
        return [Workload("reference", tuple(names), "", args.size or "full", policy)]
    names = names or list(NULL_PIPELINES)
    unknown = sorted(set(names) - set(list_pipelines(NULL_DIR)))
    if unknown:
        raise InvalidArgument(
            f"not null pipelines: {', '.join(unknown)} (have {', '.join(list_pipelines(NULL_DIR))};"
            " --reference measures the bundled ones)"
        )
    return [Workload(n, (n,), str(NULL_DIR), args.size or "tiny", args.policy or "even")
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
    p.add_argument("--deadline-s", type=float, default=2.0, help="per query")
    p.add_argument("--p99-ms", type=float, default=None,
                   help=f"the target a rate must hold (default {P99_MS:g}; with --reference each "
                   "pipeline's QoS target)")  # fmt: skip
    p.add_argument("--max-error-frac", type=float, default=0.01)
    p.add_argument("--size", choices=["tiny", "full"], default="",
                   help="default: tiny (null), full (--reference)")  # fmt: skip
    p.add_argument("--policy", default="", help="default: even (null), exclusive (--reference)")
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
    return Trials(
        rates, args.duration_s, args.warmup_s, args.prime_s, args.idle_s, args.gap_s,
        args.client_processes,
        args.connections, args.deadline_s, p99, args.max_error_frac, args.seed, args.submit,
    )  # fmt: skip


async def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    backend = backend_label(args.backend)
    if args.gateway_workers < 1:
        raise InvalidArgument(f"--gateway-workers must be >= 1, got {args.gateway_workers}")
    t = trials_of(args)
    loads = workloads(args, backend)
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
        f"size {loads[0].size}, policy {loads[0].policy}, {args.gateway_workers} gateway "
        f"worker(s), {t.client_processes} client process(es) over {t.connections} connections; "
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
    return write_result(
        args.name, rows, summary, backend, args.out_dir, COLUMNS,
        command=module_command("loadgen.bench_host", argv), notes=notes,
        extra={"settings": {**asdict(t), "gateway_workers": args.gateway_workers,
                            "workloads": [{**asdict(w), "directory": relative(w.directory)}
                                          for w in loads]}},
    )  # fmt: skip


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (a timeout's) unwinds like Ctrl-C, so the mesh it started is stopped, not orphaned
    signal.signal(signal.SIGTERM, _interrupt)
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
