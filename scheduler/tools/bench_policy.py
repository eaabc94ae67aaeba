"""Benchmark: how close `max-load` gets to the exhaustive optimum, and how fast it decides.

    python -m scheduler.tools.bench_policy [--instances 20] [--seed 1] [--repeats 15]

1. Random small instances (1-2 pipelines, <= 3 stages in all, drawn from the profile set with
   random QoS; 1-2 H100s): max-load restricted to the brute-force space (batches 1,8,32,
   10% share steps, <= 2 replicas a stage) against `scheduler.search.bruteforce`, both scored by the
   same predictor. gap = 1 - maxload_load / brute_load.
2. Decision time of max-load for 4 pipelines x 4 stages on 8 H100s (median over repeats, wall
   and CPU: on a shared machine the wall time also holds other processes' turns).

Writes docs/results/policy-optimality.json and .md (format in RESULTS.md). Runs on the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.results import cpu_model, git_short_hash
from scheduler.perfmodel.predictor import HopCosts, predict
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import load
from scheduler.policy import GpuInfo, NodeInfo, PipelineInfo, PolicyInput, StageInfo
from scheduler.search.bruteforce import best_load
from scheduler.search.policies.maxload import MaxLoad
from scheduler.search.solver import Solver

HOPS = HopCosts()

OUT = Path("docs/results")
H100 = GpuInfo(0, 132, 80 << 30)


def gpus(n: int) -> tuple[NodeInfo, ...]:
    return (NodeInfo("node-0", tuple(replace(H100, index=i) for i in range(n))),)


def by_pipeline(profiles: dict[str, StageProfile]) -> dict[str, list[StageProfile]]:
    out: dict[str, list[StageProfile]] = {}
    for p in profiles.values():
        out.setdefault(p.pipeline, []).append(p)
    return out


def random_instance(rng: random.Random, profiles: dict[str, StageProfile]) -> PolicyInput:
    pipes = by_pipeline(profiles)
    n_pipes = rng.choice((1, 1, 2))
    names = rng.sample(sorted(pipes), n_pipes)
    budget = 3
    infos: list[PipelineInfo] = []
    chosen: dict[str, StageProfile] = {}
    for i, name in enumerate(names):
        left = n_pipes - i - 1
        n = rng.randint(1, min(3, budget - left))
        budget -= n
        start = rng.randint(0, len(pipes[name]) - n)
        stages = pipes[name][start : start + n]
        # the stages' budget is 2-8x their unloaded floor; the fixed costs of a query (its own
        # and a hop per stage, HopCosts) come on top, so instances do not depend on them
        floor = sum(s.latency(100.0, 1) for s in stages) + 0.25 * n
        fixed = HOPS.query_cost_ms(0) + HOPS.ref_ms * n
        qos = round(floor * rng.uniform(2.0, 8.0) + fixed, 1)
        infos.append(
            PipelineInfo(name, tuple(StageInfo(s.stage, s.max_batch) for s in stages), qos)
        )
        chosen.update((s.key, s) for s in stages)
    opts = {"batches": "1,8,32", "share_step": "10", "max_replicas": "2", "tolerance": "0.002"}
    return PolicyInput(tuple(infos), gpus(rng.choice((1, 2))), {}, chosen, options=opts)


def max_supported(world: PolicyInput, plan: Any, weights: dict[str, float]) -> float:
    """The load at which the plan itself stops meeting the QoS (same bisection as brute)."""
    lo = min(plan.planned_qps[p] / weights[p] for p in weights)
    hi = lo * 4
    while predict(world, plan, {p: hi * w for p, w in weights.items()}).feasible:
        lo, hi = hi, hi * 2
    while hi / lo > 1.002:
        mid = (lo * hi) ** 0.5
        if predict(world, plan, {p: mid * w for p, w in weights.items()}).feasible:
            lo = mid
        else:
            hi = mid
    return float(lo)


def big_world(profiles: dict[str, StageProfile]) -> PolicyInput:
    """4 pipelines x 4 stages on 8 GPUs: each reference pipeline plus a 'post' stage."""
    pipes = by_pipeline(profiles)
    infos, chosen = [], {}
    for name in sorted(pipes)[:4]:
        stages = list(pipes[name][:3])
        stages.append(replace(stages[0], stage="post"))
        for s in stages:
            chosen[s.key] = s
        infos.append(
            PipelineInfo(name, tuple(StageInfo(s.stage, s.max_batch) for s in stages), 100.0)
        )
    return PolicyInput(tuple(infos), gpus(8), {}, chosen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--profiles", default=None, help="profiles JSON (default: the synthetic set)"
    )
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    profiles = load(args.profiles) if args.profiles else load()
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    for i in range(args.instances):
        world = random_instance(rng, profiles)
        weights = {p.name: 1.0 for p in world.pipelines}
        t0 = time.perf_counter()
        plan = MaxLoad().plan(world)
        ml_ms = (time.perf_counter() - t0) * 1e3
        ml = max_supported(world, plan, weights)
        t0 = time.perf_counter()
        brute = best_load(world, weights, max_replicas=2)
        bf_s = time.perf_counter() - t0
        gap = 1.0 - ml / brute.load if brute.load > 0 else 0.0
        rows.append(
            {
                "kind": "optimality",
                "instance": i,
                "pipelines": {p.name: [s.name for s in p.stages] for p in world.pipelines},
                "qos_p99_ms": {p.name: p.qos_p99_ms for p in world.pipelines},
                "gpus": sum(len(n.gpus) for n in world.nodes),
                "maxload_load": round(ml, 3),
                "brute_load": round(brute.load, 3),
                "gap": round(gap, 4),
                "maxload_ms": round(ml_ms, 2),
                "brute_s": round(bf_s, 2),
                "brute_plans": brute.plans_seen,
                "brute_scored": brute.plans_scored,
            }
        )
        print(f"instance {i}: max-load {ml:.1f} brute {brute.load:.1f} gap {gap:.3%}", flush=True)

    world = big_world(profiles)
    Solver(world, "max-load")  # import and first-touch costs out of the timing
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = MaxLoad().plan(world)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    p50 = statistics.median(times)
    rows.append(
        {
            "kind": "decision_time",
            "pipelines": 4,
            "stages_per_pipeline": 4,
            "gpus": 8,
            "repeats": args.repeats,
            "decision_ms_p50": round(p50, 2),
            "decision_ms_max": round(max(times), 2),
            # CPU time of the (single-threaded) decision: wall time less other processes' turns
            "decision_cpu_ms_p50": round(statistics.median(cpu), 2),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "load": round(next(iter(plan.planned_qps.values())), 2),
        }
    )
    gaps = [r["gap"] for r in rows if r["kind"] == "optimality"]
    summary = {
        "max_gap_vs_bruteforce": round(max(gaps), 4) if gaps else None,
        "mean_gap_vs_bruteforce": round(statistics.fmean(gaps), 4) if gaps else None,
        "decision_ms_p50": round(p50, 2),
        "decision_cpu_ms_p50": round(statistics.median(cpu), 2),
        "targets": {"max_gap_vs_bruteforce": 0.05, "decision_ms_p50": 50},
    }
    doc = {
        "name": "policy-optimality",
        "command": "python -m scheduler.tools.bench_policy "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": cpu_model(),
        "backend": "host",
        "date": dt.date.today().isoformat(),
        "git": git_short_hash(),
        "profiles": "synthetic" if any(p.synthetic for p in profiles.values()) else "measured",
        "rows": rows,
        "summary": summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy-optimality.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "policy-optimality.md").write_text(markdown(doc))
    print(json.dumps(summary))


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    big = next(r for r in doc["rows"] if r["kind"] == "decision_time")
    lines = [
        "# max-load against exhaustive search",
        "",
        f"`{doc['command']}` on {doc['device']} ({doc['backend']}), {doc['date']}, "
        f"git {doc['git']}; {doc['profiles']} profiles.",
        "",
        f"- **max gap vs brute force: {s['max_gap_vs_bruteforce'] or 0:.2%}** (target <= 5%), "
        f"mean {s['mean_gap_vs_bruteforce'] or 0:.2%}",
        f"- **decision time, 4 pipelines x 4 stages on 8 GPUs: {s['decision_ms_p50']} ms** "
        f"median wall, {s['decision_cpu_ms_p50']} ms CPU (target <= 50 ms); load "
        f"x{big['load']} per pipeline; 1-minute load average {big['load_avg_1m']} on "
        f"{os.cpu_count()} cores",
        "",
        "Load is the common multiplier (queries/s of each pipeline) at which the predicted p99 "
        "of every pipeline stays within its QoS. Both searches are scored by the same predictor.",
        "",
        "| # | pipelines | GPUs | max-load | brute force | gap | max-load ms | brute s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["rows"]:
        if r["kind"] != "optimality":
            continue
        pipes = "; ".join(
            f"{k}: {'+'.join(v)} ({r['qos_p99_ms'][k]} ms)" for k, v in r["pipelines"].items()
        )
        lines.append(
            f"| {r['instance']} | {pipes} | {r['gpus']} | {r['maxload_load']} | {r['brute_load']} "
            f"| {r['gap']:.2%} | {r['maxload_ms']} | {r['brute_s']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
