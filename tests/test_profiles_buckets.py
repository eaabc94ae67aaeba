"""Stages that replay CUDA graphs run a batch padded to its power-of-two bucket: their profiles
say so (`batch_buckets: pow2`) and the predictor prices a batch of 12 as one of 16."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from common.errors import InvalidArgument
from scheduler.perfmodel import queueing
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import MEASURED_PROFILES, load, parse_document

GEN = load(MEASURED_PROFILES)["text-to-img/generate"]
PLAIN = replace(GEN, batch_buckets="")
BUCKETED = replace(GEN, batch_buckets="pow2")


@pytest.mark.parametrize("share", [20.0, 45.0, 100.0])
def test_a_batch_costs_its_bucket(share):
    assert BUCKETED.latency(share, 12) == pytest.approx(BUCKETED.latency(share, 16))
    assert BUCKETED.latency(share, 9) == pytest.approx(BUCKETED.latency(share, 16))
    assert BUCKETED.latency(share, 8) == pytest.approx(PLAIN.latency(share, 8))
    assert BUCKETED.latency(share, 12) > PLAIN.latency(share, 12)
    # a fractional mean batch moves continuously and never down
    bs = np.linspace(1.0, 16.0, 301)
    ys = [BUCKETED.latency(share, float(b)) for b in bs]
    assert all(b >= a - 1e-12 for a, b in zip(ys, ys[1:], strict=False))
    many = BUCKETED.latency_many(np.full(len(bs), share), bs)
    assert many == pytest.approx(ys, rel=1e-9)


def test_buckets_round_trip_and_bad_values_are_refused():
    back = StageProfile.from_json(BUCKETED.key, BUCKETED.to_json())
    assert back.batch_buckets == "pow2"
    assert "batch_buckets" not in PLAIN.to_json()
    bad = {**BUCKETED.to_json(), "batch_buckets": "pow3"}
    with pytest.raises(InvalidArgument):
        parse_document({"format": "camelot-profiles/1", "profiles": {GEN.key: bad}})


@pytest.mark.parametrize("rate_qps", [200.0, 900.0, 2500.0, 4000.0])
def test_mean_batch_is_the_least_fixed_point_of_a_stepped_service(rate_qps):
    lam = rate_qps / 1000.0

    def svc(b: float) -> float:
        return BUCKETED.latency(50.0, b)

    got = queueing.mean_batch(lam, 16, 2.0, svc)
    # the least b >= the wait's batch with b >= λ·S(b), by a fine scan
    start = 1.0 + lam * 2.0 if lam * 2.0 >= 1.0 else 1.0
    grid = np.arange(start, 16.0 + 1e-9, 1e-3)
    ok = [b for b in grid if b >= lam * svc(float(b)) - 1e-6]
    want = ok[0] if ok else 16.0
    assert got == pytest.approx(min(want, 16.0), abs=0.01)
