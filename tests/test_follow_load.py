"""follow-load (issue 17, item 4): the day made from the measured peak, the re-plans counted from
the plans a day ran under, the saving against the cheapest baseline meeting the QoS, and a short
run of the whole experiment on the host backend (a real mesh, the MPS/host mode only: green
contexts need CUDA). Asserts structure and what the loop recorded, never latency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from loadgen.experiments import __main__ as experiments
from loadgen.experiments import day as days
from loadgen.experiments import follow

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_day_climbs_from_the_trough_to_the_peak_and_back_in_distinct_steps():
    day = days.make_day(200.0, peak_frac=0.8, trough_frac=0.1, rungs=3, step_s=20.0)
    assert day.levels[0] == day.levels[-1] == pytest.approx(20.0)
    assert max(day.levels) == pytest.approx(160.0) == day.trace.peak_qps()
    assert len(day.levels) == 7 and day.load_changes == 6
    # every step is far past the loop's 25% band, up and down
    for a, b in zip(day.levels, day.levels[1:], strict=False):
        assert max(a, b) / min(a, b) == pytest.approx(2.0)
    assert day.trace.duration_s == 140.0
    assert day.trace.rate_at(65.0) == pytest.approx(160.0)
    for bad in (
        dict(peak_qps=0.0, peak_frac=0.8, trough_frac=0.1, rungs=3, step_s=1.0),
        dict(peak_qps=10.0, peak_frac=0.1, trough_frac=0.2, rungs=3, step_s=1.0),
        dict(peak_qps=10.0, peak_frac=0.8, trough_frac=0.1, rungs=0, step_s=1.0),
    ):
        with pytest.raises(InvalidArgument):
            days.make_day(**bad)


def plan(epoch: int, shares: list[list[float]], batches: list[list[int]] | None = None) -> dict:
    """A plan as `ShareSampler.plans` keeps it (search.plan_record)."""
    batches = batches or [[8] * len(s) for s in shares]
    return {
        "epoch": epoch,
        "stages": [
            {"stage": f"p/s{i}", "sm_percent": s, "max_batch": b, "time_sliced": [False] * len(s)}
            for i, (s, b) in enumerate(zip(shares, batches, strict=True))
        ],
    }


def test_a_replan_counts_only_where_replicas_changed():
    plans = [
        plan(3, [[10.0], [10.0]]),
        plan(4, [[10.0], [10.0]]),  # re-sized for a new load, same replicas
        plan(5, [[20.0], [10.0]]),  # a share
        plan(6, [[20.0, 20.0], [10.0]]),  # a replica
        plan(7, [[20.0, 20.0], [10.0]], [[8, 8], [16]]),  # a batch
    ]
    assert follow.replicas_changed(plans) == 3
    assert follow.replicas_changed(plans[:1]) == follow.replicas_changed([]) == 0


def test_the_saving_is_against_the_cheapest_baseline_that_met_the_qos():
    per = {
        "min-resource": {"sm_gpu_s": 30.0, "qos_met": True},
        "even": {"sm_gpu_s": 100.0, "qos_met": True},
        "feedback": {"sm_gpu_s": 50.0, "qos_met": True},
        "exclusive": {"sm_gpu_s": 20.0, "qos_met": False},  # cheaper, but missed
        "max-load": {"sm_gpu_s": 10.0, "qos_met": True},  # not a baseline
    }
    got = follow.saving(per, "min-resource", ["even", "exclusive", "feedback"])
    assert got == {"sm_share_time_saving": pytest.approx(0.4), "sm_share_time_baseline": "feedback"}
    none_met = {**per, "even": {"sm_gpu_s": 100.0, "qos_met": False}, "feedback": {"error": "x"}}
    assert follow.saving(none_met, "min-resource", ["even", "exclusive", "feedback"]) == {
        "sm_share_time_saving": None, "sm_share_time_baseline": None,
    }  # fmt: skip


def test_green_mode_is_refused_off_cuda_before_anything_starts():
    with pytest.raises(InvalidArgument, match="green contexts need the cuda backend"):
        follow.check_modes(["mps", "green"], "host")
    with pytest.raises(InvalidArgument, match="known: mps, green"):
        follow.check_modes(["mig"], "cuda")
    follow.check_modes(["mps", "green"], "cuda")


def test_the_loop_needs_longer_to_answer_a_step_under_mps_than_with_green_contexts():
    # two windows, the least re-plan interval and the apply (a new process under MPS)
    assert days.loop_reaction_s("mps", 5, 5) == pytest.approx(2 * 5 + 5 + days.APPLY_S["mps"])
    # green re-plans at most every 0.5 s and resizes in place
    assert days.loop_reaction_s("green", 5, 5) == pytest.approx(10 + 0.5 + days.APPLY_S["green"])
    # 0 is the scheduler's default: a 10 s window, 5 s between re-plans
    assert days.loop_reaction_s("mps") == pytest.approx(25 + days.APPLY_S["mps"])
    with pytest.raises(InvalidArgument, match="unknown sharing mode 'mig'"):
        days.loop_reaction_s("mig")


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_short_day_on_the_host_writes_the_result_and_records_the_replans(tmp_path):
    # the peak given (30 qps: a search's verdict would hang on this machine's latency), the day
    # 3 -> 24 qps and back: far over the load min-resource is first planned for, so the loop
    # re-plans for the rise (a new epoch, re-sized or with other replicas) whatever the latency
    # on this machine is
    argv = ["follow-load", "--backend", "host", "--size", "tiny", "--modes", "mps",
            "--mix", "speech-to-text", "--peak-policy", "even", "--peak-qps", "30",
            "--policies", "min-resource", "--baselines", "even,exclusive:sharing=bogus",
            "--rungs", "2", "--step-s", "2", "--window-s", "0.5", "--trial-s", "2",
            "--warmup-s", "0.5", "--gap-s", "0.2", "--prime-s", "1", "--sample-s", "0.2",
            "--loop-window-s", "2", "--min-replan-interval-s", "1", "--deadline-s", "20",
            "--out-dir", str(tmp_path)]  # fmt: skip
    args = experiments.build_parser().parse_args(argv)
    json_path, md_path = await experiments.run(args, argv)
    doc = json.loads(json_path.read_text())
    assert doc["name"] == "follow-load" and doc["backend"] == "host"
    assert doc["command"].startswith("python -m loadgen.experiments follow-load --backend host")
    s = doc["summary"]
    for key in ("replans", "windows_within_qos_frac", "failed", "sm_share_time_saving",
                "load_changes", "peak_qps", "plan_changes", "qos_met"):  # fmt: skip
        assert "mps" in s[key], key
    assert s["load_changes"]["mps"] == 4  # two rungs up, two down
    assert s["peak_qps"]["mps"] == 30.0
    # 2 s levels are shorter than the loop's 2 x 2 + 1 + 3.4 s: the result says so
    assert s["short_steps"]["mps"] is True
    assert doc["per_mode"]["mps"]["loop_reaction_s"] == pytest.approx(8.4)
    day = s["replans"]["mps"]
    bad = "exclusive:sharing=bogus"
    assert set(day) == {"even", bad, "min-resource"}
    # a baseline whose policy refuses its options loses its own day only
    assert day[bad] is None and "sharing must be one of" in s["errors"]["mps"][bad]
    assert isinstance(day["min-resource"], int) and day["even"] == 0
    # the loop re-planned min-resource during the day, and the result kept each plan
    assert s["plan_changes"]["mps"]["min-resource"] >= 1
    (plans,) = [d["plans"] for d in doc["days"] if d["policy"] == "min-resource"]
    epochs = [p["epoch"] for p in plans]
    assert len(epochs) >= 2 and epochs == sorted(epochs)
    assert all(p["policy"] == "min-resource" for p in plans)
    assert any(p["reason"].startswith(("load moved", "p99 near target")) for p in plans[1:])
    # rows: the day's windows per policy, judged per pipeline
    rows = doc["rows"]
    assert {(r["mode"], r["policy"]) for r in rows} == {("mps", "even"), ("mps", "min-resource")}
    assert len([r for r in rows if r["policy"] == "even"]) == 20  # 10 s in 0.5 s windows
    assert all(r["within_qos"] == (r["worst_p99_over_qos"] <= 1) for r in rows if r["count"])
    assert (
        sum(r["errors"] for r in rows if r["policy"] == "min-resource")
        == (s["failed"]["mps"]["min-resource"])
    )
    (peak,) = doc["peaks"]
    assert peak["mode"] == "mps" and peak["peak_qps"] == 30.0 and peak["given"]
    for png in ("follow-load-mps.png",):
        assert (tmp_path / png).read_bytes().startswith(PNG), png
        assert png in md_path.read_text()
    # a later call for another mode keeps this one's: merged, the summary is the same
    earlier = follow.read_earlier(str(json_path), ["green"], tmp_path)
    assert earlier is not None and earlier.merged[0]["modes"] == ["mps"]
    assert follow.summarize(earlier.per, earlier.modes) == s
    assert earlier.rows == rows and earlier.figs == [tmp_path / "follow-load-mps.png"]
    assert follow.read_earlier(str(json_path), ["mps"], tmp_path).modes == {}  # re-measured


def test_merge_refuses_a_file_that_is_not_a_follow_load_result(tmp_path: Path):
    other = tmp_path / "peak-load.json"
    other.write_text(json.dumps({"name": "peak-load", "rows": [], "summary": {}}))
    with pytest.raises(InvalidArgument, match="not a follow-load result"):
        follow.read_earlier(str(other), ["mps"], tmp_path)
