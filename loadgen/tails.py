"""Where the slow queries' time went: a trial's over-target queries split by component.

A p99 that misses says that something was slow, not what. Every answered query carries the
gateway's account of it (`records.Record`): its own end-to-end time, the round trips to its
stages, the time inside the replicas and the compute alone. From the client's side the rest is
known too: how late the query left (the client fell behind its timeline) and the time on the
wire and in the gateway before it started timing. Split per query, these add up to its latency:

    lag      intended send -> actual send (the load generator's own delay)
    client   actual send -> answer, less the gateway's time (serialisation, connection, queueing
             in gRPC before the handler runs)
    gateway  the gateway's time less its stage round trips (checks, buffers, copies, Python)
    hops     stage round trips less the time inside the replicas (gRPC between services)
    waiting  inside the replicas, not computing (queue and batch wait)
    compute  the replicas' compute (GPU work, as the replica timed it)

Stages of one pipeline that run side by side make the round trips overlap; then `gateway` is
clamped at 0 and the parts add up to more than the latency. The split of the queries over their
target is compared with the median query's, so a reader sees which part grew.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loadgen.records import Record

PARTS = ("lag", "client", "gateway", "hops", "waiting", "compute")


def split_us(r: Record) -> dict[str, int]:
    """One answered query's latency split into `PARTS`, in microseconds."""
    replica_wait = max(0, r.in_replica_us - r.compute_us)
    return {
        "lag": max(0, r.sent_us - r.intended_us),
        "client": max(0, (r.done_us - r.sent_us) - r.gateway_us),
        "gateway": max(0, r.gateway_us - r.stage_rpc_us),
        "hops": max(0, r.stage_rpc_us - r.in_replica_us),
        "waiting": replica_wait,
        "compute": max(0, r.compute_us),
    }


def _mean_ms(records: Sequence[Record]) -> dict[str, float | None]:
    if not records:
        return dict.fromkeys(PARTS)
    splits = (split_us(r) for r in records)
    parts = np.array([[s[k] for k in PARTS] for s in splits], dtype=np.float64)
    return dict(zip(PARTS, (float(v) for v in parts.mean(axis=0) / 1000.0), strict=True))


def breakdown(records: Sequence[Record], qos_ms: Mapping[str, float]) -> dict[str, float | None]:
    """Mean split of the answered queries over their pipeline's target (`tail.<part>_ms`), of
    the queries at or under it (`typical.<part>_ms`), how many were over (`over_qos`), and the
    smallest number of answered queries of any pipeline of the mix (`min_pipeline_count`: a p99
    over fewer than 100 queries is their slowest one)."""
    ok = [r for r in records if r.ok and r.pipeline in qos_ms]
    over = [r for r in ok if r.latency_us > qos_ms[r.pipeline] * 1000]
    under = [r for r in ok if r.latency_us <= qos_ms[r.pipeline] * 1000]
    counts = [sum(r.pipeline == p for r in ok) for p in qos_ms]
    out: dict[str, float | None] = {
        "over_qos": float(len(over)),
        "min_pipeline_count": float(min(counts)) if counts else 0.0,
    }
    for label, group in (("tail", over), ("typical", under)):
        for part, v in _mean_ms(group).items():
            out[f"{label}.{part}_ms"] = v
    return out
