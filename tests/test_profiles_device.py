"""The scheduler plans with the profiles of the GPU its nodes report (issue #19 items 4 and 5):
the bundled set of that device or, flagged, the fallback one; profiles users stored in Redis
(`camelot profile --redis`) for that device in place of the bundled ones; those of another
device ignored. Real Redis, the real app and control loop; a recording policy is the only seam.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from common import profileformat
from common.errors import CamelotError
from protos import admin_pb2, agent_pb2
from scheduler.ctl import format_status
from scheduler.perfmodel import profilestore as P
from scheduler.perfmodel.profiles import StageProfile
from scheduler.policy import PipelineInfo, PlanSpec, PolicyInput, StageInfo
from scheduler.search.policies import get_policy
from scheduler.service.app import SchedulerApp
from scheduler.service.decisions import Decision
from scheduler.service.profilechoice import ProfileChoice
from scheduler.service.settings import SchedulerSettings
from tests.test_scheduler_server import running

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
# a device without a committed set of its own
A100 = "NVIDIA A100-SXM4-80GB"
BYOM = PipelineInfo("byom", (StageInfo("classify", 8),), qos_p99_ms=200.0)
ENCODE = P.load_default()["img-to-text/encode"]


def classify_profile(device: str) -> StageProfile:
    """A profile of the BYOM stage as `camelot profile` on `device` would store it."""
    return dataclasses.replace(ENCODE, pipeline="byom", stage="classify", device=device)


async def store(url: str, *profiles: StageProfile) -> None:
    """What `camelot profile --redis` writes: the profiler's document, one key per stage."""
    client = aioredis.from_url(url)
    try:
        for p in profiles:
            doc = P.to_document([p], device=p.device, date="2026-12-01")
            await client.mset(profileformat.redis_items(doc))
    finally:
        await client.aclose()


def gpu_beat(node: str, name: str, seq: int = 1) -> admin_pb2.NodeHeartbeat:
    gpu = agent_pb2.GpuInfo(index=0, name=name, sm_count=132, memory_bytes=80 << 30)
    inv = agent_pb2.InventoryResponse(node=node, backend="cuda", gpus=[gpu])
    return admin_pb2.NodeHeartbeat(node=node, inventory=inv, sequence=seq)


