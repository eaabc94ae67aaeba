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

`by_stage` says the same per stage: how large the batches were that ran a pipeline's queries,
how long they waited in the replica and computed, for the queries over target and the rest. A
replica whose batches stay small while its queries wait (whole GPUs taken in turns, say) shows
there, where the sums above cannot say which stage it was.
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


def lag_p99_ms(records: Sequence[Record]) -> float:
    """How late the load generator's sends left, p99 over every query sent (answered or not):
    past a few milliseconds the client, not the server, is in the latencies (0 for none)."""
    lags = [r.sent_us - r.intended_us for r in records if r.sent_us]
    return float(np.percentile(lags, 99)) / 1000.0 if lags else 0.0


def by_stage(records: Sequence[Record], qos_ms: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per `pipeline/stage` of the answered queries: `queries`, mean `batch`, `waiting_ms` and
    `compute_ms` over all of them, and the same (`tail.*`) over the queries over their
    pipeline's target where there were any; and `gpu_ms`, the GPU's part of `compute_ms`,
    over the queries whose stage measured it (none: no `gpu_ms`). A stage a query ran twice (a
    retry elsewhere) counts each time."""
    # per stage: [queries, batch, waiting_us, compute_us, measured, gpu_us] summed, over all
    # and over the tail
    sums: dict[str, list[float]] = {}
    tails: dict[str, list[float]] = {}
    for r in records:
        if not r.ok or r.pipeline not in qos_ms:
            continue
        over = r.latency_us > qos_ms[r.pipeline] * 1000
        for stage, batch, waiting_us, compute_us, gpu_us in r.stages:
            key = f"{r.pipeline}/{stage}"
            for into in (sums, tails) if over else (sums,):
                acc = into.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
                acc[0] += 1
                acc[1] += batch
                acc[2] += waiting_us
                acc[3] += compute_us
                if gpu_us > 0:
                    acc[4] += 1
                    acc[5] += gpu_us
    out: dict[str, dict[str, float]] = {}
    for key in sorted(sums):
        out[key] = _means(sums[key], "")
        if key in tails:
            out[key].update(_means(tails[key], "tail."))
    return out


def _means(acc: list[float], prefix: str) -> dict[str, float]:
    n, batch, waiting_us, compute_us, measured, gpu_us = acc
    out = {
        f"{prefix}queries": n,
        f"{prefix}batch": round(batch / n, 3),
        f"{prefix}waiting_ms": round(waiting_us / n / 1000, 4),
        f"{prefix}compute_ms": round(compute_us / n / 1000, 4),
    }
    if measured:
        out[f"{prefix}gpu_ms"] = round(gpu_us / measured / 1000, 4)
    return out
