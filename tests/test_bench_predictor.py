"""The predictor-accuracy benchmark's CPU parts: co-location checks, overlap, error math, result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.errors import InvalidArgument, Unavailable
from common.results import write_result
from loadgen import bench_predictor
from loadgen.colocation_measure import MIN_SAMPLES, overlap, summarize
from loadgen.colocations import COLOCATIONS, Colocation, Member, check, parse_colocation
from loadgen.predictor_score import abs_pct_error, mape, predict, rows_for, summary_of
from scheduler.perfmodel.profilestore import MEASURED_PROFILES, SYNTHETIC_PROFILES, load

PROFILES = load(MEASURED_PROFILES)


def test_builtin_colocations_are_held_out_and_fit_one_gpu() -> None:
    assert len(COLOCATIONS) >= 10
    assert any(len(c.members) == 3 for c in COLOCATIONS)
    check(COLOCATIONS, PROFILES)
    check(COLOCATIONS, load(SYNTHETIC_PROFILES))


@pytest.mark.parametrize(
    "text",
    [
        "text-to-img/generate@30:8",  # one stage only
        "text-to-img/generate@30:8,text-to-img/upscale@30:8",  # same pipeline
        "text-to-img/generate@60:8,video-analytics/crop@50:8",  # over 100%
        "text-to-img/nope@30:8,video-analytics/crop@50:8",  # no profile
    ],
)
def test_bad_colocations_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        check([parse_colocation(text)], PROFILES)


def test_parse_colocation() -> None:
    c = parse_colocation("text-to-img/generate@30:8, video-analytics/crop@45.5:16")
    assert c.members == (
        Member("text-to-img", "generate", 30.0, 8),
        Member("video-analytics", "crop", 45.5, 16),
    )
    for bad in ("text-to-img/generate@x:8,a/b@1:1", "generate@30:8,a/b@1:1", "a/b/c@1:1,d/e@1:1"):
        with pytest.raises(InvalidArgument):
            parse_colocation(bad)


def test_prediction_is_profile_latency_times_the_contention_factor() -> None:
    triple = next(c for c in COLOCATIONS if len(c.members) == 3)
    preds = predict(triple, PROFILES)
    for m, p in zip(triple.members, preds, strict=True):
        assert p.solo_ms == pytest.approx(PROFILES[m.key].latency(m.share, m.batch))
        assert p.factor >= 1.0
        assert p.latency_ms == pytest.approx(p.solo_ms * p.factor)
    # a sensitive stage feels its co-runners' pressure, and less of it with fewer of them
    i = max(range(3), key=lambda k: preds[k].factor)
    assert preds[i].factor > 1.05
    others = [m for k, m in enumerate(triple.members) if k != i]
    pair = Colocation("pair", (triple.members[i], others[0]))
    assert predict(pair, PROFILES)[0].factor < preds[i].factor


def test_overlap_keeps_only_batches_while_every_member_ran() -> None:
    early = [(t, t + 0.1, 100.0) for t in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)]
    late = [(t, t + 0.2, 200.0) for t in (0.25, 0.45)]
    kept = overlap([early, late])
    assert kept[0] == [(0.3, 0.4, 100.0), (0.4, 0.5, 100.0), (0.5, 0.6, 100.0)]
    assert kept[1] == late[:1]  # its last batch ended after the other stopped
    with pytest.raises(Unavailable):
        overlap([early, []])


def test_summarize_and_error_math() -> None:
    kept = [(0.0, 0.01, 9.0), (0.01, 0.02, 10.0), (0.02, 0.04, 30.0)]
    ms, items_s = summarize(kept, batch=4)
    assert ms == 10.0 and items_s == pytest.approx(3 * 4 / 0.04)
    assert all(math.isnan(x) for x in summarize(kept[:2], batch=4))
    assert abs_pct_error(10.0, 12.0) == pytest.approx(20.0)
    assert abs_pct_error(10.0, 8.0) == pytest.approx(20.0)
    assert math.isnan(abs_pct_error(math.nan, 8.0))
    assert mape([10.0, math.nan, 30.0]) == 20.0
    assert math.isnan(mape([math.nan]))


def test_rows_and_result_document(tmp_path: Path) -> None:
    c = COLOCATIONS[0]
    preds = predict(c, PROFILES)
    # pretend the measurement came out 10% above the prediction, solo 5% below the profile
    together = [(p.latency_ms * 1.1, 1000.0 * m.batch / (p.latency_ms * 1.1), 50)
                for m, p in zip(c.members, preds, strict=True)]  # fmt: skip
    solo = [p.solo_ms * 0.95 for p in preds]
    rows = rows_for(c, preds, together, solo)
    assert [r["stage"] for r in rows] == [m.key for m in c.members]
    for r in rows:
        assert r["abs_pct_error"] == pytest.approx(100 * (1 - 1 / 1.1), rel=1e-3)
        assert r["measured_items_s"] < r["predicted_items_s"]
    summary = summary_of(rows, 1)
    assert summary["held_out_colocations"] == 1
    # the summary holds fractions (0.10 is 10%), the rows percent
    assert summary["latency_mape"] == pytest.approx(1 - 1 / 1.1, rel=1e-3)
    assert summary["throughput_mape"] == pytest.approx(0.10, rel=1e-3)
    assert summary["solo_profile_mape"] == pytest.approx(1 / 0.95 - 1, abs=1e-4)  # 4 digits
    json_path, md_path = write_result(
        "predictor",
        rows,
        summary,
        "cuda",
        tmp_path,
        bench_predictor.COLUMNS,
        command="x",
        device="d",
    )
    doc = json.loads(json_path.read_text())
    assert set(doc["summary"]) >= {"latency_mape", "throughput_mape", "held_out_colocations"}
    assert len(doc["rows"]) == len(c.members)
    assert "measured_ms" in md_path.read_text()


@pytest.mark.gpu
def test_one_colocation_on_the_gpu(tmp_path: Path) -> None:
    bench_predictor.main(
        [
            "--size", "tiny", "--window-s", "1", "--solo-repeats", "5", "--out", str(tmp_path),
            "--colocation", "text-to-img/generate@30:4,video-analytics/classify@50:4",
        ]
    )  # fmt: skip
    doc = json.loads((tmp_path / "predictor.json").read_text())
    assert doc["summary"]["held_out_colocations"] == 1
    for r in doc["rows"]:
        assert r["samples"] >= MIN_SAMPLES and r["measured_ms"] > 0 and r["solo_measured_ms"] > 0