class Recording:
    """The `even` policy, keeping the world it was given."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[PolicyInput] = []

    def plan(self, world: PolicyInput) -> PlanSpec:
        self.seen.append(world)
        return get_policy("even").plan(world)


def settings(url: str, **kw: object) -> SchedulerSettings:
    base = SchedulerSettings(redis_url=url, port=0, admin_token="t", pipelines=(BYOM,),
                             policy="min-resource")  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


# -- the device's set -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slug"),
    [(H100, "h100"), (H200, "h200"), ("NVIDIA H100 PCIe", "h100"),
     ("NVIDIA A100-SXM4-80GB", "a100"), ("Tesla V100-SXM2-16GB", "v100"), ("NVIDIA L4", "l4"),
     (H100 + " (synthetic)", "h100"), ("", "")],
)  # fmt: skip
def test_a_device_is_filed_under_the_first_word_of_its_name_with_a_digit(
    name: str, slug: str
) -> None:
    assert P.device_slug(name) == slug


def test_the_committed_h100_set_is_filed_under_its_devices_slug() -> None:
    doc = json.loads(P.MEASURED_PROFILES.read_text())
    assert P.set_path(P.device_slug(doc["device"])) == P.MEASURED_PROFILES


def test_a_device_with_a_set_of_its_own_gets_it(tmp_path: Path) -> None:
    doc = json.loads(P.MEASURED_PROFILES.read_text())
    doc["device"] = H200
    doc["profiles"]["img-to-text/encode"]["weights_bytes"] = 12345
    (tmp_path / "h200.json").write_text(json.dumps(doc))
    (tmp_path / "h100.json").write_text(P.MEASURED_PROFILES.read_text())
    (tmp_path / "h100-synthetic.json").write_text(P.SYNTHETIC_PROFILES.read_text())
    got = P.for_device(H200, tmp_path)
    assert got.matches and got.source == "h200.json" and got.profiled_on == H200
    assert got.profiles["img-to-text/encode"].weights_bytes == 12345
    assert got.profiles["img-to-text/encode"].device == H200
    h100 = P.for_device(H100, tmp_path)
    assert h100.matches and h100.source == "h100.json"
    assert h100.profiles["img-to-text/encode"].weights_bytes != 12345


def test_the_committed_h200_set_measures_the_torch_stages_there_and_says_what_it_did_not() -> None:
    got = P.for_device(H200)
    assert got.matches and got.source == "h200.json" and got.profiled_on == H200
    torch = {k: p for k, p in got.profiles.items() if k.startswith("torch-")}
    assert len(torch) == 10 and all(p.device == H200 and not p.synthetic for p in torch.values())
    # the reference stages are not measured on the H200 yet: each keeps the H100's numbers and
    # says so, so the scheduler names them as not profiled on this device
    rest = [p for k, p in got.profiles.items() if k not in torch]
    assert rest and all(p.synthetic and P.device_slug(p.device) == "h100" for p in rest)
    choice = ProfileChoice()
    choice.select({H200: 1})
    assert sorted(choice.foreign()) == sorted(k for k in got.profiles if k not in torch)


def test_a_device_without_a_set_gets_the_h100_one_and_it_says_so() -> None:
    got = P.for_device(A100)
    assert not got.matches
    assert got.source == "h100.json" and got.profiled_on == H100 and got.device == A100
    assert got.profiles == P.load_default()
    assert all(P.device_slug(p.device) == "h100" for p in got.profiles.values())
    assert got.describe() == f"h100.json (measured on {H100}; nodes: {A100})"
    assert P.for_device(H100).matches and P.for_device("").matches


def test_planning_a_device_with_another_ones_profiles_warns_once(caplog) -> None:
    choice = ProfileChoice()
    with caplog.at_level(logging.WARNING, logger="scheduler.service.profilechoice"):
        choice.select({H100: 1})
        assert not caplog.records  # the bundled set is this device's
        choice.select({A100: 1})
        choice.select({A100: 2})
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert warned[0].startswith(f"planning {A100} with profiles measured on {H100}")
    assert "camelot profile" in warned[0]
    assert len(choice.foreign()) == len(choice.profiles)
    assert "not profiled on this device" in choice.describe()


def test_the_device_most_gpus_have_is_planned_for() -> None:
    choice = ProfileChoice()
    choice.select({H100: 1, H200: 3})
    assert choice.device == H200
    choice.select({H100: 2, H200: 2})  # a tie goes by name
    assert choice.device == H100


def test_an_explicit_file_is_planned_with_as_it_is() -> None:
    choice = ProfileChoice(str(P.SYNTHETIC_PROFILES))
    choice.select({H100: 1})
    assert choice.take_stored({BYOM.name + "/classify": classify_profile(H100)}) is False
    assert choice.profiles == P.load(P.SYNTHETIC_PROFILES)
    assert choice.describe().startswith(str(P.SYNTHETIC_PROFILES))


# -- Redis: what `camelot profile --redis` stored ---------------------------------------------


async def test_a_stored_profile_of_the_nodes_device_is_planned_with(redis_server) -> None:
    """The BYOM stage has no bundled profile: min-resource refuses it until its profile is in
    Redis, then plans it (and a policy sees the stored profile in its input)."""
    app = SchedulerApp(settings(redis_server.url, profiles_refresh_s=0.01), [BYOM])
    await app.start()
    try:
        await app.heartbeat(gpu_beat("n1", A100))
        await app.refresh_profiles()
        with pytest.raises(CamelotError) as e:
            await app.replan("no profile yet")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        await store(redis_server.url, classify_profile(A100))
        await asyncio.sleep(app.settings.profiles_refresh_s)
        await app.refresh_profiles()
        recording = Recording()
        await app.replan("seen", policy=recording)
        seen = recording.seen[0].profiles["byom/classify"]
        assert isinstance(seen, StageProfile) and seen.device == A100
        plan = await app.replan("profiled")
        assert [(s.pipeline, s.stage) for s in plan.stages] == [("byom", "classify")]
        status = app.status(0)
        assert "1 stages from redis" in status.profiles and f"nodes: {A100}" in status.profiles
        assert f"profiles: h100.json (measured on {H100}; nodes: {A100})" in format_status(status)
    finally:
        await app.aclose()


async def test_a_stored_profile_of_another_device_is_ignored(redis_server, caplog) -> None:
    await store(redis_server.url, classify_profile(H100))
    client = aioredis.from_url(redis_server.url)
    await client.set(profileformat.REDIS_PREFIX + "byom/other", "not json")
    await client.aclose()
    app = SchedulerApp(settings(redis_server.url), [BYOM])
    await app.start()
    try:
        with caplog.at_level(logging.WARNING):
            await app.heartbeat(gpu_beat("n1", A100))
            await app.refresh_profiles()  # the device changed: Redis is read again
        assert "byom/classify" not in app.known.profiles
        assert app.profile_choice.ignored == {"byom/classify": H100}
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"byom/classify was measured on {H100}, not on {A100}" in said
        assert "byom/other left out" in said  # a bad value hides no other
        with pytest.raises(CamelotError) as e:
            await app.replan("measured elsewhere")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "1 in redis ignored" in app.status(0).profiles
        # the same profile on the device it was measured on is planned with
        app.known.nodes.clear()
        await app.heartbeat(gpu_beat("n2", H100))
        await app.refresh_profiles()
        assert app.known.profiles["byom/classify"].device == H100
        plan = await app.replan("measured here")
        assert [r.node for s in plan.stages for r in s.replicas] == ["n2"]
    finally:
        await app.aclose()


async def test_the_running_scheduler_plans_a_stage_profiled_after_it_started(redis_server) -> None:
    """No restart: the loop reads Redis again (every profiles_refresh_s) and makes the first
    plan once the stage has a profile; a later profile of a stage re-plans (a trigger)."""
    s = settings(redis_server.url, profiles_refresh_s=0.1, tick_s=0.05, min_replan_interval_s=0.1)
    async with running(s) as (_port, sched):
        app = sched.app
        await app.heartbeat(gpu_beat("n1", A100))
        await asyncio.sleep(0.3)
        assert app.plan.epoch == 0  # min-resource has no profile of byom/classify
        await store(redis_server.url, classify_profile(A100))
        deadline = time.monotonic() + 10
        while app.plan.epoch == 0:
            assert time.monotonic() < deadline, "no plan after the profile was stored"
            await asyncio.sleep(0.05)
        slower = dataclasses.replace(
            classify_profile(A100), latency_ms=tuple(tuple(2 * v for v in row)
                                                     for row in ENCODE.latency_ms)
        )  # fmt: skip
        await store(redis_server.url, slower)
        while True:
            assert time.monotonic() < deadline, "stored profile change did not re-plan"
            ev = app.decisions.last("byom", Decision.TRIGGER)
            if ev is not None and ev.reason.startswith("profiles changed"):
                break
            await asyncio.sleep(0.05)
        assert ev.reason == f"profiles changed for {A100}: byom/classify"
        assert app.known.profiles["byom/classify"].latency_ms == slower.latency_ms
        while app.known.profiles_changed:  # the re-plan was made with them
            assert time.monotonic() < deadline, "the stale mark stayed after the re-plan"
            await asyncio.sleep(0.05)
