"""The profiler's output is what the scheduler reads: format, sensitivity, pressure, Redis keys."""

from __future__ import annotations

import json

import pytest

from common import profileformat
from common.errors import InvalidArgument
from scheduler.perfmodel import profilestore as prof_mod
from scheduler.perfmodel.profiles import StageProfile
from services.profiler import profile as prof


def measured() -> prof.StageResult:
    r = prof.StageResult("img-to-text", "encode")
    r.latency_ms = {50.0: {1: 2.0, 8: 5.0}, 100.0: {1: 1.5, 8: 3.0}, 12.5: {1: 6.0, 8: 20.0}}
    r.weights_bytes, r.activation_bytes_per_item, r.output_bytes_per_item = 1 << 20, 4096, 512
    r.pressure_levels, r.slowdown = prof.sensitivity(3.0, {0.2: 3.3, 0.45: 3.9, 0.8: 3.7})
    r.pressure = prof.pressure_of(solo_gbs=1500.0, beside_gbs=1100.0, peak_gbs=2000.0)
    return r


def test_batches_include_the_stage_max() -> None:
    assert prof.batches_for(12, (1, 2, 4, 8, 16, 32)) == [1, 2, 4, 8, 12]
    assert prof.batches_for(1, (4, 8)) == [1]
    with pytest.raises(InvalidArgument):
        prof.batches_for(0, (1,))


def test_sensitivity_starts_at_one_and_never_falls() -> None:
    levels, slow = prof.sensitivity(3.0, {0.2: 3.3, 0.45: 3.9, 0.8: 3.7})
    assert levels == [0.0, 0.2, 0.45, 0.8]
    assert slow[0] == 1.0 and slow == sorted(slow)
    assert slow[1] == pytest.approx(1.1) and slow[3] == pytest.approx(1.3)  # 3.7 < 3.9: noise


def test_pressure_is_the_bandwidth_lost_over_the_peak() -> None:
    assert prof.pressure_of(1500, 1100, 2000) == pytest.approx(0.2)
    assert prof.pressure_of(1000, 1100, 2000) == 0.0  # faster beside it: noise, not negative
    with pytest.raises(InvalidArgument):
        prof.pressure_of(1, 1, 0)


def test_document_is_read_by_the_scheduler() -> None:
    doc = prof.document([measured()], device="NVIDIA H100 80GB HBM3", date="2026-02-03")
    got = prof_mod.parse_document(json.loads(json.dumps(doc)))
    p = got["img-to-text/encode"]
    assert not p.synthetic and p.device == "NVIDIA H100 80GB HBM3"
    assert p.shares == (12.5, 50.0, 100.0) and p.batches == (1, 8)
    assert p.latency(100, 8) == pytest.approx(3.0)
    assert p.memory_bytes(8) == (1 << 20) + 8 * 4096
    assert p.slowdown_at(0.45) == pytest.approx(1.3)
    assert p.pressure == pytest.approx(0.2)


def test_redis_items_use_the_scheduler_keys() -> None:
    doc = prof.document([measured()], device="dev", date="2026-02-03")
    items = prof.redis_items(doc)
    assert list(items) == [prof_mod.REDIS_PREFIX + "img-to-text/encode"]
    value = json.loads(items[prof_mod.REDIS_PREFIX + "img-to-text/encode"])
    p = StageProfile.from_json("img-to-text/encode", value)
    assert p.device == "dev" and p.latency(50, 1) == pytest.approx(2.0)


@pytest.mark.gpu
def test_profile_one_stage_on_the_gpu() -> None:
    settings = prof.Settings(
        ("video-analytics",),
        size="tiny",
        shares=(50, 100),
        batches=(1, 4),
        pressure_shares=(25,),
        repeats=5,
        corunner_mib=256,
        window_s=0.5,
    )
    # two stages sharing the run's co-runners, as `python -m services.profiler` runs them
    with prof.CoRunners(settings) as runners:
        rs = [
            prof.profile_stage(
                settings, "video-analytics", s, 4, log=lambda _: None, corunners=runners
            )
            for s in ("classify", "crop")
        ]
    doc = prof.document(rs, device="gpu", date="2026-02-03")
    for s in ("classify", "crop"):
        p = prof_mod.parse_document(doc)[f"video-analytics/{s}"]
        assert p.batches == (1, 4) and p.shares == (50.0, 100.0)
        assert p.latency(100, 4) > 0
        assert p.slowdown[0] == 1.0 and len(p.slowdown) == 2
    assert prof_mod.parse_document(doc)["video-analytics/classify"].weights_bytes > 0


