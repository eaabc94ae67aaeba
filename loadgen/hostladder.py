"""The host-path benchmark's trials: a mesh for a workload, the rates in turn (a ladder), and
what each trial measured and how it is judged. `bench_host` is the program around them.

A trial drives the gateway's public `Submit` with open-loop Poisson arrivals from several client
processes (`loadgen.clients`), samples each process kind's CPU time over its measured window
(`loadgen.hostcost`), and judges the rate: it holds when every pipeline's p99 is within its
target and errors are few; it collapses when a pipeline's median is over its target or more than
`COLLAPSE_ERROR_FRAC` of the queries fail. The ladder stops at the first collapse or after
`STOP_AFTER_MISSES` missed rates in a row.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidArgument
from loadgen import hostprofile, tails, traces
from loadgen.hostcost import LOADGEN, STAGE, CpuSampler, ProcessTree, Window, roots_of
from loadgen.inputs import Mix, uniform_mix
from loadgen.openloop import list_pipelines as served_pipelines
from loadgen.openloop import run_open_loop
from loadgen.records import Record, percentiles_ms, stats_of
from services.launcher import Mesh
from services.localmesh import start_mesh

log = logging.getLogger(__name__)

# a rate collapses when a pipeline's median is over its target or this many queries fail
COLLAPSE_ERROR_FRAC = 0.05
STOP_AFTER_MISSES = 2
KINDS = ("gateway", "broker", STAGE, "scheduler", "agent", "redis", "mps", LOADGEN)
COLUMNS = [
    "workload", "rate_qps", "achieved_qps", "count", "errors", "p50_ms", "p99_ms", "lag_p99_ms",
    "held", "mesh_cpu_ms_per_query", *(f"cpu_ms.{k}" for k in KINDS), "host_cpu_pct",
    "busiest_pct.gateway", "busiest_pct.stage", "gpu_util_pct",
]  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """What one mesh serves and how it is loaded: `name` keys the summary."""

    name: str
    pipelines: tuple[str, ...]
    directory: str  # "" for the bundled configs
    size: str
    policy: str
    # the policy's options (the scheduler's --option K=V), as pairs
    options: tuple[tuple[str, str], ...] = ()

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
    # the rate whose trial also samples the busiest processes' stacks (`loadgen.hostprofile`)
    # for `profile_s` after its warm-up, raw stacks into `profile_dir`; None: no trial does
    profile_at: float | None = None
    profile_s: float = 3.0
    profile_dir: str = ""

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
        if self.profile_at is not None and self.profile_at not in self.rates:
            raise InvalidArgument(
                f"the rate to profile at ({self.profile_at:g}) is not one of the rates "
                f"{list(self.rates)}"
            )
        if not self.profile_s > 0:
            raise InvalidArgument(f"profile_s must be positive, got {self.profile_s}")


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

    def pct(ms: float) -> float:
        return round(100.0 * ms / 1000.0 / window.seconds, 1)

    return {
        "mesh_cpu_ms_per_query": round(mesh / queries, 4),
        **{f"cpu_ms.{k}": round(kinds[k] / queries, 4) if k in kinds else None for k in KINDS},
        "cpu_ms_by_stage": {
            label.partition(":")[2]: round(ms / queries, 4)
            for label, ms in sorted(window.cpu_ms.items())
            if label.startswith(f"{STAGE}:")
        },
        "cpu_pct": {k: pct(v) for k, v in kinds.items()},
        **{f"busiest_pct.{k}": pct(v) for k, v in window.busiest_ms.items()},
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
    profiling = (
        asyncio.create_task(profile_after_warmup(tree, t, f"{workload.name}-{rate:g}"))
        if t.profile_at == rate
        else None
    )
    try:
        async with CpuSampler(tree) as sampler:
            result = await run_open_loop(
                target, schedule, workload.mix, seed, t.deadline_s, pipelines=served,
                connections=t.connections, duration_s=t.duration_s, processes=t.client_processes,
                submit=t.submit, shm_broker=t.shm_broker,
            )  # fmt: skip
    except BaseException:
        if profiling is not None:
            profiling.cancel()
        raise
    profile = await profiling if profiling is not None else None
    window = sampler.window(
        result.t0_us + int(t.warmup_s * 1e6), result.t0_us + int(t.duration_s * 1e6)
    )
    records = [r for r in result.records if window.t0_us <= r.intended_us < window.t1_us]
    held, collapsed, per = judge(records, targets, t.max_error_frac)
    stats = stats_of(records, window.seconds)
    lag = percentiles_ms([max(0, r.sent_us - r.intended_us) for r in records])
    row: dict[str, Any] = {
        "workload": workload.name,
        "rate_qps": rate,
        "window_s": round(window.seconds, 3),
        "offered_qps": round(stats["offered_qps"], 1),
        "achieved_qps": round(stats["ok"] / window.seconds, 1),
        **{k: stats[k] for k in ("count", "errors", "error_codes", "p50_ms", "p99_ms", "max_ms")},
        "lag_p99_ms": lag["p99_ms"],
        "held": held,
        "collapsed": collapsed,
        **cost_row(window, len(records)),
        "by_pipeline": per,
        "tails": tails.breakdown(records, targets),
        "stages": tails.by_stage(records, targets),
        **({"host_profile": profile} if profile is not None else {}),
    }
    log.info("%s at %g qps: p50 %s ms, p99 %s ms, %d errors, mesh %s CPU-ms/query, %s",
             workload.name, rate, row["p50_ms"], row["p99_ms"], row["errors"],
             row["mesh_cpu_ms_per_query"], "held" if held else "missed")  # fmt: skip
    return row


async def profile_after_warmup(tree: ProcessTree, t: Trials, tag: str) -> dict[str, Any]:
    """The trial's busiest processes sampled once its warm-up is over, within its measured part
    (`profile_s` at most); {"*": {"error": why}} where py-spy could not run at all, so the trial's
    own figures stand either way."""
    try:
        await asyncio.sleep(t.warmup_s)
        left = t.duration_s - t.warmup_s - hostprofile.PICK_S
        seconds = min(t.profile_s, max(1.0, left))
        return await hostprofile.profile_busiest(tree, seconds, Path(t.profile_dir or "."), tag)
    except Exception as e:
        log.warning("%s: no host profile: %s", tag, e)
        return {"*": {"error": f"{type(e).__name__}: {e}"}}


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
            policy_options=dict(workload.options),
        )  # fmt: skip
        yield str(info["gateway"]), roots_of(mesh.procs), str(info["broker"])
