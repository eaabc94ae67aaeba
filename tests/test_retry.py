"""common.retry.Backoff, the one backoff: doubling to a cap, with as much jitter as asked."""

from __future__ import annotations

import pytest

from common.retry import Backoff


def test_the_ceiling_doubles_from_the_base_to_the_cap() -> None:
    b = Backoff(base_s=0.5, cap_s=3.0, jitter=0.0)
    assert [b.delay_s(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_very_long_run_of_failures_waits_the_cap() -> None:
    assert Backoff(base_s=1.0, cap_s=10.0, jitter=0.0).delay_s(5000) == 10.0


@pytest.mark.parametrize("jitter", [1.0, 0.5])
def test_jitter_draws_the_delay_from_the_top_share_of_the_ceiling(jitter: float) -> None:
    b = Backoff(base_s=1.0, cap_s=8.0, jitter=jitter)
    draws = [b.delay_s(2) for _ in range(500)]
    assert all((1.0 - jitter) * 4.0 <= d <= 4.0 for d in draws)
    assert len(set(draws)) > 1


def test_jitter_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)
