"""Benchmark: the contention-aware predictor against co-locations it was never fitted on.

Profiles are fitted from each stage alone and beside a synthetic co-runner (a device copy). Here
stages of different pipelines share one GPU under MPS, each in its own process at its own share
and batch, all running batches back to back at the same time. Per stage the benchmark measures
its median batch latency and its throughput while all of them run, and the same stage alone at
that share just before (so a miss can be put on the profile or on the contention model), and
compares them with what `scheduler.perfmodel.predictor.predict` says for that placement: solo
latency from the profile at the share and batch, times the slowdown the predictor prices from the
co-runners' pressures.

Only samples from the interval in which every process of a co-location was running count (each
process stamps its batches with the host's monotonic clock), so a process that starts or stops
early never makes the others look faster. Processes build their stage as the profiler's worker
does (services/profiler/worker.py): the query inputs run through the stages before it, so its
inputs are real; CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is set before CUDA starts.

    python -m loadgen.bench_predictor --out docs/results \\
        --profiles scheduler/perfmodel/profiles_data/h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.progress import Progress
from common.results import module_command, write_result
from loadgen.colocation_measure import measure
from loadgen.colocations import SETS, TRAINING, check, check_disjoint, parse_colocation
from loadgen.predictor_score import predict, rescore, rows_for, summary_of
from scheduler.perfmodel.profilestore import MEASURED_PROFILES, load

COLUMNS = (
    "colocation", "stage", "share_pct", "batch", "measured_ms", "predicted_ms", "abs_pct_error",
    "measured_items_s", "predicted_items_s", "solo_measured_ms", "solo_profile_ms",
    "slowdown_measured", "slowdown_predicted",
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench_predictor", description=__doc__)
    parser.add_argument("--profiles", default=str(MEASURED_PROFILES))
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--size", default="full", choices=("tiny", "full"))
    parser.add_argument("--window-s", type=float, default=3.0, help="side-by-side time per case")
    parser.add_argument("--solo-repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cuda-graphs",
        choices=("on", "off"),
        default="on",
        help="run graph-safe models as CUDA graphs, as stages do by default",
    )
    parser.add_argument(
        "--colocation",
        action="append",
        default=[],
        help="pipe/stage@share:batch,... (repeatable; default: the built-in --set)",
    )
    parser.add_argument(
        "--set",
        choices=sorted(SETS),
        default="held-out",
        help="built-in co-locations: held-out (accuracy) or training (what "
        "loadgen.contention_fit calibrates from)",
    )
    parser.add_argument("--name", default="", help="result name (default: predictor, or "
                        "predictor-training for the training set)")  # fmt: skip
    parser.add_argument(
        "--rescore",
        default="",
        help="a measured result: make its predictions again from --profiles (CPU, no GPU)",
    )
    args = parser.parse_args(argv)
    profiles = load(args.profiles)
    argv_used = argv if argv is not None else sys.argv[1:]
    if args.rescore:
        measured = json.loads(Path(args.rescore).read_text())
        scored = rescore(measured["rows"], profiles)
        n = len({r["colocation"] for r in scored})
        paths = write_result(
            args.name or measured.get("name", "predictor"),
            scored,
            summary_of(scored, n),
            "cuda",
            args.out,
            COLUMNS,
            command=module_command("loadgen.bench_predictor", argv_used),
            notes=(
                f"Measured on {measured.get('device', '?')} at git {measured.get('git', '?')} "
                f"({measured.get('date', '?')}; {measured.get('command', '')}); predictions made "
                f"again from {args.profiles} at this commit. " + measured.get("notes", "")
            ),
            extra={"profiles": args.profiles, "measured": {
                k: measured.get(k) for k in ("git", "date", "device", "command")}},
        )  # fmt: skip
        print(f"wrote {paths[0]} and {paths[1]}")
        return
    cases = tuple(parse_colocation(t) for t in args.colocation) or SETS[args.set]
    check(cases, profiles)
    if args.set == "held-out":
        check_disjoint(cases, TRAINING)
    rows: list[dict[str, Any]] = []
    bar = Progress("co-locations", len(cases))
    for c in cases:
        preds = predict(c, profiles)
        together, solo = measure(
            c, args.size, args.seed, args.window_s, args.solo_repeats, args.cuda_graphs == "on"
        )
        got = rows_for(c, preds, together, solo)
        rows += got
        for r in got:
            print(
                f"{c.name}: {r['stage']} measured {r['measured_ms']} ms, "
                f"predicted {r['predicted_ms']} ms ({r['abs_pct_error']}%)",
                flush=True,
            )
        bar.advance()
    bar.close()
    paths = write_result(
        args.name or ("predictor" if args.set == "held-out" else "predictor-training"),
        rows,
        summary_of(rows, len(cases)),
        "cuda",
        args.out,
        COLUMNS,
        command=module_command("loadgen.bench_predictor", argv_used),
        notes=(
            "Each co-location runs its stages side by side in separate processes on one GPU "
            "under MPS, batches back to back; latency is the median CUDA-event batch time over "
            "the interval all were running; predicted is scheduler.perfmodel.predictor's solo "
            f"profile latency times its contention factor. Profiles: {args.profiles}."
        ),
        extra={"profiles": args.profiles, "window_s": args.window_s, "size": args.size},
    )
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
