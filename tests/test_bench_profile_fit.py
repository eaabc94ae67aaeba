"""The two monotone fits the profile-fit benchmark compares (CPU)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.perfmodel.profiles import monotone_table
from scheduler.tools.bench_profile_fit import isotonic_table, pava, run


def test_pava_is_the_nearest_monotone_sequence() -> None:
    assert pava([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert pava([4, 2, 3, 1], increasing=False) == [4, 2.5, 2.5, 1]
    assert pava([1, 2, 3]) == [1, 2, 3]


tables = st.integers(2, 5).flatmap(
    lambda s: st.integers(2, 5).flatmap(
        lambda b: st.lists(
            st.lists(st.floats(0.5, 50.0), min_size=b, max_size=b), min_size=s, max_size=s
        )
    )
)


@settings(max_examples=50, deadline=None)
@given(tables)
def test_both_fits_obey_both_orders(rows: list[list[float]]) -> None:
    table = tuple(tuple(r) for r in rows)
    for fit in (monotone_table, isotonic_table):
        t = np.asarray(fit(table))
        assert np.all(np.diff(t, axis=1) >= -1e-9)  # more items never faster
        assert np.all(np.diff(t, axis=0) <= 1e-9)  # more SMs never slower


def test_isotonic_keeps_a_monotone_table_and_averages_an_outlier() -> None:
    clean = ((8.0, 9.0, 12.0), (4.0, 5.0, 7.0), (2.0, 3.0, 4.0))
    assert np.allclose(isotonic_table(clean), clean)
    noisy = (clean[0], clean[1], (2.0, 3.0, 9.0))  # one slow reading at the top share
    env, iso = np.asarray(monotone_table(noisy)), np.asarray(isotonic_table(noisy))
    assert env[1][2] == 9.0 and env[0][2] == 12.0  # the envelope lifts the share below to it
    assert iso[2][2] < 9.0 and iso[1][2] < 9.0  # isotonic splits the difference
    # and stays the least-squares fit in log space among monotone tables nearby
    y = np.log(np.asarray(noisy))
    best = np.sum((np.log(iso) - y) ** 2)
    for di, dj in itertools.product(range(3), range(3)):
        for eps in (-0.01, 0.01):
            trial = np.log(iso).copy()
            trial[di][dj] += eps
            t = np.exp(trial)
            if np.all(np.diff(t, axis=1) >= 0) and np.all(np.diff(t, axis=0) <= 0):
                assert np.sum((trial - y) ** 2) >= best - 1e-12


def test_benchmark_runs_on_the_committed_profiles() -> None:
    rows, summary = run("scheduler/perfmodel/profiles_data/h100.json")
    assert rows and summary["held_out_cells"] == sum(r["cells"] for r in rows)
    assert 0 < summary["envelope_mape"] and 0 < summary["isotonic_mape"]
