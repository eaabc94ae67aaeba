"""max-load is never predicted to carry less than a baseline (issue #22 item 2).

Its plan space holds every baseline's plan: whole GPUs taken in turns (`exclusive`), the same
placement as uncapped MPS clients (`exclusive:sharing=mps`), even shares (`even`) and feedback's
first plan (`feedback`), with the replica counts and batches each would use. So, on the
committed profiles, for every mix of the reference pipelines (H100 set), of the PyTorch ones
(H200 set, where they were profiled) and of all seven (H200 set), at several load mixes on one
and two GPUs, the highest load at which the predictor passes max-load's plan is at least each
baseline's. Both peaks are found here, with the full predictor, by one bisection. Also where
every stage is priced with a host part of its own, as the scheduler learns them from the
stages' reports (`-host`).

Without the baselines' plans among its candidates max-load fails 17 of these cases: two or
three PyTorch pipelines on one H200, where whole GPUs in turns carry 1.04-34x what any partition
does (all three: ten stages at 10% each), and all three on two at a skewed load (1.15x); all
four reference pipelines on one or two H100s at this test's small search budget (1.007-1.07x);
and, where the gateways are priced and bind first, whole GPUs or even shares carry up to 0.8%
more.
"""

from __future__ import annotations

import functools
import itertools
import zlib

import pytest

from scheduler.perfmodel.predictor import predict
from scheduler.perfmodel.profilestore import for_device
from scheduler.policy import GpuInfo, NodeInfo, PlanSpec, PolicyInput
from scheduler.search.planning import check_plan
from scheduler.search.policies import get_policy
from scheduler.search.policies.maxload import MaxLoad
from scheduler.service.planstore import validate
from scheduler.tools.maxload_peaks import BASELINES, REFERENCE, TORCH, peak, pipeline

SETS = {
    "h100": (for_device("NVIDIA H100 80GB HBM3"), 80 << 30),
    "h200": (for_device("NVIDIA H200"), 141 << 30),
}
# the local search's budget kept small: the test is about which candidate wins, not how far
# the partitioned search climbs (a weaker search only hands the baselines more cases)
OPTIONS = {"weights": "from-load", "polish_budget": "2000"}
# the bisection's resolution: two plans' peaks are compared to it
RES = 1e-4


_pipeline = functools.cache(pipeline)


