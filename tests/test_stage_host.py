"""The host's part of a stage batch in the predictor (`stage_host_ms`), and its fit (CPU).

On the H100 the mesh's stages took 0.25-2.5 ms (median 0.97) longer a batch of one than their
profiles (the GPU time of `infer` alone), and max-load's partitioned plan was priced at about
2071 qps where it held 900 (docs/results/stage-host-fit-h100-1731d70.md)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from common.errors import InvalidArgument
from scheduler.perfmodel.predictor import predict
from scheduler.perfmodel.profilestore import load
from scheduler.policy import PipelineInfo, StageInfo
from scheduler.search.policies import get_policy
from scheduler.service.settings import SchedulerSettings, parse
from scheduler.service.windows import Windows
from scheduler.service.world import World
from scheduler.tools import stage_host_fit
from tests.test_maxload_dominates import REFERENCE, _world, peak

PROFILES = load()
H100 = "scheduler/perfmodel/profiles_data/h100.json"
KEY = "text-to-img/generate"


def test_a_profile_adds_the_host_part_to_every_latency_scalar_and_vectorised() -> None:
    p = PROFILES[KEY]
    q = p.with_host_ms(0.5)
    for share, batch in ((5.0, 1.0), (12.0, 3.5), (100.0, 16.0)):
        assert q.latency(share, batch) == pytest.approx(p.latency(share, batch) + 0.5)
    shares, batches = np.asarray([5.0, 12.0, 100.0]), np.asarray([1.0, 3.5, 16.0])
    assert q.latency_many(shares, batches) == pytest.approx(p.latency_many(shares, batches) + 0.5)
    assert q.throughput(12.0, 4) < p.throughput(12.0, 4)
    assert p.with_host_ms(0.0) is p and q.with_bias(2.0).host_ms == 0.5
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument):
            p.with_host_ms(bad)
    assert "host_ms" not in json.dumps(q.to_json())  # the node's figure, not the profile's


def test_max_load_still_partitions_with_the_host_part_priced_and_prices_it_lower() -> None:
    """Without the term in the search's own tables (frontiers, vectorised) every partitioned
    plan it found failed the scalar check, and max-load fell back to even's plan."""
    mix = {p: 1.0 for p in REFERENCE}
    priced = {"gateway_cpu_ms": "3.0", "gateway_workers": "8"}
    peaks = {}
    for host_ms in (0.0, 0.97):
        w = _world("h100", REFERENCE, 1, "even", **priced)
        w = replace(w, profiles={k: p.with_host_ms(host_ms) for k, p in w.profiles.items()})
        spec = get_policy("max-load").plan(w)
        assert "the partitioned plan" in spec.reason.split("(")[0], spec.reason
        even = get_policy("even").plan(w)
        peaks[host_ms] = (peak(w, spec, mix), peak(w, even, mix))
        assert peaks[host_ms][0] >= peaks[host_ms][1] > 0
        assert predict(w, spec, {p: peaks[host_ms][0] * 0.9 for p in REFERENCE}).feasible
    assert peaks[0.97][0] < 0.8 * peaks[0.0][0] and peaks[0.97][1] < peaks[0.0][1]


def test_the_scheduler_plans_with_its_stage_host_ms() -> None:
    pipe = PipelineInfo("text-to-img", (StageInfo("generate"),), qos_p99_ms=55.0)
    profiles = {KEY: PROFILES[KEY]}
    for setting, want in ((0.0, 0.0), (0.8, 0.8)):
        s = SchedulerSettings(stage_host_ms=setting)
        w = World(s, [pipe], profiles, Windows(bucket_s=0.25, horizon_s=120.0))
        assert w.profiles_now()[KEY].host_ms == want
    assert parse(["--stage-host-ms", "0.5"], {}).stage_host_ms == 0.5
    assert parse([], {"CAMELOT_STAGE_HOST_MS": "0.7"}).stage_host_ms == 0.7
    with pytest.raises(SystemExit):
        parse(["--stage-host-ms", "-1"], {})


def _result(delta_ms: float, priced: dict[str, float] | None = None) -> dict:
    """A peak-load result whose every stage took `delta_ms` more than its profile (`priced`: the
    host part each stage's plan was priced with, as plans keep it since 3f4ef59)."""
    stages = ("generate", "upscale")
    plan = {"mix": "m", "epoch": 2, "stages": [
        {"stage": f"text-to-img/{s}", "sm_percent": [10.0], "max_batch": [16],
         "time_sliced": [False]} for s in stages]}  # fmt: skip
    for st in plan["stages"] if priced is not None else ():
        st["host_ms"] = priced[st["stage"]]
    rows = []
    for rate, batch in ((100.0, 1.0), (400.0, 2.0)):
        st = {}
        for s in stages:
            want = load(H100)[f"text-to-img/{s}"].latency(10.0, batch) + delta_ms
            st[f"text-to-img/{s}"] = {"queries": 500, "batch": batch, "compute_ms": want,
                                      "gpu_ms": want - delta_ms}  # fmt: skip
        rows.append({"mix": "m", "policy": "max-load", "rate_qps": rate, "plan_epoch": 2,
                     "stages": st})  # fmt: skip
    # plain time-shares whole GPUs: never a point
    rows.append({**rows[0], "policy": "plain"})
    return {"device": "NVIDIA H100 80GB HBM3", "plans": [plan], "rows": rows}


