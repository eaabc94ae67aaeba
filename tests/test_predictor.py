"""Stage profiles, the queueing model and the contention-aware predictor (CPU, synthetic set)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import FailedPrecondition, InvalidArgument
from scheduler.perfmodel import profilestore as prof_mod
from scheduler.perfmodel import queueing
from scheduler.perfmodel.bias import BiasCorrector
from scheduler.perfmodel.predictor import predict, stage_p99_ms
from scheduler.perfmodel.profiles import StageProfile
from scheduler.perfmodel.profilestore import load
from scheduler.policy import (
    GpuInfo,
    Measured,
    NodeInfo,
    PipelineInfo,
    PlanSpec,
    PolicyInput,
    ReplicaSpec,
    StageAssignment,
    StageInfo,
)

PROFILES = load()
ENCODE = PROFILES["img-to-text/encode"]
CROP = PROFILES["video-analytics/crop"]


def world_of(pipes: dict[str, list[str]], gpus: int = 1, qos: float = 100.0) -> PolicyInput:
    infos = tuple(
        PipelineInfo(p, tuple(StageInfo(s, 32) for s in stages), qos) for p, stages in pipes.items()
    )
    node = NodeInfo("n0", tuple(GpuInfo(i, 132, 80 << 30) for i in range(gpus)))
    return PolicyInput(infos, (node,), {p: 100.0 for p in pipes}, PROFILES)


def one_stage_plan(
    pipe: str, stage: str, share: float, batch: int, gpu: int = 0
) -> StageAssignment:
    rep = ReplicaSpec(f"{pipe}.{stage}.0", "n0", gpu, share, batch)
    return StageAssignment(pipe, stage, (rep,))


# --- profiles ------------------------------------------------------------------------------


def test_synthetic_set_is_marked_and_matches_pipeline_configs() -> None:
    doc = json.loads(prof_mod.DEFAULT_PROFILES.read_text())
    assert doc["synthetic"] is True and "SYNTHETIC" in doc["note"]
    assert all(p.synthetic for p in PROFILES.values())
    configs = Path(__file__).parent.parent / "services" / "pipelines"
    if not configs.is_dir():
        pytest.skip("no pipeline configs in this checkout")
    for path in configs.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        for s in cfg["stages"]:
            key = f"{cfg['name']}/{s['name']}"
            assert key in PROFILES, key
            assert PROFILES[key].max_batch >= s.get("max_batch", 1), key


def test_synthetic_model_reproduces_the_resnet_measurements() -> None:
    from scheduler.tools.synthetic_profiles import fit

    _, err = fit()
    assert math.expm1(err) < 0.10


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    prof_mod.save(path, PROFILES.values(), device="dev", date="2026-01-02", synthetic=True)
    again = load(path)
    assert set(again) == set(PROFILES)
    for key, p in PROFILES.items():
        q = again[key]
        assert q.device == "dev" and q.date == "2026-01-02"
        assert q.latency(37.0, 5) == pytest.approx(p.latency(37.0, 5), rel=1e-6)
        assert q.slowdown_at(0.6) == pytest.approx(p.slowdown_at(0.6), rel=1e-6)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.pop("latency_ms"),
        lambda o: o["latency_ms"]["10"].pop("1"),  # a missing point
        lambda o: o["latency_ms"]["10"].update({"1": -1.0}),
        lambda o: o["sensitivity"].update(slowdown=[0.5, 1, 1, 1, 1]),
        lambda o: o["sensitivity"].update(slowdown=[1, 2, 1.5, 3, 4]),
        lambda o: o.update(pressure="high"),
    ],
)
def test_malformed_profile_is_invalid_argument(mutate) -> None:
    obj = ENCODE.to_json()
    mutate(obj)
    with pytest.raises(InvalidArgument):
        StageProfile.from_json("img-to-text/encode", obj)


def test_bad_document_and_key() -> None:
    with pytest.raises(InvalidArgument):
        prof_mod.parse_document({"format": "other", "profiles": {}})
    with pytest.raises(InvalidArgument):
        StageProfile.from_json("no-slash", ENCODE.to_json())


def test_noisy_measurements_are_made_monotone() -> None:
    obj = ENCODE.to_json()
    obj["latency_ms"]["60"]["8"] = obj["latency_ms"]["50"]["8"] * 1.5  # 60% slower than 50%?
    p = StageProfile.from_json("img-to-text/encode", obj)
    assert p.latency(60, 8) <= p.latency(50, 8)


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(sorted(PROFILES)),
    s1=st.floats(1.0, 100.0),
    s2=st.floats(1.0, 100.0),
    b1=st.floats(1.0, 16.0),
    b2=st.floats(1.0, 16.0),
)
def test_latency_is_monotone(key: str, s1: float, s2: float, b1: float, b2: float) -> None:
    p = PROFILES[key]
    lo, hi = sorted((s1, s2))
    assert p.latency(hi, b1) <= p.latency(lo, b1) * (1 + 1e-12)
    small, big = sorted((b1, b2))
    assert p.latency(lo, small) <= p.latency(lo, big) * (1 + 1e-12)


@settings(max_examples=40, deadline=None)
@given(key=st.sampled_from(sorted(PROFILES)), share=st.floats(3.0, 100.0), rate=st.floats(1, 5e4))
def test_vectorised_twins_agree_with_the_scalar_model(key: str, share: float, rate: float) -> None:
    p = PROFILES[key]
    batches = np.asarray(p.batches, dtype=float)
    shares = np.full(len(batches), share)
    got = p.latency_many(shares, batches + 0.37)
    want = [p.latency(share, b + 0.37) if b + 0.37 <= p.max_batch else None for b in batches]
    for g, w in zip(got, want, strict=True):
        if w is not None:
            assert g == pytest.approx(w, rel=1e-9)
    svc = p.service_at(shares)
    p99, util = queueing.replica_many(np.full(len(batches), rate), batches, 2.0, svc)
    for i, b in enumerate(p.batches):
        est = queueing.replica(rate, b, 2.0, lambda x, b=b: p.latency(share, x))
        assert util[i] == pytest.approx(est.utilization, rel=1e-9)
        if est.utilization < 1:
            assert p99[i] == pytest.approx(est.p99_ms, rel=1e-6)


# --- queueing and stage prediction ---------------------------------------------------------


def test_resnet_like_scaling_is_sublinear() -> None:
    # two half-GPU replicas beat one whole GPU, as measured on the H100
    whole = ENCODE.throughput(100, 32)
    halves = 2 * ENCODE.throughput(50, 32)
    assert halves > 1.2 * whole


@settings(max_examples=50, deadline=None)
@given(
    key=st.sampled_from(sorted(PROFILES)),
    s1=st.sampled_from([10, 20, 30, 50, 70, 100]),
    s2=st.sampled_from([10, 20, 30, 50, 70, 100]),
    frac=st.floats(0.05, 0.8),
    batch=st.sampled_from([1, 4, 8, 16]),
)
def test_more_share_never_raises_stage_p99(
    key: str, s1: int, s2: int, frac: float, batch: int
) -> None:
    p = PROFILES[key]
    lo, hi = sorted((s1, s2))
    rate = frac * p.throughput(lo, batch)  # stable at the smaller share
    assert stage_p99_ms(p, rate, 1, hi, batch) <= stage_p99_ms(p, rate, 1, lo, batch) + 1e-9


@settings(max_examples=50, deadline=None)
@given(
    key=st.sampled_from(sorted(PROFILES)),
    q1=st.floats(0.0, 2.0),
    q2=st.floats(0.0, 2.0),
    frac=st.floats(0.05, 0.4),
)
def test_more_pressure_never_lowers_stage_p99(key: str, q1: float, q2: float, frac: float) -> None:
    p = PROFILES[key]
    lo, hi = sorted((q1, q2))
    assert p.slowdown_at(hi) >= p.slowdown_at(lo)
    rate = frac * p.throughput(50, 8)
    a = stage_p99_ms(p, rate, 1, 50, 8, factor=p.slowdown_at(lo))
    b = stage_p99_ms(p, rate, 1, 50, 8, factor=p.slowdown_at(hi))
    assert b >= a - 1e-9


def test_overload_is_unstable_and_p99_grows_with_load() -> None:
    cap = ENCODE.throughput(30, 16)
    p99s = [stage_p99_ms(ENCODE, f * cap, 1, 30, 16) for f in (0.5, 0.7, 0.85)]
    assert p99s == sorted(p99s)
    assert stage_p99_ms(ENCODE, 1.1 * cap, 1, 30, 16) == math.inf
    # the same load spread over two replicas is stable again
    assert stage_p99_ms(ENCODE, 1.1 * cap, 2, 30, 16) < math.inf


def test_dynamic_batch_grows_with_rate_and_respects_max_wait() -> None:
    slow = queueing.replica(50, 32, 2.0, lambda b: ENCODE.latency(40, b))
    fast = queueing.replica(2000, 32, 2.0, lambda b: ENCODE.latency(40, b))
    assert slow.batch < fast.batch <= 32
    assert slow.fill_ms <= 2.0 + 1e-9


def test_a_batch_waits_only_when_company_is_likely() -> None:
    """The batcher's rule (contract.batching): at 5 qps nobody else comes within 20 ms, so a
    request runs at once; at 200 qps four are expected, so the batch waits and grows."""
    svc = lambda b: 1.0 + 0.1 * b  # noqa: E731
    sparse = queueing.replica(5, 32, 20.0, svc)
    assert sparse.fill_ms == 0.0 and sparse.batch == pytest.approx(1.0, abs=0.01)
    assert sparse.p99_ms < svc(1) + 1.0
    busy = queueing.replica(200, 32, 20.0, svc)
    assert busy.fill_ms > 5.0 and busy.batch > 3.0
    p99, _ = queueing.replica_many(np.array([5.0, 200.0]), np.array([32, 32]), 20.0, svc)
    assert p99 == pytest.approx([sparse.p99_ms, busy.p99_ms])


# --- whole-plan prediction: contention, time slicing, hops ----------------------------------


def test_a_co_runner_slows_a_stage_and_a_busier_one_more() -> None:
    world = world_of({"img-to-text": ["encode"], "video-analytics": ["crop"]})
    enc = one_stage_plan("img-to-text", "encode", 50, 16)
    alone_world = world_of({"img-to-text": ["encode"]})
    alone = predict(alone_world, PlanSpec("t", (enc,)), {"img-to-text": 500})
    crop = one_stage_plan("video-analytics", "crop", 50, 32)
    plan = PlanSpec("t", (enc, crop))
    light = predict(world, plan, {"img-to-text": 500, "video-analytics": 1000})
    heavy = predict(world, plan, {"img-to-text": 500, "video-analytics": 10000})
    a = alone.stage("img-to-text", "encode")
    b = light.stage("img-to-text", "encode")
    c = heavy.stage("img-to-text", "encode")
    assert a.replicas[0].factor == 1.0
    assert 1.0 < b.replicas[0].factor < c.replicas[0].factor
    assert a.p99_ms < b.p99_ms < c.p99_ms
    # on another GPU there is no contention
    apart = PlanSpec("t", (enc, one_stage_plan("video-analytics", "crop", 50, 32, gpu=1)))
    two = world_of({"img-to-text": ["encode"], "video-analytics": ["crop"]}, gpus=2)
    far = predict(two, apart, {"img-to-text": 500, "video-analytics": 10000})
    assert far.stage("img-to-text", "encode").p99_ms == pytest.approx(a.p99_ms)


def test_whole_gpu_replicas_on_one_gpu_time_slice() -> None:
    world = world_of({"img-to-text": ["encode"], "speech-to-text": ["acoustic"]})
    plan = PlanSpec(
        "t",
        (
            one_stage_plan("img-to-text", "encode", 100, 16),
            one_stage_plan("speech-to-text", "acoustic", 100, 16),
        ),
    )
    light = predict(world, plan, {"img-to-text": 100, "speech-to-text": 100})
    rep = light.stage("img-to-text", "encode").replicas[0]
    assert rep.time_sliced and rep.factor > 1.0
    assert not light.problems
    # taking turns, the batches that form decide, not the full ones: at 300 qps each the two
    # would fit the GPU's time at batch 16, but they run batches of about 1, and those do not
    # (whole-GPU replicas on the H100 kept batches of 1-2 while the p99 collapsed)
    three = predict(world, plan, {"img-to-text": 300, "speech-to-text": 300})
    acoustic = PROFILES["speech-to-text/acoustic"]
    full = 300 / ENCODE.throughput(100, 16) + 300 / acoustic.throughput(100, 16)
    assert full < 0.5 and three.stage("img-to-text", "encode").replicas[0].estimate.batch < 2
    assert three.problems and not three.feasible


def test_hops_cost_more_across_gpus_and_on_the_wire() -> None:
    pipes = {"img-to-text": ["preprocess", "encode"]}
    same = PlanSpec(
        "t",
        (
            one_stage_plan("img-to-text", "preprocess", 20, 8),
            one_stage_plan("img-to-text", "encode", 50, 16),
        ),
    )
    split = PlanSpec(
        "t",
        (
            one_stage_plan("img-to-text", "preprocess", 20, 8),
            one_stage_plan("img-to-text", "encode", 50, 16, gpu=1),
        ),
    )
    w = world_of(pipes, gpus=2)
    h_same = predict(w, same).pipelines["img-to-text"].hops_ms
    h_split = predict(w, split).pipelines["img-to-text"].hops_ms
    h_wire = predict(w, same, transport="wire").pipelines["img-to-text"].hops_ms
    assert h_same < h_split < h_wire
    decomposition = predict(w, same).pipelines["img-to-text"].decomposition()
    assert set(decomposition["stages"]) == {"preprocess", "encode"}
    assert {"fill_ms", "queue_p99_ms", "service_ms"} <= set(decomposition["stages"]["encode"])


def test_missing_profile_and_missing_stage() -> None:
    w = world_of({"img-to-text": ["encode"]})
    bare = replace(w, profiles={})
    with pytest.raises(FailedPrecondition):
        predict(bare, PlanSpec("t", (one_stage_plan("img-to-text", "encode", 50, 8),)))
    two = world_of({"img-to-text": ["preprocess", "encode"]})
    with pytest.raises(InvalidArgument):
        predict(two, PlanSpec("t", (one_stage_plan("img-to-text", "encode", 50, 8),)))


# --- online bias correction ----------------------------------------------------------------


def test_bias_moves_predictions_toward_measurements() -> None:
    w = world_of({"img-to-text": ["encode"]})
    plan = PlanSpec("t", (one_stage_plan("img-to-text", "encode", 50, 16),))
    first = predict(w, plan, {"img-to-text": 400})
    predicted = first.pipelines["img-to-text"].p99_ms
    # the stage really takes twice what its profile says; the hops are as predicted
    measured = predicted + first.stage("img-to-text", "encode").p99_ms
    bias = BiasCorrector(alpha=0.5, min_count=10)
    errors = []
    for _ in range(8):
        profiles = bias.apply(PROFILES)
        now = predict(replace(w, profiles=profiles), plan, {"img-to-text": 400})
        p99 = now.pipelines["img-to-text"].p99_ms
        errors.append(abs(math.log(measured / p99)))
        stage_p99 = now.stage("img-to-text", "encode").p99_ms
        assigned = replace(plan.stages[0], predicted_p99_ms=stage_p99)
        bias.observe(
            replace(plan, stages=(assigned,)),
            {
                "img-to-text/encode": Measured(
                    p99_ms=measured - now.pipelines["img-to-text"].hops_ms, count=100
                ),
            },
        )
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.1 * errors[0]


def test_bias_is_bounded_and_ignores_thin_windows() -> None:
    bias = BiasCorrector(alpha=1.0, lo=0.5, hi=3.0, min_count=50)
    for _ in range(5):
        bias.update("p", 2.9, 1.0)
    assert bias.factor("p") == 3.0
    for _ in range(10):
        bias.update("p", 0.001, 1000.0)
    assert bias.factor("p") == 0.5
    plan = PlanSpec("t", (replace(one_stage_plan("a", "b", 50, 8), predicted_p99_ms=10.0),))
    bias.observe(plan, {"a/b": Measured(p99_ms=100.0, count=3)})
    assert bias.factor("a/b") == 1.0
    with pytest.raises(InvalidArgument):
        BiasCorrector(alpha=0.0)


def test_an_overloaded_window_teaches_the_bias_nothing() -> None:
    """A p99 past what any factor in range explains is a queue growing (a load past the plan's
    capacity), not a model error: on the H100 one overloaded peak-load trial drove the factors
    to their cap, and the plans made with them carried less."""
    bias = BiasCorrector(alpha=0.3, lo=0.5, hi=3.0, min_count=50)
    plan = PlanSpec("t", (replace(one_stage_plan("a", "b", 50, 8), predicted_p99_ms=10.0),))
    bias.observe(
        plan, {"a/b": Measured(p99_ms=1400.0, count=900), "a": Measured(2300.0, count=900)}
    )
    assert bias.factors() == {}
    # a slower service the factor can explain is learned as before, stage and pipeline
    bias.observe(plan, {"a/b": Measured(p99_ms=25.0, count=900), "a": Measured(25.0, count=900)})
    assert bias.factor("a/b") == pytest.approx(2.5**0.3)
    assert bias.factor("a") == pytest.approx(2.5**0.3)


# --- Redis --------------------------------------------------------------------------------


async def test_profiles_round_trip_through_redis(redis_server) -> None:
    client = aioredis.from_url(redis_server.url)
    try:
        n = await prof_mod.store_redis(client, PROFILES.values())
        assert n == len(PROFILES)
        raw = await client.get(prof_mod.REDIS_PREFIX + "img-to-text/encode")
        assert json.loads(raw)["synthetic"] is True
        back = await prof_mod.load_redis(client)
        assert set(back) == set(PROFILES)
        assert back["img-to-text/encode"].latency(45, 7) == pytest.approx(ENCODE.latency(45, 7))
        await client.set(prof_mod.REDIS_PREFIX + "x/y", "not json")
        with pytest.raises(InvalidArgument):
            await prof_mod.load_redis(client)
    finally:
        await client.aclose()


def test_a_query_pays_its_own_cost_outside_the_stages_once() -> None:
    """The client's send and the gateway's work: a constant plus the input's bytes, once per
    query whatever the stages; the configs give each pipeline its input's size."""
    from contract.pipeline_config import load_pipeline
    from scheduler.perfmodel.predictor import HopCosts
    from scheduler.service.pipelines import from_config

    video = from_config(load_pipeline("video-analytics", "full"))
    assert video.input_bytes == 720 * 1280 * 3
    w = world_of({"img-to-text": ["encode"]})
    plan = PlanSpec("t", (one_stage_plan("img-to-text", "encode", 50, 16),))
    small = predict(w, plan, {"img-to-text": 100}).pipelines["img-to-text"]
    big_info = replace(w.pipelines[0], input_bytes=3_600_000)
    big = predict(replace(w, pipelines=(big_info,)), plan, {"img-to-text": 100})
    extra = big.pipelines["img-to-text"].p99_ms - small.p99_ms
    assert extra == pytest.approx(3_600_000 / HopCosts().query_bytes_s * 1e3)
    assert small.hops_ms == pytest.approx(HopCosts().ref_ms + HopCosts().query_ms)


