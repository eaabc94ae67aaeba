"""The vectorised predictor against the scalar one it stands in for during searches (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import InvalidArgument
from scheduler.perfmodel.predictor import predict
from scheduler.perfmodel.profilestore import load
from scheduler.perfmodel.vectorised import Vectorised
from scheduler.policy import (
    GpuInfo,
    NodeInfo,
    PipelineInfo,
    PlanSpec,
    PolicyInput,
    ReplicaSpec,
    StageAssignment,
    StageInfo,
)

PROFILES = load()
PIPES: dict[str, list[str]] = {}
for _key in PROFILES:
    _p, _s = _key.split("/")
    PIPES.setdefault(_p, []).append(_s)


@st.composite
def cases(draw: st.DrawFn) -> tuple[PolicyInput, PlanSpec, dict[str, float], str]:
    names = draw(st.lists(st.sampled_from(sorted(PIPES)), min_size=1, max_size=3, unique=True))
    green = draw(st.booleans())
    n_nodes = draw(st.integers(1, 2))
    nodes = tuple(
        NodeInfo(
            f"n{i}",
            tuple(
                GpuInfo(g, 132, 80 << 30, *((16, 8) if green else (0, 0)))
                for g in range(draw(st.integers(1, 2)))
            ),
        )
        for i in range(n_nodes)
    )
    gpus = [(n.name, g.index) for n in nodes for g in n.gpus]
    infos, stages = [], []
    for name in names:
        first = draw(st.integers(0, len(PIPES[name]) - 1))
        chosen = PIPES[name][first : first + draw(st.integers(1, 3))]
        in_bytes = draw(st.sampled_from([0, 150_528, 2_764_800]))
        infos.append(PipelineInfo(name, tuple(StageInfo(s, 32) for s in chosen), 100.0, in_bytes))
        for s in chosen:
            reps = []
            for i in range(draw(st.integers(1, 3))):
                node, gpu = draw(st.sampled_from(gpus))
                units = draw(st.integers(1, 16))
                groups = tuple(range(units)) if green else ()
                share = draw(st.sampled_from([5.0, 10.0, 25.0, 33.3, 50.0, 70.0, 100.0]))
                batch = draw(st.sampled_from([1, 2, 5, 8, 16]))
                wait = draw(st.sampled_from([500, 2000, 4000]))
                reps.append(ReplicaSpec(f"{name}.{s}.{i}", node, gpu, share, batch, wait, groups))
            stages.append(StageAssignment(name, s, tuple(reps)))
    rates = {n: draw(st.sampled_from([0.0, 1.0, 50.0, 300.0, 2000.0])) for n in names}
    transport = draw(st.sampled_from(["ref", "wire"]))
    # the gateway priced or not, on one worker or three (up to past its capacity)
    gateways = [{}, {"gateway_cpu_ms": "2"}, {"gateway_cpu_ms": "7.25", "gateway_workers": "3"}]
    options = draw(st.sampled_from(gateways))
    # the host's part of a batch (the scheduler's stage_host_ms) added or not
    host_ms = draw(st.sampled_from([0.0, 0.97]))
    profiles = {k: p.with_host_ms(host_ms) for k, p in PROFILES.items()}
    world = PolicyInput(tuple(infos), nodes, rates, profiles, options=options)
    return world, PlanSpec("t", tuple(stages)), rates, transport


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_vectorised_agrees_with_predict(case) -> None:
    world, plan, rates, transport = case
    want = predict(world, plan, rates, transport=transport)
    got = Vectorised(world, transport=transport).p99([plan, plan], rates)
    for i, name in enumerate(p.name for p in world.pipelines):
        ref = want.pipelines[name].p99_ms if not want.problems else math.inf
        for row in got:
            if math.isinf(ref):
                assert math.isinf(row[i])
            else:
                assert row[i] == pytest.approx(ref, rel=1e-9)


def test_many_plans_at_many_rates_in_one_call() -> None:
    node = NodeInfo("n0", (GpuInfo(0, 132, 80 << 30), GpuInfo(1, 132, 80 << 30)))
    info = PipelineInfo("img-to-text", (StageInfo("encode", 32),), 50.0)
    world = PolicyInput((info,), (node,), {}, PROFILES)
    vec = Vectorised(world)
    plans = [
        PlanSpec("t", (StageAssignment("img-to-text", "encode", reps),))
        for reps in (
            (ReplicaSpec("a", "n0", 0, 50.0, 16),),
            (ReplicaSpec("a", "n0", 0, 50.0, 16), ReplicaSpec("b", "n0", 1, 50.0, 16)),
        )
    ]
    loads = np.asarray([100.0, 100.0, 4000.0, 4000.0])
    flat = [vec.flatten([plans[i % 2]]) for i in range(4)]
    cols = [
        np.concatenate([f[c] + (i if c == 0 else 0) for i, f in enumerate(flat)]) for c in range(6)
    ]
    p99, excess = vec.run(*cols, loads[:, None], 4)
    for i in range(4):
        ref = predict(world, plans[i % 2], {"img-to-text": loads[i]})
        assert p99[i, 0] == pytest.approx(ref.pipelines["img-to-text"].p99_ms, rel=1e-9) or (
            math.isinf(p99[i, 0]) and not ref.feasible
        )
    # one replica cannot carry 4000 qps, two halves can: more replicas, more room
    assert math.isinf(p99[2, 0]) and math.isfinite(p99[3, 0])
    assert excess[2] > 1 >= excess[0]


def test_a_stage_without_replica_is_refused() -> None:
    node = NodeInfo("n0", (GpuInfo(0, 132, 80 << 30),))
    info = PipelineInfo("img-to-text", (StageInfo("encode", 32), StageInfo("decode", 32)), 50.0)
    world = PolicyInput((info,), (node,), {}, PROFILES)
    vec = Vectorised(world)
    with pytest.raises(InvalidArgument):
        vec.run(
            np.zeros(1, dtype=int),
            np.zeros(1, dtype=int),
            np.full(1, 50.0),
            np.full(1, 8.0),
            2.0,
            np.zeros(1, dtype=int),
            np.full((1, 1), 10.0),
            1,
        )