def test_the_fit_is_the_median_difference_and_is_scored_on_the_rows_held_out(tmp_path, capsys):
    src = tmp_path / "peak.json"
    src.write_text(json.dumps(_result(0.9)))
    out = tmp_path / "fit"
    argv = [str(src), "--profiles", H100,
            "--fit-max-qps", "150", "--out", str(out)]  # fmt: skip
    assert stage_host_fit.main(argv) == 0
    doc = json.loads((tmp_path / "fit.json").read_text())
    s = doc["summary"]
    assert s["stage_host_ms"] == pytest.approx(0.9) and s["fit_points"] == 2
    assert s["held_out_points"] == 2 and s["held_out_mape_with_host"] == pytest.approx(
        0.0, abs=1e-9
    )
    assert s["held_out_mape_profile"] > 0.1
    # the stages timed their own GPU work: the host's part measured, the GPU's as profiled
    assert s["measured_host_ms"] == pytest.approx(0.9)
    assert s["gpu_over_profile"] == pytest.approx(1.0)
    assert "| max-load | 400 | text-to-img/generate |" in (tmp_path / "fit.md").read_text()
    # no row to fit on is a clear error, not a figure
    assert stage_host_fit.main([*argv[:3], "--fit-max-qps", "50"]) == 2
    assert "no row at or below 50 qps" in capsys.readouterr().err


def test_the_fit_scores_the_host_parts_the_plans_were_priced_with(tmp_path):
    src, out = tmp_path / "peak.json", tmp_path / "fit"
    argv = [str(src), "--profiles", H100, "--out", str(out)]
    # generate priced right (0.9), upscale with none: half the held-out rows are off by 0.9 ms
    src.write_text(json.dumps(_result(0.9, {"text-to-img/generate": 0.9,
                                            "text-to-img/upscale": 0.0})))  # fmt: skip
    assert stage_host_fit.main(argv) == 0
    s = json.loads((tmp_path / "fit.json").read_text())["summary"]
    assert 0 < s["held_out_mape_as_priced"] < s["held_out_mape_profile"]
    src.write_text(json.dumps(_result(0.9, {"text-to-img/generate": 0.9,
                                            "text-to-img/upscale": 0.9})))  # fmt: skip
    assert stage_host_fit.main(argv) == 0
    s = json.loads((tmp_path / "fit.json").read_text())["summary"]
    assert s["held_out_mape_as_priced"] == pytest.approx(0.0, abs=1e-9)
    # the lowest rate's rows unless told (a search that starts above 150 qps still fits)
    assert stage_host_fit.main([str(src), "--profiles", H100, "--out", str(tmp_path / "low")]) == 0
    low = json.loads((tmp_path / "low.json").read_text())["summary"]
    assert low["fit_points"] == 2 and low["stage_host_ms"] == pytest.approx(0.9)
    # the committed set for the result's device unless told: the same figures as H100's
    assert stage_host_fit.main([str(src), "--out", str(tmp_path / "auto")]) == 0
    auto = json.loads((tmp_path / "auto.json").read_text())["summary"]
    assert auto == s
    # plans from before they kept it: no such figure
    src.write_text(json.dumps(_result(0.9)))
    assert stage_host_fit.main(argv) == 0
    assert (
        "held_out_mape_as_priced" not in json.loads((tmp_path / "fit.json").read_text())["summary"]
    )


def test_the_predicted_peaks_tool_compares_max_load_with_every_baseline(monkeypatch, tmp_path):
    from scheduler.tools import maxload_peaks

    monkeypatch.setattr(maxload_peaks, "MIXES", {"ref4": maxload_peaks.MIXES["ref4"]})
    monkeypatch.setattr(maxload_peaks, "HOST_MS", (0.97,))
    assert maxload_peaks.main(["--out", str(tmp_path / "peaks")]) == 0
    doc = json.loads((tmp_path / "peaks.json").read_text())
    one = next(r for r in doc["rows"] if r["gpus"] == 1)
    assert 0 < one["min_resource_sm_percent_at_low_load"] < 100
    assert one["predicted_low_load_saving"] == pytest.approx(
        1 - one["min_resource_sm_percent_at_low_load"] / 100, abs=1e-3
    )
    skip = ("max_load_qps", "best_baseline_qps")
    baselines = [k for k in one if k.endswith("_qps") and k not in skip]
    assert len(baselines) == 4 and one["best_baseline_qps"] == max(one[k] for k in baselines)
    assert one["max_load_qps"] >= one["best_baseline_qps"] > 0
    ratio = doc["summary"]["ref4.1gpu.host_0.97.predicted_over_best_baseline"]
    assert ratio == pytest.approx(one["max_load_qps"] / one["best_baseline_qps"], rel=1e-2)
