"""What an open-loop run measured: one `Record` per request, a run's `Result`, and statistics.

A request's latency counts from its intended send time, not the actual send (see
`loadgen.openloop`), so the records keep both. Statistics count successful requests only and
give percentiles as values of real samples; runs of one mix pool their requests, so a
percentile over several runs is one over all their requests, not an average of percentiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadgen.inputs import Mix

OK = "OK"

# One stage of an answered query, from the gateway's answer: (stage, requests in the batch that
# ran it, microseconds inside the replica not computing, microseconds computing, the GPU's part
# of those where the stage measured it (StageTime.gpu_us), else 0).
StagePart = tuple[str, int, int, int, int]


@dataclass(frozen=True)
class Record:
    """One request. Times are monotonic microseconds; latency counts from the intended send."""

    pipeline: str
    intended_us: int
    sent_us: int
    done_us: int
    status: str
    plan_epoch: int = 0
    # Where the time went, from the gateway's answer (0 for failures), summed over the stages:
    # the gateway's own end-to-end time, its stage round trips, the time inside the replicas
    # (queue, batch wait, compute) and the compute alone.
    gateway_us: int = 0
    stage_rpc_us: int = 0
    in_replica_us: int = 0
    compute_us: int = 0
    # the same per stage, in execution order (empty for failures)
    stages: tuple[StagePart, ...] = ()

    @property
    def latency_us(self) -> int:
        return self.done_us - self.intended_us

    @property
    def ok(self) -> bool:
        return self.status == OK


def percentiles_ms(latencies_us: Sequence[int]) -> dict[str, float | None]:
    """p50, p90, p99, p99.9 and max in milliseconds; None for each when there are no samples."""
    keys = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
    if not latencies_us:
        return dict.fromkeys(keys)
    a = np.asarray(latencies_us, dtype=np.float64) / 1000.0
    # "higher": the value of a real sample at or above the rank, never an interpolation below it.
    qs = np.percentile(a, [50, 90, 99, 99.9], method="higher")
    return dict(zip(keys, [*(float(q) for q in qs), float(a.max())], strict=True))


def stats_of(records: Sequence[Record], duration_s: float) -> dict[str, Any]:
    """Counts, error codes and latency percentiles (of successful requests) for some records."""
    ok = [r.latency_us for r in records if r.ok]
    codes: dict[str, int] = {}
    for r in records:
        if not r.ok:
            codes[r.status] = codes.get(r.status, 0) + 1
    return {
        "count": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_codes": codes,
        "offered_qps": len(records) / duration_s if duration_s > 0 else 0.0,
        **percentiles_ms(ok),
    }


def pooled_stats(
    results: Sequence[Result], warmup_s: float = 0.0, from_sent: bool = False
) -> dict[str, dict[str, Any]]:
    """`Result.stats` over several runs of one mix taken together (each run's warm-up cut):
    a percentile over all their requests, not an average of percentiles. `from_sent` counts
    each latency from the actual send instead of the intended one (without the client's lag)."""
    kept = [r for res in results for r in res.measured(warmup_s)]
    if from_sent:
        kept = [dataclasses.replace(r, intended_us=r.sent_us) for r in kept]
    span = sum(max(res.duration_s - warmup_s, 1e-9) for res in results)
    out = {"all": stats_of(kept, span)}
    for name in results[0].mix.pipelines:
        out[name] = stats_of([r for r in kept if r.pipeline == name], span)
    return out


@dataclass
class Result:
    """Every request of one run, with the run's timeline; `stats` and `windows` summarise."""

    target: str
    mix: Mix
    transport: str
    t0_us: int
    started_unix_us: int
    duration_s: float
    records: list[Record] = field(default_factory=list)

    def measured(self, warmup_s: float = 0.0) -> list[Record]:
        cut = self.t0_us + int(warmup_s * 1e6)
        return [r for r in self.records if r.intended_us >= cut]

    def stats(self, warmup_s: float = 0.0) -> dict[str, dict[str, Any]]:
        """Per pipeline, and `"all"`, over requests intended after the warm-up."""
        return pooled_stats([self], warmup_s)

    def windows(self, window_s: float) -> list[dict[str, Any]]:
        """Consecutive windows of the run by intended time: count, errors and percentiles."""
        n = max(1, int(np.ceil(self.duration_s / window_s)))
        buckets: list[list[Record]] = [[] for _ in range(n)]
        for r in self.records:
            i = min(n - 1, max(0, int((r.intended_us - self.t0_us) / 1e6 / window_s)))
            buckets[i].append(r)
        return [{"t_s": i * window_s, **stats_of(b, window_s)} for i, b in enumerate(buckets)]

    def to_json(self, warmup_s: float = 0.0, with_records: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "target": self.target,
            "mix": self.mix.spec(),
            "transport": self.transport,
            "started_unix_us": self.started_unix_us,
            "duration_s": self.duration_s,
            "warmup_s": warmup_s,
            "stats": self.stats(warmup_s),
        }
        if with_records:
            doc["record_fields"] = [
                "pipeline", "intended_us", "sent_us", "done_us", "latency_us", "status",
            ]  # fmt: skip
            doc["records"] = [
                [
                    r.pipeline,
                    r.intended_us - self.t0_us,
                    r.sent_us - self.t0_us,
                    r.done_us - self.t0_us,
                    r.latency_us,
                    r.status,
                ]
                for r in self.records
            ]
        return doc
