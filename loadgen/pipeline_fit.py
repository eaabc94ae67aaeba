"""How far the predictor's pipeline p99 is from what the mesh measured, trial by trial.

    python -m loadgen.pipeline_fit docs/results/peak-load-one-gateway.json [--out docs/results]

`predictor.json` scores the model per stage, on stages run alone or in pairs. This scores it
where the policies use it: a whole pipeline in the running mesh. For every trial of a peak-load
or low-load result whose policy makes its plan from the world alone (`max-load`, `even`,
`exclusive`, with their options), the plan is made again from the committed profiles, the
pipelines of the trial's mix and its weights, exactly as the scheduler made it when the policy
was set (bias 1), and predicted at the trial's rate split by the mix's weights; the row sets
that beside each pipeline's measured p99. Runs on the CPU.

What it leaves out: a policy that re-planned during its search with a learned bias ran a
different plan in its later trials (the result's scheduler log says when); `feedback` and
`min-resource` plan from measurements and load, which a result file does not hold.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from common.results import module_command, write_result
from contract import pipeline_config
from loadgen.experiments.admin import parse_policy
from loadgen.inputs import parse_mix
from scheduler.perfmodel.predictor import HopCosts, predict
from scheduler.perfmodel.profilestore import MEASURED_PROFILES, load, load_default
from scheduler.policy import GpuInfo, NodeInfo, PlanSpec, PolicyInput
from scheduler.search.policies import get_policy
from scheduler.service.pipelines import from_config

# policies whose plan depends only on the world they are given (no measurements, no load)
FROM_WORLD = ("max-load", "even", "exclusive")
H100 = GpuInfo(0, 132, 80 << 30)


def mixes_of(doc: Mapping[str, Any]) -> dict[str, str]:
    """Mix label -> mix text, from the result's recorded settings."""
    out: dict[str, str] = {}
    settings = doc.get("settings") or {}
    # a merged result keeps each run's settings under its label
    runs = settings.values() if "mix" not in settings else [settings]
    for s in runs:
        for text in (s or {}).get("mix", []):
            out[parse_mix(text).name] = text
    return out


def fit_rows(
    doc: Mapping[str, Any],
    profiles: Mapping[str, Any],
    size: str = "full",
    host: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per trial and pipeline; `host` adds options to every policy's (the gateway's
    figures, scheduler.perfmodel.predictor.HopCosts.for_world)."""
    mixes = mixes_of(doc)
    plans: dict[tuple[str, str], tuple[PolicyInput, PlanSpec, dict[str, float]]] = {}
    rows: list[dict[str, Any]] = []
    for r in doc["rows"]:
        name, options = parse_policy(str(r["policy"]))
        if name not in FROM_WORLD or r["mix"] not in mixes:
            continue
        key = (r["mix"], r["policy"])
        if key not in plans:
            mix = parse_mix(mixes[r["mix"]])
            pipes = tuple(
                from_config(pipeline_config.load_pipeline(p, size)) for p in mix.pipelines
            )
            share = mix.fractions()
            world = PolicyInput(
                pipes, (NodeInfo("node-0", (H100,)), ), dict.fromkeys(mix.pipelines, 1.0),
                profiles=profiles, options={**(host or {}), **options},
            )  # fmt: skip
            plans[key] = (world, get_policy(name).plan(world), share)
        world, plan, share = plans[key]
        rates = {p: float(r["rate_qps"]) * f for p, f in share.items()}
        pred = predict(world, plan, rates)
        for p in share:
            measured = r.get(f"{p}.p99_ms")
            # a plan the model says cannot carry the load (a GPU or the gateways past capacity)
            # has no latency to compare; `beyond_capacity` says so, beside whether it was met
            predicted = math.inf if pred.problems else pred.pipelines[p].p99_ms
            rows.append(
                {"mix": r["mix"], "policy": r["policy"], "rate_qps": r["rate_qps"],
                 "pipeline": p, "measured_p99_ms": measured,
                 "predicted_p99_ms": predicted if math.isfinite(predicted) else None,
                 "measured_over_predicted": (
                     measured / predicted if measured and math.isfinite(predicted) else None
                 ),
                 "beyond_capacity": bool(pred.problems), "met": r.get("met")}
            )  # fmt: skip
    return rows


def fit_gateway_tail(
    rows: Sequence[Mapping[str, Any]], mix: str, cpu_ms: float, workers: int
) -> float:
    """The gateway's tail factor that fits `mix`'s trials best (least squares on the p99 the
    model without a gateway term leaves unexplained; the term is additive and proportional to
    the factor, so one division gives it)."""
    unit = HopCosts(gateway_cpu_ms=cpu_ms, gateway_workers=workers, gateway_tail=1.0)
    xs, ys = [], []
    for r in rows:
        x = float(unit.gateway_ms(r["rate_qps"]))
        if r["mix"] == mix and r["predicted_p99_ms"] and r["measured_p99_ms"] and math.isfinite(x):
            xs.append(x)
            ys.append(r["measured_p99_ms"] - r["predicted_p99_ms"])
    if not xs or not any(xs):
        raise InvalidArgument(f"no trial of mix {mix!r} below the gateways' capacity to fit on")
    return float(sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs))


def mape_by_mix(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean |measured - predicted| / measured per mix, over trials the model calls feasible."""
    out: dict[str, float] = {}
    for mix in sorted({r["mix"] for r in rows}):
        errs = [abs(1 - 1 / r["measured_over_predicted"]) for r in rows
                if r["mix"] == mix and r["measured_over_predicted"]]  # fmt: skip
        if errs:
            out[mix] = statistics.fmean(errs)
    return out


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ratios = [r["measured_over_predicted"] for r in rows if r["measured_over_predicted"]]
    if not ratios:
        raise InvalidArgument("no trial of a policy that plans from the world alone")
    out["measured_over_predicted_median"] = statistics.median(ratios)
    out["pipeline_p99_mape"] = statistics.fmean(abs(1 - 1 / x) for x in ratios)
    for policy in sorted({r["policy"] for r in rows}):
        mine = [r["measured_over_predicted"] for r in rows if r["policy"] == policy]
        mine = [x for x in mine if x]
        if mine:
            out[f"{policy}.measured_over_predicted_median"] = statistics.median(mine)
    return out


