"""Scoring the predictor on co-locations (CPU only): its prediction, and how far it missed.

`predict` asks `scheduler.perfmodel.predictor` for each member's batch latency beside the
others, as the scheduler would for that placement, with every replica busy all the time as in
the measurement. `rows_for` sets a measurement beside it, member by member (latency,
throughput, solo latency, slowdown, and their absolute percentage errors), and `summary_of`
gives the MAPEs. The measurements do not depend on the profiles, so `rescore` scores a new
profile set or calibration on runs measured before, with no GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgument
from loadgen.colocations import Colocation, Member, check
from scheduler.perfmodel import predictor
from scheduler.perfmodel.profiles import StageProfile
from scheduler.policy import (
    GpuInfo,
    NodeInfo,
    PipelineInfo,
    PlanSpec,
    PolicyInput,
    ReplicaSpec,
    StageAssignment,
    StageInfo,
)

NODE = "bench"


@dataclass(frozen=True)
class Prediction:
    latency_ms: float
    solo_ms: float
    factor: float


def predict(c: Colocation, profiles: Mapping[str, StageProfile]) -> list[Prediction]:
    """Per member: the predictor's batch latency beside the others, all busy back to back."""
    pipelines, stages = [], []
    for i, m in enumerate(c.members):
        pipelines.append(PipelineInfo(m.pipeline, (StageInfo(m.stage, m.batch),), math.inf))
        rep = ReplicaSpec(f"{m.key}.{i}", NODE, 0, m.share, m.batch)
        stages.append(StageAssignment(m.pipeline, m.stage, (rep,)))
    # far above any capacity: every replica is busy all the time, as in the measurement
    rates = {m.pipeline: 1e9 for m in c.members}
    world = PolicyInput(
        tuple(pipelines),
        (NodeInfo(NODE, (GpuInfo(0, 132, 80 << 30),)),),
        rates,
        {m.key: profiles[m.key] for m in c.members},
    )
    plan = predictor.predict(world, PlanSpec("bench", tuple(stages)), rates)
    out = []
    for m in c.members:
        factor = plan.stage(m.pipeline, m.stage).replicas[0].factor
        solo = profiles[m.key].latency(m.share, m.batch)
        out.append(Prediction(solo * factor, solo, factor))
    return out


def abs_pct_error(measured: float, predicted: float) -> float:
    if not (measured > 0 and math.isfinite(measured) and math.isfinite(predicted)):
        return math.nan
    return 100.0 * abs(predicted - measured) / measured


def mape(errors: Sequence[float]) -> float:
    """Mean of the finite absolute percentage errors (NaN when there is none)."""
    ok = [e for e in errors if math.isfinite(e)]
    return sum(ok) / len(ok) if ok else math.nan


def rows_for(
    c: Colocation,
    preds: Sequence[Prediction],
    together: Sequence[tuple[float, float, int]],
    solo_ms: Sequence[float],
) -> list[dict[str, Any]]:
    """One row per member. `together`: (median ms, items/s, samples) measured side by side."""
    rows = []
    for m, p, (ms, tput, n), solo in zip(c.members, preds, together, solo_ms, strict=True):
        pred_tput = 1000.0 * m.batch / p.latency_ms
        rows.append(
            {
                "colocation": c.name,
                "stage": m.key,
                "share_pct": m.share,
                "batch": m.batch,
                "measured_ms": _r(ms),
                "predicted_ms": _r(p.latency_ms),
                "abs_pct_error": _r(abs_pct_error(ms, p.latency_ms)),
                "measured_items_s": _r(tput),
                "predicted_items_s": _r(pred_tput),
                "throughput_abs_pct_error": _r(abs_pct_error(tput, pred_tput)),
                "solo_measured_ms": _r(solo),
                "solo_profile_ms": _r(p.solo_ms),
                "slowdown_measured": _r(ms / solo if solo > 0 else math.nan),
                "slowdown_predicted": _r(p.factor),
                "samples": n,
            }
        )
    return rows


def colocations_of(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Colocation, list[float]]]:
    """The co-locations of a result's rows, each with its members' measured slowdowns."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r["colocation"]), []).append(r)
    out = []
    for name, members in groups.items():
        ms = []
        for r in members:
            pipeline, _, stage = str(r["stage"]).partition("/")
            ms.append(Member(pipeline, stage, float(r["share_pct"]), int(r["batch"])))
        slowdowns = [float(r["slowdown_measured"]) for r in members]
        if not all(math.isfinite(v) and v > 0 for v in slowdowns):
            raise InvalidArgument(f"{name}: measured slowdowns must be finite and > 0")
        out.append((Colocation(name, tuple(ms)), slowdowns))
    if not out:
        raise InvalidArgument("the result has no rows")
    return out


def rescore(
    rows: Sequence[Mapping[str, Any]], profiles: Mapping[str, StageProfile]
) -> list[dict[str, Any]]:
    """A measured result's rows with the predictions made again from `profiles` (no GPU): the
    measurements do not depend on the profiles, so a new profile set or calibration is scored
    on the same held-out runs."""
    measured = {(str(r["colocation"]), str(r["stage"])): r for r in rows}
    out: list[dict[str, Any]] = []
    for c, _ in colocations_of(rows):
        check([c], profiles)
        got = [measured[(c.name, m.key)] for m in c.members]
        together = [
            (float(r["measured_ms"]), float(r["measured_items_s"]), int(r.get("samples", 0)))
            for r in got
        ]
        out += rows_for(
            c, predict(c, profiles), together, [float(r["solo_measured_ms"]) for r in got]
        )
    return out


def summary_of(rows: Sequence[Mapping[str, Any]], colocations: int) -> dict[str, Any]:
    """MAPEs as fractions (0.10 is 10%), as RESULTS.md's targets are written; rows keep percent."""
    return {
        "latency_mape": _r(mape([r["abs_pct_error"] for r in rows]) / 100),
        "throughput_mape": _r(mape([r["throughput_abs_pct_error"] for r in rows]) / 100),
        "held_out_colocations": colocations,
        # the profile's share of the miss: solo measured now against the profile's solo
        "solo_profile_mape": _r(
            mape([abs_pct_error(r["solo_measured_ms"], r["solo_profile_ms"]) for r in rows]) / 100
        ),
        "slowdown_mape": _r(
            mape([abs_pct_error(r["slowdown_measured"], r["slowdown_predicted"]) for r in rows])
            / 100
        ),
    }


def _r(x: float) -> float:
    return round(x, 4) if math.isfinite(x) else x
