"""How much longer a stage's batch takes in the mesh than its profile says: the host's part.

    python -m scheduler.tools.stage_host_fit docs/results/peak-load-h100-ref4-1731d70.json \
        [--profiles scheduler/perfmodel/profiles_data/h100.json] [--fit-max-qps 150] \
        [--out docs/results/stage-host-fit-h100-1731d70]

`--profiles` defaults to the committed set for the result's device, as the scheduler picks it.

A profile is the GPU time of a stage's `infer` alone (CUDA events, services/profiler). A replica's
batch, as the stage reports it (`StageTime.compute_us`, each row's `stages` in a peak-load
result), is also its inputs stacked, its outputs copied into their buffers, a blocking-sync wait
and the hand-offs to and from its GPU thread. Per row of a peak-load result (one policy at one
rate) and each stage that ran as one replica on its own share (not time-sliced), this compares
the measured compute with the profile's latency at that share and the row's mean batch.

Where the stages timed their own `infer` (`gpu_ms`, StageTimings.gpu_us), the summary also gives
the host's part as measured (`measured_host_ms`, compute - gpu) and the GPU's part over the
profile (`gpu_over_profile`), which tell a host cost from co-runners slowing the kernels. Where
the plans kept the host part each stage was priced with (`host_ms`: learned by the scheduler from
the stages' reports, else `stage_host_ms`), `held_out_mape_as_priced` is the error of those.

The fit is the median of (measured - profile) over the rows at or below `--fit-max-qps` (default:
the result's lowest rate), where the GPU is least busy, so co-runners slow the kernels least: the
scheduler's `stage_host_ms`
(`CAMELOT_STAGE_HOST_MS`). The rows above it are held out: their error with the profile alone
and with the fitted term added. Runs on the CPU from committed results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from common.results import module_command, write_result
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import for_device, load

# rows of these policies time-share whole GPUs, where a batch waits its turn: not one share
TIME_SLICED = ("plain", "exclusive")


def plan_shares(
    plans: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, int], dict[str, tuple[float, float | None]]]:
    """Per (mix, epoch): each stage's share where it ran as one replica on its own share, and
    the host part the plan priced it with (None: a plan from before the plans kept it)."""
    out: dict[tuple[str, int], dict[str, tuple[float, float | None]]] = {}
    for p in plans:
        shares = {}
        for s in p.get("stages", []):
            one = len(s.get("sm_percent", [])) == 1 and not any(s.get("time_sliced", []))
            if one and s["sm_percent"][0] > 0:
                host = s.get("host_ms")
                shares[s["stage"]] = (float(s["sm_percent"][0]), None if host is None else host)
        out[(p["mix"], int(p["epoch"]))] = shares
    return out


def points(result: Mapping[str, Any], profiles: Mapping[str, StageProfile]) -> list[dict[str, Any]]:
    """One point per row and stage: the rate, the stage, its share and mean batch, the measured
    compute and the profile's latency there."""
    shares = plan_shares(result.get("plans", []))
    out = []
    for row in result.get("rows", []):
        stages, epoch = row.get("stages"), row.get("plan_epoch")
        if not stages or epoch is None or row.get("policy") in TIME_SLICED:
            continue
        plan = shares.get((row["mix"], int(epoch)), {})
        for key, m in stages.items():
            prof, planned = profiles.get(key), plan.get(key)
            if prof is None or planned is None or not m.get("compute_ms") or not m.get("batch"):
                continue
            share, priced_host_ms = planned
            point = {"policy": row["policy"], "rate_qps": float(row["rate_qps"]), "stage": key,
                     "share": share, "batch": float(m["batch"]),
                     "measured_ms": float(m["compute_ms"]),
                     "profile_ms": prof.latency(share, float(m["batch"]))}  # fmt: skip
            if priced_host_ms is not None:
                # what the plan added for the host (learned from the stages, or the setting)
                point["priced_host_ms"] = float(priced_host_ms)
            if m.get("gpu_ms"):
                # the stage timed its own infer (StageTimings.gpu_us): the GPU's part measured
                point["gpu_ms"] = float(m["gpu_ms"])
            out.append(point)
    return out