# --- the gateway as a server that saturates --------------------------------------------------


def test_the_gateway_adds_queueing_that_grows_with_the_total_rate_and_caps_it() -> None:
    from dataclasses import replace

    from scheduler.perfmodel.predictor import HopCosts
    from scheduler.perfmodel.queueing import RHO_MAX

    w = world_of({"img-to-text": ["encode"], "video-analytics": ["crop"]})
    plan = PlanSpec("t", (one_stage_plan("img-to-text", "encode", 50.0, 8),
                          one_stage_plan("video-analytics", "crop", 50.0, 8)))  # fmt: skip
    priced = replace(w, options={"gateway_cpu_ms": "8"})
    rates = {"img-to-text": 20.0, "video-analytics": 20.0}
    plain = predict(w, plan, rates)
    got = predict(priced, plan, rates)
    # 40 qps x 8 ms = 32% of a core: stretched by 1/(1 - 0.32), the p99 pays the tail on it
    extra = HopCosts.gateway_tail * 8.0 * 0.32 / 0.68
    for name in rates:
        assert got.pipelines[name].p99_ms == pytest.approx(plain.pipelines[name].p99_ms + extra)
    # more load, more queueing; every pipeline pays for the others' queries
    busier = predict(priced, plan, {"img-to-text": 20.0, "video-analytics": 60.0})
    assert busier.pipelines["img-to-text"].p99_ms > got.pipelines["img-to-text"].p99_ms
    # past RHO_MAX of one core nothing is feasible; three workers carry it
    over = {"img-to-text": 60.0, "video-analytics": 60.0}  # 120 x 8 ms = 0.96 of a core
    assert 0.96 > RHO_MAX and not predict(priced, plan, over).feasible
    assert predict(priced, plan, over).problems
    three = replace(w, options={"gateway_cpu_ms": "8", "gateway_workers": "3"})
    assert not predict(three, plan, over).problems
    # unpriced (the default) the same plan and load say nothing of the gateway
    assert not predict(w, plan, over).problems


def test_max_load_plans_no_more_than_the_gateways_carry() -> None:
    from dataclasses import replace

    from scheduler.perfmodel.queueing import RHO_MAX
    from scheduler.search.policies.maxload import MaxLoad

    w = world_of({"video-analytics": ["detect", "crop", "classify"]}, qos=200.0)
    free = MaxLoad().plan(w).planned_qps["video-analytics"]
    capped = MaxLoad().plan(replace(w, options={"gateway_cpu_ms": "10"}))
    carried = capped.planned_qps["video-analytics"]
    assert carried <= RHO_MAX * 1000 / 10 < free
    # within the tolerance of the search, close to the cap the QoS leaves
    assert carried > 0.5 * RHO_MAX * 1000 / 10
