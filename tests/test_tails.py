"""Where a trial's slow queries spent their time (`loadgen.tails`), on records built by hand."""

from __future__ import annotations

import pytest

from loadgen.records import Record
from loadgen.tails import PARTS, breakdown, by_stage, split_us


def record(pipeline: str, *, lag=0, client=0, gateway=0, hops=0, waiting=0, compute=0,
           status="OK") -> Record:  # fmt: skip
    """A query whose latency is the sum of the given parts (microseconds)."""
    in_replica = waiting + compute
    stage_rpc = in_replica + hops
    gateway_us = stage_rpc + gateway
    sent = 1_000 + lag
    done = sent + gateway_us + client
    return Record(pipeline, 1_000, sent, done, status, 1, gateway_us, stage_rpc, in_replica,
                  compute)  # fmt: skip


def test_the_parts_of_a_query_add_up_to_its_latency():
    r = record("a", lag=100, client=2_000, gateway=3_000, hops=4_000, waiting=5_000, compute=6_000)
    parts = split_us(r)
    assert parts == {"lag": 100, "client": 2_000, "gateway": 3_000, "hops": 4_000,
                     "waiting": 5_000, "compute": 6_000}  # fmt: skip
    assert sum(parts.values()) == r.latency_us


def test_overlapping_stage_round_trips_clamp_the_gateways_own_time_at_zero():
    # two stages side by side: their round trips sum past the gateway's wall time
    r = Record("a", 0, 0, 30_000, "OK", 1, gateway_us=20_000, stage_rpc_us=36_000,
               in_replica_us=30_000, compute_us=10_000)  # fmt: skip
    assert split_us(r)["gateway"] == 0
    assert split_us(r)["client"] == 10_000


def test_breakdown_judges_each_query_against_its_own_pipelines_target():
    qos = {"fast": 10.0, "slow": 100.0}
    records = [
        # 50 ms is over fast's 10 ms target but under slow's 100 ms
        record("fast", compute=2_000),
        record("fast", compute=2_000, waiting=48_000),
        record("slow", compute=50_000),
        record("slow", compute=50_000),
        record("slow", hops=150_000, compute=50_000),
        record("slow", compute=500_000, status="UNAVAILABLE"),  # failed: not split
    ]
    out = breakdown(records, qos)
    assert out["over_qos"] == 2
    assert out["min_pipeline_count"] == 2
    # the two over their target: fast's waited 48 ms, slow's spent 150 ms on hops
    assert out["tail.waiting_ms"] == pytest.approx(24.0)
    assert out["tail.hops_ms"] == pytest.approx(75.0)
    assert out["tail.compute_ms"] == pytest.approx(26.0)
    # the rest: one fast query of 2 ms, two slow ones of 50 ms
    assert out["typical.compute_ms"] == pytest.approx(34.0)
    assert out["typical.hops_ms"] == 0


def test_breakdown_of_a_trial_with_nothing_over_target_has_no_tail():
    out = breakdown([record("a", compute=1_000)], {"a": 10.0, "b": 10.0})
    assert out["over_qos"] == 0
    assert out["min_pipeline_count"] == 0  # b got no query: its p99 rests on nothing
    assert all(out[f"tail.{p}_ms"] is None for p in PARTS)
    assert out["typical.compute_ms"] == pytest.approx(1.0)


def staged(pipeline: str, latency_ms: float, *parts: tuple[int | str, ...],
           status: str = "OK") -> Record:  # fmt: skip
    """A query of `latency_ms` whose stages ran as (stage, batch, waiting_us, compute_us[,
    gpu_us]); a stage given without gpu_us did not measure it (0)."""
    full = tuple((*p, 0) if len(p) == 4 else p for p in parts)
    return Record(pipeline, 0, 0, int(latency_ms * 1000), status, 1, stages=full)


def test_by_stage_says_per_stage_how_large_the_batches_were_and_where_the_tail_waited():
    qos = {"p": 50.0, "q": 10.0}
    records = [
        staged("p", 20, ("a", 8, 1_000, 3_000), ("b", 4, 2_000, 1_000)),
        staged("p", 30, ("a", 4, 3_000, 3_000), ("b", 2, 4_000, 1_000)),
        # over p's target: it waited at b, in a batch of one
        staged("p", 80, ("a", 6, 2_000, 3_000), ("b", 1, 60_000, 1_000)),
        staged("p", 90, ("a", 6, 2_000, 3_000), ("b", 1, 70_000, 1_000), status="UNAVAILABLE"),
        staged("q", 5, ("x", 1, 0, 4_000)),
        staged("other", 5, ("y", 1, 0, 4_000)),  # not in the mix: not counted
    ]
    out = by_stage(records, qos)
    assert set(out) == {"p/a", "p/b", "q/x"}
    assert out["p/a"]["queries"] == 3 and out["p/a"]["batch"] == pytest.approx(6.0)
    assert out["p/b"]["batch"] == pytest.approx(7 / 3, abs=1e-3)
    assert out["p/b"]["waiting_ms"] == pytest.approx(22.0)
    assert out["p/a"]["compute_ms"] == pytest.approx(3.0)
    # the one query over target
    assert out["p/b"]["tail.queries"] == 1 and out["p/b"]["tail.batch"] == 1
    assert out["p/b"]["tail.waiting_ms"] == pytest.approx(60.0)
    assert "tail.batch" not in out["q/x"]  # nothing of q was over its target


def test_by_stage_gives_the_gpus_part_over_the_queries_whose_stage_measured_it():
    qos = {"p": 50.0}
    records = [
        staged("p", 20, ("a", 1, 0, 3_000, 1_000)),
        staged("p", 20, ("a", 1, 0, 3_000, 2_000)),
        staged("p", 20, ("a", 1, 0, 3_000, 0)),  # not measured: not in the mean
        staged("p", 20, ("b", 1, 0, 3_000)),  # a stage that never measured it
    ]
    out = by_stage(records, qos)
    assert out["p/a"]["gpu_ms"] == pytest.approx(1.5) and out["p/a"]["compute_ms"] == 3.0
    assert "gpu_ms" not in out["p/b"]
