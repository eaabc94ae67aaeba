"""The `even` baseline: every stage on the GPUs with equal shares, and `replicas` copies of each."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from scheduler.policy import GpuInfo, NodeInfo, PipelineInfo, PolicyInput, StageInfo
from scheduler.search.policies.even import EvenPolicy


def world(gpus: int = 1, **options: str) -> PolicyInput:
    pipes = (
        PipelineInfo("a", (StageInfo("x", 8), StageInfo("y", 8)), 100.0),
        PipelineInfo("b", (StageInfo("z", 8),), 100.0),
    )
    nodes = (NodeInfo("n0", tuple(GpuInfo(i, 132, 80 << 30, 0, 0) for i in range(gpus))),)
    return PolicyInput(pipes, nodes, {"a": 1.0, "b": 1.0}, {}, options=options)


def test_one_replica_per_stage_with_equal_shares_by_default() -> None:
    plan = EvenPolicy().plan(world())
    assert [(a.pipeline, a.stage, len(a.replicas)) for a in plan.stages] == [
        ("a", "x", 1), ("a", "y", 1), ("b", "z", 1)
    ]  # fmt: skip
    assert {r.sm_percent for a in plan.stages for r in a.replicas} == {33.33}


def test_replicas_option_deals_every_copy_as_a_stage_of_its_own() -> None:
    plan = EvenPolicy().plan(world(gpus=2, replicas="2"))
    ids = [r.replica_id for a in plan.stages for r in a.replicas]
    assert ids == ["a.x.0", "a.x.1", "a.y.0", "a.y.1", "b.z.0", "b.z.1"]
    per_gpu: dict[int, float] = {}
    for a in plan.stages:
        for r in a.replicas:
            per_gpu[r.gpu] = per_gpu.get(r.gpu, 0.0) + r.sm_percent
    assert set(per_gpu) == {0, 1} and all(99.9 <= v <= 100.0 for v in per_gpu.values())


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_a_bad_replicas_option_is_refused_with_its_value(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="replicas"):
        EvenPolicy().plan(world(replicas=bad))


def test_one_stage_can_have_its_own_replica_count() -> None:
    plan = EvenPolicy().plan(world(**{"replicas": "2", "replicas.x": "3", "replicas.b/z": "1"}))
    assert [(a.stage, len(a.replicas)) for a in plan.stages] == [("x", 3), ("y", 2), ("z", 1)]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("replicas.x", "0", "replicas.x"), ("replicas.nope", "2", "replicas.nope names no stage")],
)
def test_a_bad_per_stage_replicas_option_is_refused(key: str, value: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        EvenPolicy().plan(world(**{key: value}))
