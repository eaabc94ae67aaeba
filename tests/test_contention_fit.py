"""The contention calibration: the pressure scale round-trips through profiles and the fit
recovers the scale that produced a set of slowdowns."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from common.errors import InvalidArgument
from loadgen import contention_fit
from loadgen.colocations import COLOCATIONS, TRAINING
from loadgen.predictor_score import predict, rescore, rows_for
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import MEASURED_PROFILES, load


def test_pressure_scale_round_trips_and_scales_what_a_stage_exerts():
    p = load(MEASURED_PROFILES)["text-to-img/generate"]
    q = replace(p, pressure_scale=2.5)
    assert q.exerted_pressure == pytest.approx(2.5 * p.pressure)
    back = StageProfile.from_json(q.key, q.to_json())
    assert back.pressure_scale == 2.5 and back.pressure == p.pressure
    bad = {**q.to_json(), "pressure_scale": 0}
    from scheduler.perfmodel.profilestore import parse_document

    with pytest.raises(InvalidArgument):
        parse_document({"format": "camelot-profiles/1", "profiles": {q.key: bad}})


def test_a_larger_scale_predicts_more_slowdown():
    profiles = contention_fit.scaled(load(MEASURED_PROFILES), 1.0)
    c = TRAINING[0]
    low = [p.factor for p in predict(c, profiles)]
    high = [p.factor for p in predict(c, contention_fit.scaled(profiles, 4.0))]
    assert all(h > lo for h, lo in zip(high, low, strict=True))


def test_fit_recovers_the_scale_behind_the_slowdowns(tmp_path):
    profiles = contention_fit.scaled(load(MEASURED_PROFILES), 1.0)
    truth = contention_fit.scaled(profiles, 3.0)
    rows = []
    for c in TRAINING:
        for m, p in zip(c.members, predict(c, truth), strict=True):
            rows.append({"colocation": c.name, "stage": m.key, "share_pct": m.share,
                         "batch": m.batch, "slowdown_measured": p.factor})  # fmt: skip
    cases = contention_fit.colocations_of(rows)
    scale, before, after, errors = contention_fit.fit(cases, profiles)
    assert len(errors) == len(contention_fit.GRID) and min(errors) == after
    assert scale == pytest.approx(3.0, rel=0.03)
    assert after < 0.005 < before
    # written into a profiles document, the predictor then uses it
    path = tmp_path / "p.json"
    path.write_text(MEASURED_PROFILES.read_text())
    contention_fit.write_scale(path, scale, "test")
    assert all(p.pressure_scale == pytest.approx(scale, abs=1e-4) for p in load(path).values())
    assert json.loads(path.read_text())["contention_note"] == "test"


def test_bad_training_rows_are_refused():
    with pytest.raises(InvalidArgument):
        contention_fit.colocations_of([])
    with pytest.raises(InvalidArgument):
        contention_fit.colocations_of(
            [
                {
                    "colocation": "x",
                    "stage": "a/b",
                    "share_pct": 50,
                    "batch": 8,
                    "slowdown_measured": float("nan"),
                }
            ]  # fmt: skip
        )


def test_rescore_keeps_the_measurements_and_predicts_again():
    profiles = contention_fit.scaled(load(MEASURED_PROFILES), 1.0)
    c = COLOCATIONS[0]
    preds = predict(c, profiles)
    together = [(p.latency_ms * 1.2, 1000.0, 5) for p in preds]
    rows = rows_for(c, preds, together, [p.solo_ms * 1.1 for p in preds])
    same = rescore(rows, profiles)
    for old, new in zip(rows, same, strict=True):
        assert new["predicted_ms"] == old["predicted_ms"]
        assert new["abs_pct_error"] == pytest.approx(old["abs_pct_error"], abs=0.01)
    again = rescore(rows, contention_fit.scaled(profiles, 4.0))
    for old, new in zip(rows, again, strict=True):
        assert new["measured_ms"] == old["measured_ms"]
        assert new["solo_measured_ms"] == old["solo_measured_ms"]
        assert new["predicted_ms"] > old["predicted_ms"]
