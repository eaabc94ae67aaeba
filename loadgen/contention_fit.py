"""Calibrating the predictor's contention model on measured co-locations.

A stage's profiled pressure is the bandwidth it takes from a streaming-copy co-runner; its
neighbours in a real co-location are GEMM- and convolution-heavy stages, which it slows more
than that number says (on the H100 under MPS: 1.1-1.4x measured where the uncalibrated model
prices 1.02-1.1x). One device-wide factor, `pressure_scale`, maps the one onto the other: every
stage's exerted pressure is multiplied by it before the co-runners' sensitivity curves read it.

It is fitted on the training co-locations (`loadgen.bench_predictor --set training`), never on
the held-out ones the accuracy is reported on (their stage pairs are disjoint, checked there):
the scale minimising the mean absolute relative error of the predicted *slowdown* (so errors of
the solo profiles, which the scale cannot fix, do not pull it), by a log-spaced grid search.

    python -m loadgen.contention_fit docs/results/predictor-training.json \\
        --profiles scheduler/perfmodel/profiles_data/h100.json  # writes the scale into the profiles
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.errors import InvalidArgument
from common.results import module_command, write_result
from loadgen.colocations import Colocation
from loadgen.predictor_score import colocations_of, predict
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import load

GRID = np.geomspace(0.25, 40.0, 321)


def scaled(profiles: Mapping[str, StageProfile], scale: float) -> dict[str, StageProfile]:
    return {k: replace(p, pressure_scale=scale) for k, p in profiles.items()}


def slowdown_error(
    cases: Sequence[tuple[Colocation, list[float]]], profiles: Mapping[str, StageProfile]
) -> float:
    """Mean absolute relative error of the predicted slowdowns."""
    errs = []
    for c, measured in cases:
        for p, m in zip(predict(c, profiles), measured, strict=True):
            errs.append(abs(p.factor - m) / m)
    return float(np.mean(errs))


def fit(
    cases: Sequence[tuple[Colocation, list[float]]], profiles: Mapping[str, StageProfile]
) -> tuple[float, float, float, list[float]]:
    """(best scale, slowdown error at scale 1, slowdown error at the best scale, the error at
    every scale of GRID)."""
    errors = [slowdown_error(cases, scaled(profiles, float(k))) for k in GRID]
    best = int(np.argmin(errors))
    return float(GRID[best]), slowdown_error(cases, scaled(profiles, 1.0)), errors[best], errors


def write_scale(path: Path, scale: float, note: str) -> None:
    """Sets every stage's pressure_scale in a profiles document, keeping everything else."""
    doc = json.loads(path.read_text())
    for obj in doc["profiles"].values():
        obj["pressure_scale"] = round(scale, 4)
    doc["contention_note"] = note
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    load(path)  # still a valid document


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m loadgen.contention_fit", description=__doc__)
    p.add_argument("training", help="a bench_predictor result of the training set")
    p.add_argument("--profiles", required=True, help="profiles JSON the scale is written into")
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--dry-run", action="store_true", help="report the fit, write nothing")
    args = p.parse_args(argv)
    try:
        doc = json.loads(Path(args.training).read_text())
        cases = colocations_of(doc["rows"])
        profiles = scaled(load(args.profiles), 1.0)
        missing = sorted({m.key for c, _ in cases for m in c.members} - set(profiles))
        if missing:
            raise InvalidArgument(f"no profile for {missing}")
    except (OSError, KeyError, ValueError, InvalidArgument) as e:
        print(f"contention_fit: {e}", file=sys.stderr)
        return 2
    scale, before, after, errors = fit(cases, profiles)
    note = (
        f"pressure_scale {scale:.4g} fitted by loadgen.contention_fit on {args.training} "
        f"({len(cases)} co-locations, git {doc.get('git', '?')}): slowdown error "
        f"{before:.3f} -> {after:.3f} on those"
    )
    print(note)
    if args.dry_run:
        return 0
    write_scale(Path(args.profiles), scale, note)
    # the grid the fit already scanned, every 8th scale
    rows = [
        {"pressure_scale": round(float(k), 4), "slowdown_error": round(e, 4)}
        for k, e in zip(GRID[::8], errors[::8], strict=True)
    ]
    write_result(
        "contention-fit",
        rows,
        {"pressure_scale": round(scale, 4), "slowdown_error_unscaled": round(before, 4),
         "slowdown_error_fitted": round(after, 4), "training_colocations": len(cases)},
        "cuda",
        args.out_dir,
        ["pressure_scale", "slowdown_error"],
        command=module_command("loadgen.contention_fit", argv),
        notes=f"Fitted on {args.training} (measured at git {doc.get('git', '?')}); rows: the "
        "training error along the grid. The held-out accuracy is predictor.json's.",
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
