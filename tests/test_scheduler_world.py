"""What the scheduler knows of the mesh (scheduler.service.world.World), without Redis or gRPC:
nodes from heartbeats, drains, the load and the policy input built from the windows."""

from __future__ import annotations

import time

import grpc
import pytest

from common.errors import CamelotError
from protos import admin_pb2, agent_pb2, plan_pb2, report_pb2
from scheduler.policy import PipelineInfo, StageInfo
from scheduler.service.settings import SchedulerSettings
from scheduler.service.windows import Windows, WindowStat
from scheduler.service.world import World

PIPE = PipelineInfo("p", (StageInfo("a"), StageInfo("b")), qos_p99_ms=100.0)


def make_world(**settings: object) -> World:
    s = SchedulerSettings(**settings)  # type: ignore[arg-type]
    return World(s, [PIPE], {}, Windows(bucket_s=0.25, horizon_s=120.0))


def beat(node: str, agent: str = "127.0.0.1:1", epoch: int = 0) -> admin_pb2.NodeHeartbeat:
    inv = agent_pb2.InventoryResponse(backend="host")
    return admin_pb2.NodeHeartbeat(node=node, agent_address=agent, inventory=inv,
                                   applied_epoch=epoch)  # fmt: skip


def stat(stage: str, arrival_qps: float, count: int = 10) -> WindowStat:
    return WindowStat("p", stage, count, 1.0, 2.0, 3.0, arrival_qps, arrival_qps, 0)


def test_a_heartbeat_adds_a_node_once_and_updates_it_after() -> None:
    w = make_world()
    assert w.heard(beat("n1", epoch=1))
    assert not w.heard(beat("n1", epoch=2))
    assert w.nodes["n1"].applied_epoch == 2


def test_a_heartbeat_without_a_node_name_is_invalid() -> None:
    with pytest.raises(CamelotError) as e:
        make_world().heard(beat(""))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_silent_node_is_not_live_and_a_drained_one_not_placeable() -> None:
    w = make_world(node_timeout_s=15.0)
    for n in ("n1", "n2", "n3"):
        w.heard(beat(n))
    w.nodes["n3"].last_seen = time.monotonic() - 60
    w.drained_nodes.add("n2")
    assert sorted(n.name for n in w.live_nodes()) == ["n1", "n2"]
    assert [n.name for n in w.placeable_nodes()] == ["n1"]
    assert [n.name for n in w.policy_input({}, plan_pb2.Plan()).nodes] == ["n1"]


def test_load_is_the_gateways_record_else_the_first_stages_arrivals() -> None:
    w = make_world()
    assert w.load_qps() == {"p": 0.0}
    w.last_snapshot = {("p", "a"): stat("a", 7.0), ("p", "b"): stat("b", 3.0)}
    assert w.load_qps() == {"p": 7.0}
    w.last_snapshot[("p", "")] = stat("", 9.0)
    assert w.load_qps() == {"p": 9.0}


def _query(end_us: int) -> report_pb2.LatencyReport:
    # a gateway record of a query that took 1 ms and ended at `end_us`
    return report_pb2.LatencyReport(
        kind=report_pb2.REPORT_KIND_QUERY, pipeline="p", end_unix_us=end_us, total_us=1000
    )


def _load(w: World, rates: list[tuple[float, float]]) -> None:
    # queries at rate r for d seconds, in turn; then both snapshots as the loop's tick takes them
    now = [0]
    w.windows.clock_us = lambda: now[0]
    for qps, seconds in rates:
        gap = int(1e6 / qps)
        for _ in range(int(qps * seconds)):
            now[0] += gap
            w.windows.add(_query(now[0]))
    w.last_snapshot = w.windows.snapshot(w.settings.window_s)
    w.recent_snapshot = w.windows.snapshot(w.settings.rise_window_s)


def test_a_step_up_is_the_load_at_once_not_as_the_window_fills() -> None:
    # 10 qps for 20 s, then 50 for 2 s: the 10 s window says ~18, the last 2 s say 50
    w = make_world(window_s=10.0, rise_window_s=2.0)
    _load(w, [(10.0, 20.0), (50.0, 2.0)])
    assert w.last_snapshot[("p", "")].arrival_qps < 25
    assert w.load_qps()["p"] == pytest.approx(50.0, rel=0.2)
    # off: the window's rate, as before
    w.settings = SchedulerSettings(window_s=10.0, rise_window_s=0.0)
    w.recent_snapshot = {}
    assert w.load_qps()["p"] < 25


def test_a_steady_load_and_a_thin_rise_keep_the_windows_rate() -> None:
    w = make_world(window_s=10.0, rise_window_s=2.0)
    _load(w, [(20.0, 20.0)])
    assert w.load_qps()["p"] == pytest.approx(w.last_snapshot[("p", "")].arrival_qps)
    # 1 -> 4 qps is a fourfold rise, but 8 queries in 2 s are too few to plan on
    w = make_world(window_s=10.0, rise_window_s=2.0)
    _load(w, [(1.0, 20.0), (4.0, 2.0)])
    assert w.load_qps()["p"] == pytest.approx(w.last_snapshot[("p", "")].arrival_qps)
    # a fall is never taken from the short window: it waits for the window
    w = make_world(window_s=10.0, rise_window_s=2.0)
    _load(w, [(50.0, 20.0), (5.0, 2.0)])
    assert w.load_qps()["p"] > 30


