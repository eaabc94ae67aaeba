"""How well a profile table predicts measurements it was not fitted on, for two monotone fits:

    python -m scheduler.tools.bench_profile_fit --out docs/results

The predictor reads a stage's latency between the measured (share, batch) points of its profile.
This takes each measured profile, drops one interior share row (or one interior batch column) at a
time, fits the rest, and predicts the dropped cells through `StageProfile.latency` (the same
interpolation the predictor uses), for:

- `envelope` (in use): non-decreasing in batch, then the running maximum from the top share down;
  never optimistic at a measured point, but one slow outlier raises every smaller share;
- `isotonic`: the least-squares fit in log space under both orders (Dykstra's alternating
  projections of pool-adjacent-violators along batch and along share), which averages an outlier
  with its neighbours instead of propagating it.

CPU only: the measurements are the committed GPU profiles (`--profiles`); the result names them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from common.results import module_command, write_result
from scheduler.perfmodel.profiles import StageProfile, monotone_table
from scheduler.perfmodel.profilestore import load

Table = tuple[tuple[float, ...], ...]
NAME = "profile-fit"


def pava(values: Sequence[float], increasing: bool = True) -> list[float]:
    """The least-squares monotone sequence nearest `values` (equal weights)."""
    sign = 1.0 if increasing else -1.0
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([sign * v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    out: list[float] = []
    for m, c in blocks:
        out += [sign * m] * int(c)
    return out


def isotonic_table(table: Table, iterations: int = 500) -> Table:
    """Rows (shares, ascending) non-increasing down each column, columns (batches, ascending)
    non-decreasing along each row; least squares in log latency."""
    y = np.log(np.asarray(table, dtype=float))
    x, p, q = y.copy(), np.zeros_like(y), np.zeros_like(y)
    for _ in range(iterations):
        z = np.array([pava(row, increasing=True) for row in x + p])
        p = x + p - z
        nxt = np.array([pava(col, increasing=False) for col in (z + q).T]).T
        q = z + q - nxt
        done = float(np.max(np.abs(nxt - x))) < 1e-12
        x = nxt
        if done:
            break
    # the alternation converges to within rounding; make the orders exact
    x = np.maximum.accumulate(x, axis=1)
    for i in range(x.shape[0] - 2, -1, -1):
        x[i] = np.maximum(x[i], x[i + 1])
    return tuple(tuple(float(v) for v in row) for row in np.exp(x))


FITS: dict[str, Callable[[Table], Table]] = {
    "envelope": monotone_table,
    "isotonic": isotonic_table,
}


def _fitted(p: StageProfile, shares: Sequence[float], batches: Sequence[int], table: Table,
            fit: Callable[[Table], Table]) -> StageProfile:  # fmt: skip
    q = replace(p, shares=tuple(shares), batches=tuple(batches), latency_ms=table)
    object.__setattr__(q, "_table", fit(table))  # the fit under test, not the profile's own
    object.__setattr__(q, "_memo", {})
    return q


def held_out_errors(p: StageProfile, fit: Callable[[Table], Table]) -> list[float]:
    """Absolute relative errors on every cell of each interior share row and batch column,
    predicted from the table without that row or column."""
    errors = []
    s, b, t = p.shares, p.batches, p.latency_ms
    for i in range(1, len(s) - 1):
        q = _fitted(p, s[:i] + s[i + 1 :], b, t[:i] + t[i + 1 :], fit)
        errors += [abs(q.latency(s[i], bj) - t[i][j]) / t[i][j] for j, bj in enumerate(b)]
    for j in range(1, len(b) - 1):
        q = _fitted(p, s, b[:j] + b[j + 1 :], tuple(r[:j] + r[j + 1 :] for r in t), fit)
        errors += [abs(q.latency(si, b[j]) - t[i][j]) / t[i][j] for i, si in enumerate(s)]
    return errors


def run(profiles_path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pooled: dict[str, list[float]] = {name: [] for name in FITS}
    for key, p in sorted(load(profiles_path).items()):
        if p.synthetic or len(p.shares) < 3 or len(p.batches) < 3:
            continue
        row: dict[str, Any] = {"stage": key}
        for name, fit in FITS.items():
            errs = held_out_errors(p, fit)
            pooled[name] += errs
            row[f"{name}_mape"] = round(statistics.fmean(errs), 4)
            row["cells"] = len(errs)
        rows.append(row)
    summary: dict[str, Any] = {"held_out_cells": len(pooled["envelope"])}
    for name, errs in pooled.items():
        summary[f"{name}_mape"] = round(statistics.fmean(errs), 4)
        summary[f"{name}_median_ape"] = round(statistics.median(errs), 4)
    return rows, summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.tools.bench_profile_fit", description=__doc__
    )
    parser.add_argument("--profiles", default="scheduler/perfmodel/profiles_data/h100.json")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    rows, summary = run(args.profiles)
    doc = load(args.profiles)
    device = next(iter(doc.values())).device if doc else ""
    write_result(
        NAME,
        rows,
        summary,
        "host",
        args.out,
        ["stage", "cells", "envelope_mape", "isotonic_mape"],
        command=module_command(
            "scheduler.tools.bench_profile_fit", list(argv) if argv is not None else sys.argv[1:]
        ),
        notes=(
            f"Computed on the CPU from the committed GPU profiles ({args.profiles}, measured on "
            f"{device}). Errors are fractions of the measured latency; `*_mape` is their mean, "
            "`*_median_ape` their median. A row or column is held out only where the profile "
            "keeps at least one measured neighbour on each side."
        ),
    )
    print(summary)


if __name__ == "__main__":
    main()
