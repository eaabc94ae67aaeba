"""Measured H100 profiles: their merge, the default set, noisy (non-monotone) tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import InvalidArgument
from scheduler.perfmodel import profilestore as P
from scheduler.perfmodel.profiles import StageProfile
from scheduler.tools import profile_merge

SYN = json.loads(P.SYNTHETIC_PROFILES.read_text())


def noisy(**kw: object) -> StageProfile:
    # launch-bound noise: slower at more SMs and at smaller batches in places
    table = ((10.0, 9.0, 12.0), (6.0, 11.0, 7.0), (8.0, 5.0, 9.0))
    args = dict(
        pipeline="p", stage="s", shares=(10.0, 50.0, 100.0), batches=(1, 4, 8), latency_ms=table,
        weights_bytes=0, activation_bytes_per_item=0, pressure_levels=(0.0,), slowdown=(1.0,),
        pressure=0.0,
    )  # fmt: skip
    args.update(kw)
    return StageProfile(**args)  # type: ignore[arg-type]


def test_non_monotone_measurements_interpolate_monotone() -> None:
    p = noisy()
    shares = np.linspace(5, 100, 60)
    batches = np.linspace(1, 12, 45)
    grid = np.array([[p.latency(float(s), float(b)) for b in batches] for s in shares])
    assert np.all(np.diff(grid, axis=0) <= 1e-9)  # more SMs never slower
    assert np.all(np.diff(grid, axis=1) >= -1e-9)  # more items never faster
    # never optimistic at a measured point, and the vectorised form agrees
    for i, s in enumerate(p.shares):
        for j, b in enumerate(p.batches):
            assert p.latency(s, b) >= p.latency_ms[i][j]
    s_arr = np.repeat(shares, len(batches))
    b_arr = np.tile(batches[batches <= 8], len(shares))[: len(s_arr)]
    s_arr = s_arr[: len(b_arr)]
    want = [p.latency(float(s), float(b)) for s, b in zip(s_arr, b_arr, strict=True)]
    assert np.allclose(p.latency_many(s_arr, b_arr), want)


def test_bundled_h100_set_is_measured_and_says_where_each_stage_came_from() -> None:
    doc = json.loads(P.MEASURED_PROFILES.read_text())
    assert doc["synthetic"] is False and doc["device"] == "NVIDIA H100 80GB HBM3"
    assert set(doc["profiles"]) == set(SYN["profiles"])
    got = P.load(P.MEASURED_PROFILES)
    for key, obj in doc["profiles"].items():
        assert got[key].synthetic == obj["synthetic"]
        # every stage of the bundled set was measured by the profiler (none filled in)
        assert not obj["synthetic"] and obj["source"].startswith("measured")
        assert "services.profiler" in obj["source"]


def test_default_set_is_measured_with_synthetic_fallback(tmp_path: Path) -> None:
    assert P.load_default() == P.load(P.MEASURED_PROFILES)
    doc = json.loads(P.MEASURED_PROFILES.read_text())
    doc["profiles"].pop("video-analytics/crop")
    part = tmp_path / "h100.json"
    part.write_text(json.dumps(doc))
    got = P.load_default(part)
    assert got["video-analytics/crop"].synthetic
    assert got["video-analytics/crop"].device == SYN["device"]
    assert not got["video-analytics/detect"].synthetic
    only_syn = P.load_default(tmp_path / "absent.json")
    assert all(p.synthetic for p in only_syn.values()) and set(only_syn) == set(got)
    with pytest.raises(InvalidArgument):
        P.load_default(tmp_path / "absent.json", tmp_path / "absent2.json")


LOG = """\
img-to-text/preprocess @ 10.0%: {1: 2.0, 4: 3.0}
img-to-text/preprocess @ 100.0%: {1: 1.0, 4: 1.5}
img-to-text/preprocess beside a 10% co-runner: 0.90x
img-to-text/preprocess beside a 25% co-runner: 1.20x
img-to-text/preprocess beside a 50% co-runner: 1.10x
img-to-text/decode @ 10.0%: {1: 100.0, 4: 120.0}
img-to-text/decode @ 20.0%: {1: 90.0}
something else entirely
"""


def measured_doc(device: str = "GPU X") -> dict[str, object]:
    prof = StageProfile.from_json("text-to-img/encode", SYN["profiles"]["text-to-img/encode"])
    obj = prof.to_json()
    obj["sensitivity"] = {"pressure": [0.0, 0.3, 0.7, 0.9], "slowdown": [1.0, 1.1, 1.2, 1.5]}
    doc = P.to_document([], device=device, date="2026-11-24", note="m")
    doc["profiles"] = {"text-to-img/encode": obj}
    return doc


def test_log_and_merge(tmp_path: Path) -> None:
    logged = profile_merge.parse_profiler_log(LOG)
    assert logged["img-to-text/preprocess"].latency_ms == {
        10.0: {1: 2.0, 4: 3.0},
        100.0: {1: 1.0, 4: 1.5},
    }
    assert logged["img-to-text/preprocess"].beside == {10.0: 0.9, 25.0: 1.2, 50.0: 1.1}
    doc = profile_merge.merge([measured_doc()], SYN, logged, note="how")
    assert doc["device"] == "GPU X" and doc["synthetic"] is False and doc["note"].startswith("how")
    profs = P.parse_document(doc)
    pre = doc["profiles"]["img-to-text/preprocess"]
    assert pre["latency_ms"] == {"10": {"1": 2.0, "4": 3.0}, "100": {"1": 1.0, "4": 1.5}}
    # co-runner levels from the measured stage, slowdowns made non-decreasing from 1
    assert pre["sensitivity"] == {
        "pressure": [0.0, 0.3, 0.7, 0.9],
        "slowdown": [1.0, 1.0, 1.2, 1.2],
    }
    assert pre["pressure"] == SYN["profiles"]["img-to-text/preprocess"]["pressure"]
    assert profs["img-to-text/preprocess"].synthetic
    dec = doc["profiles"]["img-to-text/decode"]  # the incomplete 20% row is dropped
    assert list(dec["latency_ms"]) == ["10"]
    assert dec["sensitivity"] == SYN["profiles"]["img-to-text/decode"]["sensitivity"]
    assert "sensitivity from the synthetic set" in dec["source"]
    assert not profs["text-to-img/encode"].synthetic
    assert profs["video-analytics/crop"].synthetic
    assert profs["video-analytics/crop"].device == SYN["device"]
    with pytest.raises(InvalidArgument):
        profile_merge.merge([measured_doc("GPU X"), measured_doc("GPU Y")], SYN)
    with pytest.raises(InvalidArgument):
        profile_merge.merge([], SYN)


def test_merge_command_writes_a_loadable_set(tmp_path: Path) -> None:
    m = tmp_path / "m.json"
    m.write_text(json.dumps(measured_doc()))
    log = tmp_path / "i.log"
    log.write_text(LOG)
    out = tmp_path / "out.json"
    profile_merge.main(["merge", str(m), "--log", str(log), "--out", str(out), "--note", "n"])
    got = P.load(out)
    assert set(got) == set(SYN["profiles"]) and not got["text-to-img/encode"].synthetic


def test_an_earlier_merged_set_given_again_keeps_its_measurements_and_yields_its_synthetic_stages():
    first = profile_merge.merge([measured_doc()], SYN, note="first")
    assert first["profiles"]["video-analytics/crop"]["synthetic"]
    crop = StageProfile.from_json("video-analytics/crop", SYN["profiles"]["video-analytics/crop"])
    later = P.to_document([], device="GPU X", date="2026-12-07", note="later")
    later["profiles"] = {"video-analytics/crop": crop.to_json()}
    for order in ([first, later], [later, first]):
        doc = profile_merge.merge(order, SYN, note="again")
        enc, cr = doc["profiles"]["text-to-img/encode"], doc["profiles"]["video-analytics/crop"]
        # the first set's measurement is kept with where it came from
        assert enc["synthetic"] is False and enc["source"] == "measured (m)"
        # the stage it had from the synthetic set is measured now, whichever document came first
        assert cr["synthetic"] is False and cr["source"] == "measured (later)"
        assert doc["profiles"]["video-analytics/detect"]["synthetic"] is True
        assert "video-analytics/crop" in doc["note"].split("Synthetic")[0]
        P.parse_document(doc)
