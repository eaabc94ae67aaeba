"""Schedules, traces, mixes, inputs, the peak search and the result writer: no network."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import InvalidArgument, NotFound
from common.results import render_markdown, write_result
from loadgen import traces
from loadgen.experiments.search import (
    CLIENT,
    GREEN_GROUP_PERCENT,
    SearchConfig,
    Trial,
    find_peak,
    integrate_steps,
    meets_qos,
    plan_gpus,
    plan_sm_percent,
)
from loadgen.inputs import make_input, make_inputs, parse_mix
from protos import plan_pb2, tensor_pb2


def test_poisson_gaps_have_mean_one_over_rate_and_unit_cv():
    rng = np.random.default_rng(1)
    arrivals = traces.poisson(50.0, 400.0, rng)
    gaps = np.diff(arrivals)
    assert abs(len(arrivals) - 20_000) < 4 * np.sqrt(20_000)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    # Exponential gaps: standard deviation equals the mean (evenly spaced ones would give 0).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert np.all(gaps >= 0) and arrivals[-1] < 400.0


@pytest.mark.parametrize(
    "trace",
    [
        traces.constant(7.5, 40.0),
        traces.step([2.0, 20.0, 5.0], 10.0),
        traces.diurnal(3.0, 30.0, 60.0),
    ],
    ids=["constant", "step", "diurnal"],
)
def test_uniform_schedule_integrates_to_the_trace(trace):
    arrivals = traces.schedule(trace, np.random.default_rng(0), traces.Arrivals.UNIFORM)
    assert len(arrivals) == round(trace.integral())
    assert all(0 <= t < trace.duration_s for t in arrivals)
    assert arrivals == sorted(arrivals)


def test_poisson_schedule_count_matches_integral():
    trace = traces.diurnal(5.0, 50.0, 200.0)
    expected = trace.integral()
    counts = [
        len(traces.schedule(trace, np.random.default_rng(s), traces.Arrivals.POISSON))
        for s in range(5)
    ]
    assert abs(np.mean(counts) - expected) < 3 * np.sqrt(expected / 5)


def test_step_trace_puts_each_rate_in_its_step():
    trace = traces.step([2.0, 20.0, 5.0], 10.0)
    arrivals = np.array(traces.schedule(trace, np.random.default_rng(0), traces.Arrivals.UNIFORM))
    per_step = [int(((arrivals >= i * 10) & (arrivals < (i + 1) * 10)).sum()) for i in range(3)]
    assert per_step == [20, 200, 50]
    assert trace.rate_at(9.999) == 2.0 and trace.rate_at(10.0) == 20.0


def test_diurnal_spans_min_to_max_with_night_trough_and_afternoon_peak():
    trace = traces.diurnal(4.0, 40.0, 240.0)
    ts = np.linspace(0, 240, 2401)
    rates = np.array([trace.rate_at(t) for t in ts])
    assert rates.min() == pytest.approx(4.0, abs=0.2) and rates.max() == pytest.approx(
        40.0, abs=0.2
    )
    assert 0 < ts[rates.argmin()] < 240 * 8 / 24  # before 08:00
    assert 240 * 12 / 24 < ts[rates.argmax()] < 240 * 20 / 24  # afternoon
    assert 4.0 * 240 < trace.integral() < 40.0 * 240


def test_trace_file_roundtrip_and_bad_traces(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([[0, 1.0], [10, 3.0]]))
    trace = traces.load(path)
    assert trace.duration_s == 10 and trace.integral() == pytest.approx(20.0)
    with pytest.raises(InvalidArgument):
        traces.Trace(((0.0, 1.0), (5.0, 2.0), (4.0, 1.0)), 10.0)
    with pytest.raises(InvalidArgument):
        traces.constant(-1.0, 10.0)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidArgument):
        traces.load(tmp_path / "bad.json")


def test_mix_parsing_weights_and_errors():
    mix = parse_mix("vision:img-to-text=2, video-analytics=1,speech-to-text")
    assert mix.name == "vision"
    assert mix.fractions() == pytest.approx(
        {"img-to-text": 0.5, "video-analytics": 0.25, "speech-to-text": 0.25}
    )
    drawn = mix.draw(np.random.default_rng(0), 8000)
    assert drawn.count("img-to-text") / 8000 == pytest.approx(0.5, abs=0.03)
    assert parse_mix("a=1,b=3").name == "a+b"
    for bad in ("a=x", "a=0", "a=1,a=2", "=1", ""):
        with pytest.raises(InvalidArgument):
            parse_mix(bad)
    with pytest.raises(NotFound):
        mix.check_served(["img-to-text"])


@pytest.mark.parametrize(
    "dtype,kind",
    [
        (tensor_pb2.DTYPE_FLOAT16, "f"),
        (tensor_pb2.DTYPE_FLOAT32, "f"),
        (tensor_pb2.DTYPE_INT64, "i"),
        (tensor_pb2.DTYPE_UINT8, "u"),
        (tensor_pb2.DTYPE_BOOL, "b"),
    ],
)
def test_inputs_match_the_spec_and_are_seeded(dtype, kind):
    spec = tensor_pb2.TensorSpec(name="x", dtype=dtype, shape=[2, 3, 5])
    wire = make_input(spec, np.random.default_rng(3))
    from common.dtypes import array_from_wire

    array = array_from_wire(wire)
    assert array.shape == (2, 3, 5) and array.dtype.kind == kind
    assert make_inputs({"p": spec}, 9)["p"][0] == make_inputs({"p": spec}, 9)["p"][0]
    assert make_inputs({"p": spec}, 9)["p"][0].data != make_inputs({"p": spec}, 10)["p"][0].data
    with pytest.raises(InvalidArgument):
        make_input(tensor_pb2.TensorSpec(name="x", dtype=0, shape=[1]), np.random.default_rng(0))


def _threshold_trial(peak: float, seen: list[float], client_above: float | None = None):
    """The server holds up to `peak`; past `client_above` the load generator falls behind."""

    async def trial(rate: float) -> Trial:
        seen.append(rate)
        if client_above is not None and rate > client_above:
            return Trial(rate, False, bound=CLIENT)
        return Trial(rate, rate <= peak)

    return trial


@pytest.mark.parametrize("start", [1.0, 10.0, 100.0, 1000.0])
async def test_find_peak_lands_within_tolerance_below_the_true_peak(start):
    seen: list[float] = []
    cfg = SearchConfig(start_qps=start, min_qps=0.1, max_qps=1e5, rel_tol=0.05, max_trials=40)
    found = await find_peak(_threshold_trial(37.3, seen), cfg)
    assert 37.3 * 0.95 <= found.peak_qps <= 37.3
    assert not found.capped
    # the bracket holds the true peak and is as narrow as the tolerance
    assert found.first_miss_qps is not None
    assert found.peak_qps <= 37.3 < found.first_miss_qps <= found.peak_qps / 0.95
    assert len(found.trials) == len(seen) <= 20
    assert [t.rate_qps for t in found.trials] == seen


async def test_find_peak_edges():
    never = await find_peak(_threshold_trial(0.0, []), SearchConfig(10.0, 1.0, 100.0))
    assert never.peak_qps == 0.0 and not never.capped
    always = await find_peak(_threshold_trial(1e9, []), SearchConfig(10.0, 1.0, 100.0))
    assert always.peak_qps == 100.0 and always.capped and always.first_miss_qps is None
    seen: list[float] = []
    budget = await find_peak(_threshold_trial(37.3, seen), SearchConfig(1.0, 0.1, 1e5, 0.01, 5))
    assert len(seen) == 5 and budget.peak_qps <= 37.3
    # out of budget before any miss: no upper bound, and the result says so
    assert budget.first_miss_qps is None and budget.capped
    seen = []
    short = await find_peak(_threshold_trial(37.3, seen), SearchConfig(10.0, 0.1, 1e5, 0.01, 4))
    # out of budget while bisecting: the bracket says how wide the answer still is
    assert seen == [10.0, 20.0, 40.0, 30.0] and short.peak_qps == 30.0
    assert short.first_miss_qps == 40.0
    with pytest.raises(InvalidArgument):
        SearchConfig(start_qps=0.0)


async def test_a_miss_the_client_caused_ends_the_search_at_a_lower_bound():
    # the server would hold 37.3 qps; past 25 qps the load generator falls behind first
    seen: list[float] = []
    trial = _threshold_trial(37.3, seen, client_above=25.0)
    found = await find_peak(trial, SearchConfig(10.0, 0.1, 1e5, 0.05, 40))
    # no bisecting towards the client's own limit: the peak is a lower bound, and says so
    assert seen == [10.0, 20.0, 40.0] and found.peak_qps == 20.0
    assert found.client_bound and found.capped
    # the client's miss is no bracket on the server's peak
    assert found.first_miss_qps is None
    plain = await find_peak(_threshold_trial(37.3, []), SearchConfig(10.0, 0.1, 1e5, 0.05, 40))
    assert not plain.client_bound


async def test_a_client_bound_miss_before_any_rate_met_halves_like_a_miss():
    seen: list[float] = []
    trial = _threshold_trial(12.0, seen, client_above=30.0)
    found = await find_peak(trial, SearchConfig(80.0, 0.1, 1e5, 0.05, 40))
    # 80 and 40: the client's; 20: the server's miss; 10 met; then the bracket [10, 20)
    assert seen[:4] == [80.0, 40.0, 20.0, 10.0]
    assert 10.0 <= found.peak_qps <= 12.0 and not found.client_bound
    assert found.first_miss_qps is not None and found.first_miss_qps <= 20.0


def _stats(count, errors, p99):
    return {"count": count, "errors": errors, "p99_ms": p99}


def test_meets_qos():
    qos = {"a": 50.0, "b": 100.0}
    ok = {"all": _stats(200, 0, 80.0), "a": _stats(100, 0, 40.0), "b": _stats(100, 0, 80.0)}
    assert meets_qos(ok, qos)
    assert not meets_qos({**ok, "a": _stats(100, 0, 60.0)}, qos)
    assert not meets_qos({**ok, "b": _stats(100, 5, 80.0)}, qos, max_error_frac=0.01)
    assert meets_qos({**ok, "b": _stats(100, 5, 80.0)}, qos, max_error_frac=0.1)
    assert not meets_qos({**ok, "a": _stats(100, 0, None)}, qos)
    assert not meets_qos({"all": _stats(0, 0, None)}, qos)
    # A pipeline with no requests in the trial gives no evidence against it.
    assert meets_qos({**ok, "b": _stats(0, 0, None)}, qos)


def test_sm_accounting():
    plan = plan_pb2.Plan(
        stages=[
            plan_pb2.StagePlan(
                pipeline="a",
                replicas=[
                    plan_pb2.ReplicaPlan(node="n", gpu=0, sm_percent=30),
                    plan_pb2.ReplicaPlan(node="n", gpu=1, sm_groups=[0, 1, 2]),
                ],
            ),
            plan_pb2.StagePlan(pipeline="b", replicas=[plan_pb2.ReplicaPlan(node="m", gpu=0)]),
        ]
    )
    assert plan_sm_percent(plan) == pytest.approx(30 + 3 * GREEN_GROUP_PERCENT + 100)
    assert plan_sm_percent(plan, ["a"]) == pytest.approx(30 + 3 * GREEN_GROUP_PERCENT)
    assert plan_gpus(plan) == 3
    assert integrate_steps([(0.0, 50.0), (2.0, 100.0)], 5.0) == pytest.approx(400.0)
    assert integrate_steps([(1.0, 50.0), (6.0, 100.0)], 5.0) == pytest.approx(250.0)
    assert integrate_steps([], 5.0) == 0.0


def test_write_result_json_and_markdown_twin(tmp_path):
    rows = [
        {"pipeline": "a", "transport": "ref", "p50_ms": 1.25, "p99_ms": 3.0, "extra": [1]},
        {"pipeline": "a", "transport": "wire", "p50_ms": 2.5, "p99_ms": None},
    ]
    plot = tmp_path / "x.png"
    plot.write_bytes(b"\x89PNG")
    json_path, md_path = write_result(
        "e2e", rows, {"a.wire_over_ref_p50": 2.0}, "host", tmp_path,
        ["pipeline", "transport", "p50_ms"], command="python -m loadgen.bench_e2e", plots=[plot],
    )  # fmt: skip
    doc = json.loads(json_path.read_text())
    assert list(doc)[:8] == [
        "name",
        "command",
        "device",
        "backend",
        "date",
        "git",
        "rows",
        "summary",
    ]
    assert doc["name"] == "e2e" and doc["backend"] == "host" and doc["device"]
    assert doc["rows"] == rows and doc["summary"] == {"a.wire_over_ref_p50": 2.0}
    md = md_path.read_text()
    assert "| pipeline | transport | p50_ms |" in md and "| a | wire | 2.5 |" in md
    assert "| a.wire_over_ref_p50 | 2 |" in md and "![x](x.png)" in md
    assert "p99_ms" not in md.split("## Rows")[1]
    # Without chosen columns every scalar field appears, lists and dicts left to the JSON.
    auto = render_markdown(doc, None, [], tmp_path)
    assert "| pipeline | transport | p50_ms | p99_ms |" in auto


def test_results_name_the_commit_given_where_the_checkout_lags(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMELOT_GIT_REV", "abc1234")
    json_path, _ = write_result("x", [], {}, "host", tmp_path, [], command="python -m x")
    assert json.loads(json_path.read_text())["git"] == "abc1234"
    monkeypatch.delenv("CAMELOT_GIT_REV")
    json_path, _ = write_result("x", [], {}, "host", tmp_path, [], command="python -m x")
    assert json.loads(json_path.read_text())["git"] not in ("", "abc1234")
