"""The pipeline-level fit: plans rebuilt from a result's recorded mix, predicted per trial."""

from __future__ import annotations

import json
import statistics

import pytest

from common.errors import InvalidArgument
from contract import pipeline_config
from loadgen import pipeline_fit
from scheduler.perfmodel.predictor import predict
from scheduler.perfmodel.profilestore import load_default
from scheduler.policy import NodeInfo, PolicyInput
from scheduler.search.policies import get_policy
from scheduler.service.pipelines import from_config

PROFILES = load_default()
MIX = "pair:video-analytics=3,text-to-img=1"


def doc(rows: list[dict]) -> dict:
    return {"git": "abc", "device": "test", "rows": rows,
            "settings": {"pair": {"mix": [MIX]}}}  # fmt: skip


def row(policy: str, rate: float, va: float, t2i: float) -> dict:
    return {"mix": "pair", "policy": policy, "rate_qps": rate,
            "video-analytics.p99_ms": va, "text-to-img.p99_ms": t2i}  # fmt: skip


def test_each_trial_is_predicted_on_the_plan_the_policy_makes_from_the_world():
    rows = pipeline_fit.fit_rows(
        doc([row("even", 40.0, 50.0, 30.0), row("feedback", 40.0, 90.0, 90.0)]), PROFILES
    )
    # feedback plans from measurements a result does not hold: left out
    assert {r["policy"] for r in rows} == {"even"} and len(rows) == 2
    pipes = tuple(
        from_config(pipeline_config.load_pipeline(p, "full"))
        for p in ("video-analytics", "text-to-img")
    )
    node = NodeInfo("node-0", (pipeline_fit.H100,))
    world = PolicyInput(pipes, (node,), {}, profiles=PROFILES)
    plan = get_policy("even").plan(world)
    # the rate splits by the mix's weights: 30 qps of video-analytics, 10 of text-to-img
    want = predict(world, plan, {"video-analytics": 30.0, "text-to-img": 10.0})
    by = {r["pipeline"]: r for r in rows}
    for p, measured in (("video-analytics", 50.0), ("text-to-img", 30.0)):
        assert by[p]["predicted_p99_ms"] == pytest.approx(want.pipelines[p].p99_ms)
        assert by[p]["measured_over_predicted"] == pytest.approx(
            measured / want.pipelines[p].p99_ms
        )
    summary = pipeline_fit.summarise(rows)
    assert summary["even.measured_over_predicted_median"] == pytest.approx(
        statistics.median(r["measured_over_predicted"] for r in rows)
    )


def test_a_result_without_such_trials_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc([row("feedback", 10.0, 1.0, 1.0)])))
    with pytest.raises(InvalidArgument):
        pipeline_fit.main([str(path), "--out", str(tmp_path)])


def test_the_gateways_tail_is_fitted_on_one_mix_and_priced_in_every_trial():
    from scheduler.perfmodel.predictor import HopCosts

    rates = (20.0, 60.0, 100.0)
    plain = pipeline_fit.fit_rows(doc([row("even", r, 1.0, 1.0) for r in rates]), PROFILES)
    unit = HopCosts(gateway_cpu_ms=7.0, gateway_tail=1.0)
    # a mesh whose gateway costs 2.5 times its mean stretch at the p99
    measured = []
    for r in rates:
        got = {x["pipeline"]: x["predicted_p99_ms"] for x in plain if x["rate_qps"] == r}
        extra = 2.5 * float(unit.gateway_ms(r))
        measured.append(row("even", r, got["video-analytics"] + extra, got["text-to-img"] + extra))
    trials = doc(measured)
    before = pipeline_fit.fit_rows(trials, PROFILES)
    tail = pipeline_fit.fit_gateway_tail(before, "pair", 7.0, 1)
    assert tail == pytest.approx(2.5)
    priced = pipeline_fit.fit_rows(
        trials, PROFILES, host={"gateway_cpu_ms": "7.0", "gateway_tail": repr(tail)}
    )
    assert all(r["measured_over_predicted"] == pytest.approx(1.0) for r in priced)
    # at 150 qps one gateway at 7 ms a query is past capacity: no latency, flagged
    (over, _) = pipeline_fit.fit_rows(
        doc([row("even", 150.0, 1.0, 1.0)]), PROFILES, host={"gateway_cpu_ms": "7.0"}
    )
    assert over["beyond_capacity"] and over["predicted_p99_ms"] is None
