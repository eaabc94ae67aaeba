"""What max-load and each baseline are predicted to carry on the headline's mixes (CPU).

    python -m scheduler.tools.maxload_peaks [--out docs/results/maxload-peaks-<rev>]

For each mix of issue 22 (`ref4` on the H100 set, `torch3` and `all7` on the H200 set; the
reference stages in h200.json are H100 numbers), on one and two GPUs, with the gateway priced as
measured after the data-plane work (3.0 ms a query over 8 workers) and with the stages' host part
unpriced (0) or at the H100 host's fitted 0.97 ms: max-load's plan and each baseline's, each
pushed by bisection to the highest multiple of equal per-pipeline rates at which the full
predictor passes it. The ratio is max-load's over the best baseline's: what
`camelot_over_best_baseline` would be if the predictor were right. Beside it, the SM share
min-resource's plan holds at the low-load experiment's 10 qps (all pipelines together), and the
saving that is against a baseline holding every GPU. These are predictions from the committed
profiles, not measurements.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.results import module_command, write_result
from contract.pipeline_config import load_pipeline, pipelines_dir
from scheduler.perfmodel.predictor import predict
from scheduler.perfmodel.profilestore import for_device
from scheduler.policy import GpuInfo, NodeInfo, PipelineInfo, PlanSpec, PolicyInput
from scheduler.search.policies import get_policy
from scheduler.service.pipelines import from_config

REFERENCE = ("img-to-text", "speech-to-text", "text-to-img", "video-analytics")
TORCH = ("torch-captioning", "torch-speech-to-text", "torch-video-analytics")
# mix -> (profile set's device, GPU memory, pipelines)
MIXES: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "ref4": ("NVIDIA H100 80GB HBM3", 80 << 30, REFERENCE),
    "torch3": ("NVIDIA H200", 141 << 30, TORCH),
    "all7": ("NVIDIA H200", 141 << 30, REFERENCE + TORCH),
}
# (registry name, options): the experiments' baselines, and MPS without caps
BASELINES: tuple[tuple[str, dict[str, str]], ...] = (
    ("exclusive", {}),
    ("exclusive", {"sharing": "mps"}),
    ("even", {}),
    ("feedback", {}),
)
GATEWAY = {"gateway_cpu_ms": "3.0", "gateway_workers": "8"}
HOST_MS = (0.0, 0.97)
RATE_QPS = 10.0  # each pipeline's rate at multiple 1
LOW_QPS = 10.0  # the low-load experiment's rate, all pipelines together (gpu-e.sh RATE)


def pipeline(name: str) -> PipelineInfo:
    directory = pipelines_dir() / "torch" if name.startswith("torch-") else None
    return from_config(load_pipeline(name, "full", directory))


def world(mix: str, gpus: int, host_ms: float, **options: str) -> PolicyInput:
    """Equal rates on `gpus` GPUs of the mix's device, every stage priced with `host_ms`."""
    device, memory, names = MIXES[mix]
    profiles = {k: p.with_host_ms(host_ms) for k, p in for_device(device).profiles.items()}
    node = NodeInfo("n0", tuple(GpuInfo(i, 132, memory) for i in range(gpus)))
    rates = dict.fromkeys(names, RATE_QPS)
    opts = {"weights": "from-load", **GATEWAY, **options}
    return PolicyInput(tuple(pipeline(n) for n in names), (node,), rates, profiles, options=opts)


def peak(world: PolicyInput, plan: PlanSpec, mix: Mapping[str, float], res: float = 1e-4) -> float:
    """The highest multiple of the rates `mix` at which the predictor passes `plan` (to `res`
    below; 0 where it fails even at a thousandth)."""

    def ok(x: float) -> bool:
        return predict(world, plan, {p: x * r for p, r in mix.items()}).feasible

    lo = 1e-3
    if not ok(lo):
        return 0.0
    hi = lo * 4
    while ok(hi):
        lo, hi = hi, hi * 4
    while hi / lo > 1 + res:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def low_load_share(mix: str, gpus: int, host_ms: float) -> float:
    """The SM percent min-resource's plan holds at `LOW_QPS` in all, split evenly."""
    w = world(mix, gpus, host_ms)
    w = replace(
        w,
        load_qps={p.name: LOW_QPS / len(w.pipelines) for p in w.pipelines},
        options={k: v for k, v in w.options.items() if k != "weights"},
    )
    plan = get_policy("min-resource").plan(w)
    return sum(r.sm_percent for a in plan.stages for r in a.replicas)


def row(mix: str, gpus: int, host_ms: float) -> dict[str, Any]:
    w = world(mix, gpus, host_ms)
    plan = get_policy("max-load").plan(w)
    total = RATE_QPS * len(w.pipelines)
    mine = peak(w, plan, w.load_qps) * total
    theirs = {}
    for name, options in BASELINES:
        label = name + "".join(f":{k}={v}" for k, v in options.items())
        base = get_policy(name).plan(world(mix, gpus, host_ms, **options))
        theirs[label] = peak(w, base, w.load_qps) * total
    best = max(theirs, key=lambda k: theirs[k])
    low = low_load_share(mix, gpus, host_ms)
    return {
        "mix": mix, "gpus": gpus, "host_ms": host_ms, "max_load_qps": round(mine, 1),
        "best_baseline": best, "best_baseline_qps": round(theirs[best], 1),
        "predicted_over_best_baseline": round(mine / theirs[best], 3) if theirs[best] else None,
        **{f"{k}_qps": round(v, 1) for k, v in theirs.items()},
        "min_resource_sm_percent_at_low_load": round(low, 1),
        # against a baseline holding every GPU (even and exclusive do, whatever the load)
        "predicted_low_load_saving": round(1 - low / (100.0 * gpus), 3),
        "reason": plan.reason,
    }  # fmt: skip


def rows(progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    out = []
    for mix in MIXES:
        for gpus in (1, 2):
            for host_ms in HOST_MS:
                out.append(row(mix, gpus, host_ms))
                progress(f"{mix} {gpus} GPU(s) host {host_ms}: {out[-1]['max_load_qps']} qps")
    return out


def summary(got: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per mix, GPUs and host part: the predicted peak ratio and low-load saving."""
    out: dict[str, Any] = {}
    for r in got:
        key = f"{r['mix']}.{r['gpus']}gpu.host_{r['host_ms']:g}"
        out[f"{key}.predicted_over_best_baseline"] = r["predicted_over_best_baseline"]
        out[f"{key}.predicted_low_load_saving"] = r["predicted_low_load_saving"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scheduler.tools.maxload_peaks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="", help="write <out>.json and <out>.md (common.results)")
    args = p.parse_args(argv)
    got = rows(lambda line: print(line, file=sys.stderr, flush=True))
    s = summary(got)
    for k, v in s.items():
        print(f"{k}: {v}")
    if args.out:
        out = Path(args.out)
        write_result(
            out.name, got, s, "host", out.parent,
            command=module_command("scheduler.tools.maxload_peaks", argv or sys.argv[1:]),
            notes=__doc__.split("\n\n", 2)[2].replace("\n", " ").strip(),
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