def _mixes(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [*((n,) for n in names), *itertools.combinations(names, 2), names]


def _cases() -> list[tuple[str, tuple[str, ...], int, str]]:
    out = []
    for device, names in (("h100", REFERENCE), ("h200", TORCH)):
        for mix in _mixes(names):
            for gpus in (1, 2):
                # the load's mix is what max-load plans for (weights from the load); priced:
                # the gateways' CPU as the experiments price it, where the host binds first
                loads = ("even", "skewed") if len(mix) > 1 else ("even",)
                if device == "h100" and len(mix) > 1:
                    loads += ("even-priced",)
                # each stage priced with a host part of its own, as the scheduler learns them
                loads += ("even-host",)
                out.extend((device, mix, gpus, load) for load in loads)
    # all seven together, on the H200 set (its reference stages are the H100's profiles)
    for gpus in (1, 2):
        out.extend(("h200", REFERENCE + TORCH, gpus, load) for load in ALL7_LOADS)
    return out


ALL7_LOADS = ("even", "skewed", "even-host")


def _world(device: str, mix: tuple[str, ...], gpus: int, load: str, **options: str) -> PolicyInput:
    profiles, memory = SETS[device]
    stage_profiles = profiles.profiles
    if load.endswith("-host"):
        stage_profiles = {k: p.with_host_ms(host_part(k)) for k, p in stage_profiles.items()}
    node = NodeInfo("n0", tuple(GpuInfo(i, 132, memory) for i in range(gpus)))
    # skewed: the mix's first pipeline at 10 qps, the next at 30, 50, ...
    rates = {n: 10.0 * (1 + 2 * i if load == "skewed" else 1) for i, n in enumerate(mix)}
    if load.endswith("-priced"):
        options = {"gateway_cpu_ms": "7.25", "gateway_workers": "3", **options}
    return PolicyInput(
        tuple(_pipeline(n) for n in mix),
        (node,),
        rates,
        stage_profiles,
        options={**OPTIONS, **options},
    )


def host_part(key: str) -> float:
    """A stage's host part of a batch, ms: spread over the 0.25-2.5 ms the H100's host measured
    (docs/results/stage-host-fit-h100-1731d70.md), fixed per stage."""
    return 0.25 + 2.25 * (zlib.crc32(key.encode()) % 1000) / 999


def _whole_gpus_only_past_100(world: PolicyInput, plan: PlanSpec) -> list[str]:
    """GPUs whose shares add past 100% while not every replica on them has the whole GPU."""
    on: dict[tuple[str, int], list[float]] = {}
    for a in plan.stages:
        for r in a.replicas:
            on.setdefault((r.node, r.gpu), []).append(r.sm_percent)
    return [f"{g}: {s}" for g, s in on.items() if sum(s) > 100 + 1e-6 and min(s) < 100]


@pytest.mark.parametrize(
    ("device", "mix", "gpus", "load"),
    _cases(),
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else f"{v}gpu" if isinstance(v, int) else v,
)
def test_max_load_carries_at_least_what_every_baseline_carries(
    device: str, mix: tuple[str, ...], gpus: int, load: str
) -> None:
    world = _world(device, mix, gpus, load)
    plan = MaxLoad().plan(world)
    assert not plan.clamped  # every target is reachable: the comparison means something
    assert plan.policy == "max-load"
    assert check_plan(world, plan, time_sliced_ok=True) == []
    assert _whole_gpus_only_past_100(world, plan) == []
    validate(plan)  # an agent can run it
    mine = peak(world, plan, world.load_qps)
    # it plans for a load it carries (not necessarily at most `mine`: where a stage's batches
    # step up with the load, feasibility is not monotone in it, and the bisection from below
    # stops at the first gap)
    assert predict(world, plan, plan.planned_qps).feasible
    for name, options in BASELINES:
        theirs_world = _world(device, mix, gpus, load, **options)
        theirs = peak(world, get_policy(name).plan(theirs_world), world.load_qps)
        assert mine * (1 + RES) >= theirs, (name, options, mine, theirs, plan.reason)


def test_max_load_says_which_candidate_won_and_partitions_only_where_it_pays() -> None:
    # three PyTorch pipelines on one H200: whole GPUs taken in turns run batches of about one
    # (judged at the batches that form), so partitioned shares carry more
    torch = MaxLoad().plan(_world("h200", TORCH, 1, "even"))
    assert "the partitioned plan" in torch.reason and "exclusive x" in torch.reason
    assert any(r.sm_percent < 100 for a in torch.stages for r in a.replicas)
    # the gateway priced makes every plan nearly tie on two reference pipelines: exclusive's
    # carries a little more, and partitioning that does not pay is not chosen
    tie = MaxLoad().plan(_world("h100", ("speech-to-text", "text-to-img"), 1, "even-priced"))
    assert "exclusive's plan" in tie.reason and "partitioned x" in tie.reason
    assert all(r.sm_percent == 100 and r.time_sliced for a in tie.stages for r in a.replicas)
    # partitioning must pay by more than the option `tolerance`: at 50%, even's plan is kept
    # where partitioned shares carry 19% more (video analytics on one H100)
    va = MaxLoad().plan(_world("h100", ("video-analytics",), 1, "even", tolerance="0.5"))
    assert va.reason.split(" (carried")[0].endswith("even's plan"), va.reason
    assert "partitioned x" in va.reason
    # the partitioned search alone names no candidates
    alone = MaxLoad().plan(_world("h100", ("video-analytics",), 1, "even", baselines="none"))
    assert "carried" not in alone.reason
    # one reference pipeline on two H100s: partitioned shares carry more than any baseline
    speech = MaxLoad().plan(_world("h100", ("speech-to-text",), 2, "even"))
    assert "the partitioned plan" in speech.reason and "exclusive x" in speech.reason
    assert any(r.sm_percent < 100 for a in speech.stages for r in a.replicas)


@pytest.mark.parametrize(
    ("device", "mix", "grids"),
    [("h200", REFERENCE + TORCH, ("2", "1")), ("h200", TORCH, ("5", "2"))],
    ids=["all7-1gpu", "torch3-1gpu"],
)
def test_without_a_share_step_max_load_keeps_the_better_of_two_grids(
    device: str, mix: tuple[str, ...], grids: tuple[str, str]
) -> None:
    """Neither grid wins everywhere. Here, with each stage's own host part priced, the seven
    pipelines' 22 stages on one H200 carry more on 1% steps than on their default 2%, and the
    three PyTorch pipelines' ten more on 2% than on 5% (the four reference ones on one H100
    carry less on 1% than on 2%)."""
    world = _world(device, mix, 1, "even-host")
    mine = peak(world, MaxLoad().plan(world), world.load_qps)
    alone = [
        peak(world, MaxLoad().plan(_world(device, mix, 1, "even-host", share_step=g)),
             world.load_qps)
        for g in grids
    ]  # fmt: skip
    assert alone[1] > alone[0] * 1.1  # the finer grid pays here
    assert mine * (1 + RES) >= max(alone)