def test_measured_keys_pipelines_and_their_stages() -> None:
    w = make_world()
    w.last_snapshot = {("p", ""): stat("", 9.0, count=5), ("p", "a"): stat("a", 7.0)}
    m = w.measured(long_window=False)
    assert m["p"].count == 5 and m["p"].arrival_qps == 9.0
    assert m["p/a"].arrival_qps == 7.0


def test_an_operators_qos_overrides_the_configs() -> None:
    w = make_world()
    assert w.qos_of("p") == 100.0
    w.qos["p"] = 40.0
    assert w.qos_of("p") == 40.0
    assert w.policy_input({}, plan_pb2.Plan()).pipelines[0].qos_p99_ms == 40.0


def test_the_gateways_price_is_an_option_only_when_measured_and_never_over_the_policys() -> None:
    assert "gateway_cpu_ms" not in make_world().options()
    w = make_world(gateway_cpu_ms=1.5, gateway_workers=3)
    assert w.options() == {"gateway_cpu_ms": "1.5", "gateway_workers": "3"}
    assert w.options({"gateway_workers": "1"})["gateway_workers"] == "1"


def test_the_current_plan_is_in_the_input_only_once_there_is_one() -> None:
    w = make_world()
    assert w.policy_input({}, plan_pb2.Plan()).current is None
    plan = plan_pb2.Plan(epoch=3, policy="even")
    plan.stages.add(pipeline="p", stage="a").replicas.add(replica_id="r", node="n1", gpu=-1)
    current = w.policy_input({}, plan).current
    assert current is not None and current.stages[0].replicas[0].replica_id == "r"


def test_the_long_window_a_shrink_reads_is_the_long_window_s_setting() -> None:
    now_us = 1_000_000_000_000
    clock = [now_us]

    def world(long_window_s: float) -> World:
        s = SchedulerSettings(window_s=10.0, long_window_s=long_window_s)
        w = World(s, [PIPE], {}, Windows(bucket_s=0.25, horizon_s=200.0, clock_us=lambda: clock[0]))
        # one query a second for the last 100 s, as the gateway reports them
        for t in range(100):
            end = now_us - t * 1_000_000
            w.windows.add(report_pb2.LatencyReport(
                kind=report_pb2.REPORT_KIND_QUERY, pipeline="p", end_unix_us=end, total_us=1000
            ))  # fmt: skip
        w.last_snapshot = w.windows.snapshot(s.window_s)
        return w

    # a steady load reads the same over any long window
    for span in (30.0, 90.0):
        assert world(span).measured()["p"].arrival_qps == pytest.approx(1.0, rel=0.05)

    # a load that doubled in the last 20 s: the long window sees less of the rise the longer it is
    def rising(long_window_s: float) -> float:
        w = world(long_window_s)
        for t in range(20):
            w.windows.add(report_pb2.LatencyReport(
                kind=report_pb2.REPORT_KIND_QUERY, pipeline="p",
                end_unix_us=now_us - t * 1_000_000 - 500_000, total_us=1000,
            ))  # fmt: skip
        w.last_snapshot = w.windows.snapshot(10.0)
        return w.measured()["p"].arrival_qps

    assert rising(30.0) == pytest.approx(1 + 20 / 30, rel=0.05)
    assert rising(90.0) == pytest.approx(1 + 20 / 90, rel=0.05)


def test_a_load_moves_only_past_the_band_and_past_the_noise_of_the_windows_count() -> None:
    from scheduler.service.decisions import beyond_band

    # at 12 qps over a 5 s window: the 25% band (3 qps) and 2 sigmas (3.1 qps) agree
    assert not beyond_band(12.0, 14.9, 0.25, 1.0, 5.0, 2.0)
    assert beyond_band(12.0, 96.0, 0.25, 1.0, 5.0, 2.0)
    assert beyond_band(96.0, 12.0, 0.25, 1.0, 5.0, 2.0)
    # at 1 qps a 25% band is Poisson noise (a sigma over 5 s is 0.45 qps): 1 -> 1.8 is not a move
    assert beyond_band(1.0, 1.8, 0.25, 1.0)  # the band alone
    assert not beyond_band(1.0, 1.8, 0.25, 1.0, 5.0, 2.0)
    assert beyond_band(1.0, 2.0, 0.25, 1.0, 5.0, 2.0)
    # below the floor nothing moves; from nothing, the floor sets the noise
    assert not beyond_band(0.2, 0.8, 0.25, 1.0, 5.0, 2.0)
    assert beyond_band(0.0, 2.0, 0.25, 1.0, 5.0, 2.0)
    # a long window's count is precise: the band decides
    assert beyond_band(100.0, 126.0, 0.25, 1.0, 600.0, 2.0)
