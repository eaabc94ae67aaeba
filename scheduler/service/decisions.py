"""What the control loop decided, kept for the operator: per pipeline the last trigger the loop
evaluated, the last re-plan (when, why, what changed) and the last failed one.

A decision names the pipelines it concerns: a trigger names one ("load moved: p ..."), a plan
that changed several names each with what changed in it, a structural reason (initial plan,
nodes changed, an admin operation) names them all. `Decisions.record` also counts each kind in
the Prometheus metrics, so a dashboard sees the same as `camelotctl status`.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common import metrics
from protos import admin_pb2, plan_pb2


class Decision(enum.Enum):
    TRIGGER = "trigger"  # a reason to re-plan the loop evaluated
    REPLANNED = "replanned"  # a new plan changed the pipeline's replicas
    RESIZED = "resized"  # a new plan with the same replicas, sized for a new load
    KEPT = "kept"  # the policy kept the plan in force as it is
    # no plan met the QoS (clamped), the policy failed or its plan was refused, or a replica of
    # the plan in force ran out of GPU memory at start
    FAILED = "failed"


@dataclass(frozen=True)
class Event:
    unix_s: float
    reason: str
    epoch: int = 0
    detail: str = ""

    def to_proto(self) -> admin_pb2.LoopEvent:
        return admin_pb2.LoopEvent(
            unix_s=self.unix_s, reason=self.reason, epoch=self.epoch, detail=self.detail
        )


class Decisions:
    """The last event of each kind per pipeline (failed and trigger apart from re-plans)."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, Decision], Event] = {}

    def record(
        self,
        kind: Decision,
        pipelines: Iterable[str],
        reason: str,
        epoch: int = 0,
        detail: str | Mapping[str, str] = "",
    ) -> None:
        """One decision for `pipelines`; `detail` per pipeline where it is a mapping."""
        now = time.time()
        for p in pipelines:
            d = detail.get(p, "") if isinstance(detail, Mapping) else detail
            self._last[(p, kind)] = Event(now, reason, epoch, d)
            metrics.LOOP_DECISIONS.labels(pipeline=p, decision=kind.value).inc()
            metrics.LOOP_LAST_DECISION.labels(pipeline=p, decision=kind.value).set(now)

    def last(self, pipeline: str, *kinds: Decision) -> Event | None:
        """The newest event of any of `kinds` for the pipeline."""
        events = [e for k in kinds if (e := self._last.get((pipeline, k))) is not None]
        return max(events, key=lambda e: e.unix_s) if events else None

    def to_proto(
        self, pipeline: str, planned_qps: float, measured_qps: float
    ) -> admin_pb2.PipelineLoop:
        out = admin_pb2.PipelineLoop(
            pipeline=pipeline, planned_qps=planned_qps, measured_qps=measured_qps
        )
        for field, kinds in (
            ("last_trigger", (Decision.TRIGGER,)),
            ("last_replan", (Decision.REPLANNED, Decision.RESIZED)),
            ("last_failed", (Decision.FAILED,)),
        ):
            e = self.last(pipeline, *kinds)
            if e is not None:
                getattr(out, field).CopyFrom(e.to_proto())
        return out


def _shape(stages: Iterable[plan_pb2.StagePlan]) -> dict[tuple[str, str], list[tuple[float, int]]]:
    return {
        (st.pipeline, st.stage): sorted((r.sm_percent, r.max_batch) for r in st.replicas)
        for st in stages
    }


def changes(old: plan_pb2.Plan, new: plan_pb2.Plan) -> dict[str, str]:
    """Per pipeline whose replicas changed, what changed: "acoustic 5%x1 -> 15%x2"."""
    before, after = _shape(old.stages), _shape(new.stages)
    out: dict[str, list[str]] = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, []), after.get(key, [])
        if a == b:
            continue
        out.setdefault(key[0], []).append(f"{key[1]} {_replicas(a)} -> {_replicas(b)}")
    return {p: "; ".join(parts) for p, parts in out.items()}


def _replicas(rs: list[tuple[float, int]]) -> str:
    if not rs:
        return "none"
    shares = sorted({s for s, _ in rs})
    share = "/".join(f"{s:g}%" for s in shares)
    return f"{share}x{len(rs)} b{max(b for _, b in rs)}"


def beyond_band(
    a: float,
    b: float,
    fraction: float,
    floor_qps: float,
    window_s: float = 0.0,
    sigmas: float = 0.0,
) -> bool:
    """Whether a load that was `a` qps and is measured at `b` moved past the band: `fraction` of
    a (of `floor_qps` at least) and, where a window is given, `sigmas` standard deviations of the
    rate a Poisson count of arrivals over `window_s` shows while the load is still a (at 1 qps
    over 5 s a sigma is 0.45 qps, a band of 0.25 qps is noise; at 12 qps both are ~1.5-3 qps)."""
    if max(a, b) < floor_qps:
        return False
    base = max(a, floor_qps)
    band = fraction * base
    if window_s > 0 and sigmas > 0:
        band = max(band, sigmas * math.sqrt(base / window_s))
    return abs(b - a) > band


def load_moved(
    old: Mapping[str, float],
    new: Mapping[str, float],
    fraction: float,
    floor_qps: float,
    window_s: float = 0.0,
    sigmas: float = 0.0,
) -> dict[str, str]:
    """Pipelines whose planned load moved past the band (as the loop's trigger measures it)."""
    out = {}
    for p in sorted(set(old) | set(new)):
        a, b = old.get(p, 0.0), new.get(p, 0.0)
        if beyond_band(a, b, fraction, floor_qps, window_s, sigmas):
            out[p] = f"planned load {a:.1f} -> {b:.1f} qps"
    return out