def with_gateway(
    doc: Mapping[str, Any],
    profiles: Mapping[str, Any],
    args: argparse.Namespace,
    plain: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The trials predicted again with the gateway priced (its tail fitted on one mix where
    asked); the error with and without it, over the trials the priced model calls feasible."""
    host = {"gateway_cpu_ms": repr(args.gateway_cpu_ms),
            "gateway_workers": str(args.gateway_workers)}  # fmt: skip
    if args.fit_tail_on:
        tail = fit_gateway_tail(plain, args.fit_tail_on, args.gateway_cpu_ms, args.gateway_workers)
        host["gateway_tail"] = repr(tail)
    rows = fit_rows(doc, profiles, args.size, host)

    def key(r: Mapping[str, Any]) -> tuple[Any, ...]:
        return (r["mix"], r["policy"], r["rate_qps"], r["pipeline"])

    feasible = {key(r) for r in rows if not r["beyond_capacity"]}
    beyond = {key(r)[:3]: bool(r["met"]) for r in rows if r["beyond_capacity"]}
    summary: dict[str, Any] = {
        **summarise(rows),
        "gateway_cpu_ms": args.gateway_cpu_ms,
        "gateway_tail": float(host.get("gateway_tail", HopCosts.gateway_tail)),
        "fitted_on": args.fit_tail_on or None,
    }
    for m, v in mape_by_mix([r for r in plain if key(r) in feasible]).items():
        summary[f"{m}.pipeline_p99_mape_without_gateway"] = v
    for m, v in mape_by_mix(rows).items():
        summary[f"{m}.pipeline_p99_mape_with_gateway"] = v
    # trials the priced model says no plan carries, and how many of them the mesh passed
    summary["beyond_capacity_trials"] = len(beyond)
    summary["beyond_capacity_trials_met"] = sum(beyond.values())
    return rows, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.pipeline_fit", description=__doc__)
    p.add_argument("result", help="a peak-load or low-load result JSON")
    p.add_argument("--profiles", default="", help=f"default: the scheduler's ({MEASURED_PROFILES})")
    p.add_argument("--size", default="full", choices=("tiny", "full"))
    p.add_argument("--out", default="docs/results")
    p.add_argument("--name", default="pipeline-fit")
    p.add_argument("--gateway-cpu-ms", type=float, default=0.0, help="price the gateway (ms/query)")
    p.add_argument("--gateway-workers", type=int, default=1)
    p.add_argument("--fit-tail-on", default="", help="fit the gateway's tail on this mix's trials")
    return p


def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Path, Path]:
    doc = json.loads(Path(args.result).read_text())
    # what the scheduler plans with when given no path: the measured set, gaps filled
    profiles = load(args.profiles) if args.profiles else load_default()
    rows = fit_rows(doc, profiles, args.size)
    if args.gateway_cpu_ms > 0:
        rows, summary = with_gateway(doc, profiles, args, rows)
    else:
        summary = summarise(rows)
    notes = (
        f"Trials of `{args.result}` (git {doc.get('git')}, {doc.get('device')}), predicted "
        f"again on the CPU from `{args.profiles or MEASURED_PROFILES.name}`. The first lines "
        "of the summary are over every trial; then per policy. What the figures show is in "
        "docs/RESULTS.md."
    )
    return write_result(
        args.name, rows, summary, "host", args.out,
        command=module_command("loadgen.pipeline_fit", argv), notes=notes,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    # CPU work on files only: common.results.run_main's asyncio loop would carry nothing
    args_list = list(sys.argv[1:] if argv is None else argv)
    json_path, md_path = run(build_parser().parse_args(args_list), args_list)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