class _CoRunner:
    """A co-runner as CoRunners sees one: answers `stop` with its bandwidth (its share in GB/s)."""

    started: list[float] = []

    def __init__(self, args: list[str], share: float) -> None:
        assert args[0] == "corunner"
        self.share, self.windows, self.closed = share, 0, False
        _CoRunner.started.append(share)

    def send(self, cmd: str) -> None:
        assert not self.closed

    def ask(self, cmd: str) -> dict[str, float]:
        assert cmd == "stop" and not self.closed
        self.windows += 1
        return {"gbs": self.share}

    def close(self) -> None:
        self.closed = True


def test_a_runs_co_runners_are_started_and_measured_once_for_all_its_stages() -> None:
    _CoRunner.started = []
    settings = prof.Settings(("p",), pressure_shares=(10, 25), window_s=0.0)
    with prof.CoRunners(settings, child=_CoRunner) as runners:  # type: ignore[arg-type]
        for _stage in range(3):
            assert runners.peak() == 100.0
            for share in (10, 25):
                c, alone = runners.level(share)
                assert alone == share and c.share == share
        kept = list(runners._children.values())
    # one process per share for the whole run, its bandwidth alone measured once
    assert sorted(_CoRunner.started) == [10, 25, 100]
    assert all(c.windows == 1 and c.closed for c in kept)  # type: ignore[attr-defined]


class _Worker(_CoRunner):
    """A profiler worker as profile_stage drives one: a stage whose batch takes `batch` ms at
    100% of the SMs, (100 / share) times that below, 1.5x that beside a running co-runner."""

    stages: list[float] = []
    running = False

    def __init__(self, args: list[str], share: float) -> None:
        self.share, self.windows, self.closed, self.kind = share, 0, False, args[0]
        if self.kind == "corunner":
            _CoRunner.started.append(share)
        else:
            _Worker.stages.append(share)
        self.hello = {"weights_bytes": 7, "batch_buckets": "pow2"}

    def send(self, cmd: str) -> None:
        if self.kind == "corunner" and cmd == "start":
            _Worker.running = True

    def __enter__(self) -> _Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ask(self, cmd: str, **kw: float) -> dict[str, float]:
        if self.kind == "corunner":
            _Worker.running = False
            return super().ask(cmd)
        ms = kw["batch"] * 100 / self.share * (1.5 if _Worker.running else 1.0)
        return {"ms": ms, "working_bytes": 8 * kw["batch"], "output_bytes_per_item": 3}


@pytest.mark.parametrize(
    ("contention", "stage_children"), [(50.0, [50.0, 100.0]), (40.0, [50.0, 100.0, 40.0])]
)
def test_the_contention_levels_run_in_the_child_of_a_profiled_share(
    monkeypatch: pytest.MonkeyPatch, contention: float, stage_children: list[float]
) -> None:
    monkeypatch.setattr(prof, "Child", _Worker)
    _CoRunner.started, _Worker.stages = [], []
    settings = prof.Settings(
        ("p",),
        shares=(50, 100),
        batches=(1, 4),
        pressure_shares=(25,),
        window_s=0.0,
        contention_share=contention,
    )
    r = prof.profile_stage(settings, "p", "s", 4, log=lambda _: None)
    # a stage child per profiled share, and one more only where contention's share is not one
    assert _Worker.stages == stage_children
    assert r.latency_ms == {50: {1: 2.0, 4: 8.0}, 100: {1: 1.0, 4: 4.0}}
    assert r.weights_bytes == 7 and r.activation_bytes_per_item == 8
    assert r.slowdown == [1.0, 1.5] and r.pressure_levels == [0.0, 0.25]
    assert sorted(_CoRunner.started) == [25.0, 100.0]


def test_both_sides_write_the_one_envelope() -> None:
    doc = prof.document([measured()], device="dev", date="2026-02-03")
    again = prof_mod.to_document(
        prof_mod.parse_document(doc).values(), device="dev", date="2026-02-03", note=doc["note"]
    )
    assert list(again) == list(doc)
    assert again["format"] == doc["format"] == profileformat.FORMAT
    assert list(prof.redis_items(doc)) == list(profileformat.redis_items(again))