def mape(rows: Sequence[Mapping[str, Any]], host_ms: float | None) -> float | None:
    """The mean relative error of profile + `host_ms` (None: each row's `priced_host_ms`, the
    rows that have one) against the measured compute."""
    if host_ms is None:
        rows = [r for r in rows if "priced_host_ms" in r]
    errs = [
        abs(r["profile_ms"] + (r["priced_host_ms"] if host_ms is None else host_ms)
            - r["measured_ms"]) / r["measured_ms"]
        for r in rows
    ]  # fmt: skip
    return statistics.fmean(errs) if errs else None


def fit(pts: Sequence[Mapping[str, Any]], fit_max_qps: float) -> dict[str, Any]:
    train = [p for p in pts if p["rate_qps"] <= fit_max_qps]
    test = [p for p in pts if p["rate_qps"] > fit_max_qps]
    if not train:
        raise InvalidArgument(f"no row at or below {fit_max_qps:g} qps to fit on")
    host_ms = max(0.0, statistics.median(p["measured_ms"] - p["profile_ms"] for p in train))
    timed = [p for p in train if "gpu_ms" in p]
    split = {}
    if timed:
        # where the stages timed their own GPU work: the host's part measured, not inferred, and
        # how far the GPU's part is from the profile (co-runners, or a profile off)
        split = {
            "measured_host_ms": statistics.median(p["measured_ms"] - p["gpu_ms"] for p in timed),
            "gpu_over_profile": statistics.median(p["gpu_ms"] / p["profile_ms"] for p in timed),
        }
    priced = {}
    if any("priced_host_ms" in p for p in test):
        # the plans' own host parts (each stage's learned one, or the setting) on the same rows
        priced = {"held_out_mape_as_priced": mape(test, None)}
    return {
        "stage_host_ms": round(host_ms, 4),
        "fit_points": len(train),
        "held_out_points": len(test),
        "fit_mape_profile": mape(train, 0.0),
        "fit_mape_with_host": mape(train, host_ms),
        "held_out_mape_profile": mape(test, 0.0),
        "held_out_mape_with_host": mape(test, host_ms),
        **split,
        **priced,
    }


# what the Markdown says above the summary: what was compared with what
NOTES = (
    "A stage's batch in the mesh (`compute_us`: stack, infer, copies out, wait, hand-offs) "
    "against its profile (the GPU time of `infer` alone) at the plan's share and the row's mean "
    "batch. Fitted on the rows at or below {fit:g} qps, held out above."
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scheduler.tools.stage_host_fit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("result", help="a peak-load result JSON whose rows have `stages`")
    p.add_argument(
        "--profiles",
        default="auto",
        help="the profile set the run planned with (auto: the committed set for the result's "
        "device, as the scheduler chooses it)",
    )
    p.add_argument(
        "--fit-max-qps",
        type=float,
        default=None,
        help="fit on the rows at or below this rate (default: the result's lowest rate)",
    )
    p.add_argument("--out", default="", help="write <out>.json and <out>.md (common.results)")
    args = p.parse_args(argv)
    try:
        result = json.loads(Path(args.result).read_text())
        if args.profiles == "auto":
            profiles = for_device(str(result.get("device", ""))).profiles
        else:
            profiles = load(args.profiles)
        pts = points(result, profiles)
        if args.fit_max_qps is None:
            # the least loaded rows, whatever rate the search started at
            args.fit_max_qps = min((p["rate_qps"] for p in pts), default=0.0)
        summary = fit(pts, args.fit_max_qps)
    except (OSError, ValueError, InvalidArgument) as e:
        print(f"stage_host_fit: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    if args.out:
        out = Path(args.out)
        write_result(
            out.name, pts, summary, result.get("backend", ""), out.parent,
            command=module_command("scheduler.tools.stage_host_fit", argv or sys.argv[1:]),
            device=result.get("device", ""), notes=NOTES.format(fit=args.fit_max_qps),
            extra={"source": {"result": args.result, "git": result.get("git", ""),
                              "date": result.get("date", "")},
                   "fit_max_qps": args.fit_max_qps},
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
