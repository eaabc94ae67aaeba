"""min-resource's fallback plans as max-load chooses: never predicted to carry less than a baseline.

Where no plan meets the target, min-resource plans for the most of it the GPUs carry. That plan
is the one predicted to carry the largest fraction of the target among max-load's partitioned
search and the baselines' plans of the same world, and its reason names the winner. Since whole
GPUs taken in turns are judged at the batches that form (the H100's exclusive run kept batches
of 1-2, docs/results/maxload-candidates.md), the partitioned plan carries the most of the PyTorch
pipelines' target on one H200 too; a baseline wins where the gateway's price makes every plan
nearly tie (two reference pipelines on one H100, the gateway priced as `even-priced`). Worlds and
the peak bisection are test_maxload_dominates's (committed profiles, small local-search budget).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.perfmodel.predictor import predict
from scheduler.policy import PolicyInput
from scheduler.search.planning import check_plan, total_units
from scheduler.search.policies import get_policy
from scheduler.search.policies.minresource import MinResource
from scheduler.service.planstore import validate
from scheduler.tools.maxload_peaks import world as headline_world
from tests.test_maxload_dominates import BASELINES, RES, TORCH, _world, peak

HEADROOM = 0.2  # min-resource's default: the target is the load x 1.2


def _loaded(
    gpus: int,
    load: str,
    scale: float,
    device: str = "h200",
    mix: tuple[str, ...] = TORCH,
    **options: str,
) -> PolicyInput:
    """test_maxload_dominates's world with its load (10 qps a pipeline, or 10/30/50) x `scale`."""
    world = _world(device, mix, gpus, load, **options)
    return replace(world, load_qps={p: r * scale for p, r in world.load_qps.items()})


STS_T2I = ("speech-to-text", "text-to-img")
ITT_STS = ("img-to-text", "speech-to-text")


@pytest.mark.parametrize(
    ("gpus", "load", "scale", "device", "mix", "winner"),
    [
        # a hundred times the load: far past what one or two H200s carry
        (1, "even", 100.0, "h200", TORCH, "the partitioned plan"),
        (1, "skewed", 100.0, "h200", TORCH, "the partitioned plan"),
        (2, "even", 100.0, "h200", TORCH, "the partitioned plan"),
        # just past what one H100 carries with the gateway priced: the baselines win by a little
        (1, "even-priced", 17.0 / 1.2, "h100", STS_T2I, "exclusive's plan"),
        (1, "even-priced", 17.0 / 1.2, "h100", ITT_STS, "even's plan"),
    ],
)  # fmt: skip
def test_fallback_carries_at_least_what_every_baseline_carries(
    gpus: int, load: str, scale: float, device: str, mix: tuple[str, ...], winner: str
) -> None:
    world = _loaded(gpus, load, scale, device, mix)
    target = {p: r * (1 + HEADROOM) for p, r in world.load_qps.items()}
    plan = MinResource().plan(world)
    assert plan.policy == "min-resource"
    assert set(plan.clamped) == set(mix)
    assert check_plan(world, plan, time_sliced_ok=True) == []
    validate(plan)  # an agent can run it
    # clamped to one fraction of the target, which the plan carries
    fractions = {plan.planned_qps[p] / r for p, r in target.items()}
    assert max(fractions) - min(fractions) < 1e-9
    assert 0 < min(fractions) < 1
    assert predict(world, plan, plan.planned_qps).feasible
    mine = peak(world, plan, target)
    assert min(fractions) <= mine * (1 + RES)
    for name, options in BASELINES:
        theirs_world = _loaded(gpus, load, scale, device, mix, **options)
        theirs = peak(world, get_policy(name).plan(theirs_world), target)
        assert mine * (1 + RES) >= theirs, (name, options, mine, theirs, plan.reason)
    # the reason names the candidate that won and what the others carried
    assert plan.reason.startswith("target not reachable: clamped to ")
    assert f"by {winner} (carried: " in plan.reason


def test_where_the_cheapest_plan_meets_the_target_no_baseline_is_consulted() -> None:
    # 12 qps a pipeline on two H200s: the cheapest-plan search meets it, as before
    world = _loaded(2, "even", 1.0)
    plan = MinResource().plan(world)
    assert plan.reason == "min-resource at load + headroom"
    assert plan.clamped == ()
    assert any(r.sm_percent < 100 for a in plan.stages for r in a.replicas)


@pytest.mark.parametrize(
    ("mix", "grids"), [("torch3", ("5", "2")), ("all7", ("2", "1"))], ids=["torch3", "all7"]
)
def test_at_low_load_min_resource_keeps_the_cheaper_of_two_grids(
    mix: str, grids: tuple[str, str]
) -> None:
    """Many stages on one H200 at 10 qps: the smallest stages' step decides the plan's size (the
    three PyTorch pipelines' ten stages take 65% of the GPU on their default 5% steps, 48% on
    2%), so min-resource searches the next finer grid too and keeps the cheaper plan; that plan
    still meets every target by prediction."""

    def at_low_load(**options: str) -> PolicyInput:
        w = headline_world(mix, 1, 0.97, **options)
        opts = {k: v for k, v in w.options.items() if k != "weights"}
        return replace(w, load_qps={p.name: 10.0 / len(w.pipelines) for p in w.pipelines},
                       options=opts)  # fmt: skip

    w = at_low_load()
    mine = MinResource().plan(w)
    alone = [total_units(MinResource().plan(at_low_load(share_step=g))) for g in grids]
    assert alone[1] < alone[0]  # the finer grid is cheaper here
    assert total_units(mine) == min(alone)
    assert not mine.clamped and predict(w, mine, w.load_qps).feasible
    assert check_plan(w, mine) == []
