"""The tables `camelot run`, `camelotctl status` and `get-plan` print read right (#18): columns
apart, the client's rate and the scheduler's windowed rates each labelled as what it is, the
scheduler's extra queries (readiness probes, refused ones) named, no SM share on the host."""

from __future__ import annotations

from collections import Counter

from protos import admin_pb2, gateway_pb2, plan_pb2
from scheduler.ctl import format_plan, format_status
from services.burst import format_table, scheduler_note


def burst_row(**kw: object) -> dict[str, object]:
    row = {"pipeline": "img-to-text", "queries": 32, "errors": 0, "error_codes": {},
           "p50_ms": 12.5, "p99_ms": 41.25, "qos_p99_ms": 300.0, "qps": 64.0}  # fmt: skip
    return {**row, **kw}


def cells(text: str, first: str) -> list[str]:
    """The whitespace-separated cells of the first line whose leading cells are `first`'s."""
    want = first.split()
    return next(c for c in map(str.split, text.splitlines()) if c[: len(want)] == want)


def test_the_burst_table_keeps_each_column_apart_with_a_verdict_and_the_clients_rate():
    text = format_table([burst_row(), burst_row(pipeline="slow", p99_ms=350.0)], concurrency=4)
    assert "300.0ok" not in text and "300ok" not in text
    head = cells(text, "PIPELINE")
    assert head == ["PIPELINE", "QUERIES", "ERRORS", "P50ms", "P99ms", "QOSms", "VERDICT",
                    "CLIENT", "qps"]  # fmt: skip
    assert cells(text, "img-to-text") == ["img-to-text", "32", "0", "12.50", "41.25", "300",
                                          "met", "64.0"]  # fmt: skip
    assert cells(text, "slow")[6] == "MISSED"
    # what CLIENT qps is: the closed-loop burst's own rate, not a windowed arrival rate
    assert text.splitlines()[0].startswith("client: the burst, 4 queries in flight")


def test_the_burst_table_names_the_errors_the_client_got():
    row = burst_row(errors=32, error_codes={"UNAVAILABLE": 30, "DEADLINE_EXCEEDED": 2},
                    p50_ms=float("nan"), p99_ms=float("nan"))  # fmt: skip
    text = format_table([row], concurrency=4)
    assert cells(text, "img-to-text")[3:7] == ["-", "-", "300", "-"]  # nothing answered: no verdict
    assert "img-to-text errors: DEADLINE_EXCEEDED 2, UNAVAILABLE 30" in text


def test_the_scheduler_note_accounts_for_the_readiness_probes():
    # 32 burst queries: the scheduler's COUNT 33 is the one answered probe, its ERR the refused
    note = scheduler_note(32, Counter({"OK": 1, "UNAVAILABLE": 3}))
    assert "besides the burst's 32 per pipeline" in note
    assert "readiness probes: 1 answered, 3 UNAVAILABLE (sent while the replicas started)" in note
    assert scheduler_note(8, Counter({"OK": 2})).endswith("readiness probes: 2 answered")


def plan(gpu: int) -> plan_pb2.Plan:
    replicas = [plan_pb2.ReplicaPlan(replica_id=f"img.a.{i}", node="n0", gpu=gpu, sm_percent=100.0,
                                     max_batch=4) for i in range(3)]  # fmt: skip
    return plan_pb2.Plan(
        epoch=2, policy="even",
        stages=[plan_pb2.StagePlan(pipeline="img", stage="img.a", replicas=replicas)],
    )  # fmt: skip


def status(gpu: int) -> admin_pb2.StatusResponse:
    stats = [
        admin_pb2.WindowStats(pipeline="img", stage="", count=33, p50_ms=10, p95_ms=20, p99_ms=30,
                              arrival_qps=3.3, service_qps=3.3, qos_p99_ms=300, errors=3,
                              sm_percent=300.0, replicas=3),
        admin_pb2.WindowStats(pipeline="img", stage="img.a", count=33, p50_ms=5, p95_ms=8,
                              p99_ms=9, arrival_qps=3.3, service_qps=3.3, sm_percent=300.0,
                              replicas=3, host_ms=0.25),
    ]  # fmt: skip
    return admin_pb2.StatusResponse(
        plan=plan(gpu), applied_epoch=2, policy="even", window_s=10.0, stats=stats
    )


def test_status_shows_no_sm_share_on_the_host_and_the_share_on_a_gpu():
    host = format_status(status(gpu=-1))
    assert cells(host, "img *")[-2] == "-" and cells(host, "img img.a")[-2] == "-"
    assert "300.0" not in host
    gpu = format_status(status(gpu=0))
    assert cells(gpu, "img *")[-2] == "300.0" and cells(gpu, "img img.a")[-2] == "300.0"


def test_status_shows_each_stages_host_part_and_whether_it_was_measured():
    resp = status(gpu=0)
    assert cells(format_status(resp), "img img.a")[-1] == "(0.25)"  # the setting: none measured
    resp.stats[1].host_ms, resp.stats[1].host_count = 1.234, 80
    text = format_status(resp)
    assert cells(text, "img img.a")[-1] == "1.23" and cells(text, "img *")[-1] == "-"
    assert "HOSTms: the host's part of a batch" in text


def test_status_says_what_its_windowed_columns_count():
    text = format_status(status(gpu=-1))
    row = cells(text, "img *")
    assert row[:8] == ["img", "*", "33", "10.00", "20.00", "30.00", "300", "met"]
    assert row[8:12] == ["3.3", "3.3", "3", "3"]
    assert "COUNT, ERR: every query the gateway reported in the window" in text
    assert "probes too" in text
    flat = " ".join(text.split())
    assert "ARRIVAL/s, SERVICE/s: arrivals and completions per second averaged over the window, " \
           "not a client's rate" in flat  # fmt: skip


def test_get_plan_shows_no_sm_share_for_a_replica_on_the_host():
    host = format_plan(plan(gpu=-1))
    assert cells(host, "img img.a")[3:6] == ["n0", "host", "-"]
    assert cells(format_plan(plan(gpu=0)), "img img.a")[3:6] == ["n0", "0", "100.0"]


def test_camelot_status_shows_no_sm_share_for_a_replica_on_the_host():
    from services.meshclient import format_status as camelot_status

    listing = gateway_pb2.ListPipelinesResponse(
        pipelines=[gateway_pb2.PipelineInfo(name="img", qos_p99_ms=300, stages=["img.a"])]
    )

    def routes(gpu: int) -> plan_pb2.Routes:
        replica = plan_pb2.ReplicaPlan(
            replica_id="img.a.0", node="n0", gpu=gpu, sm_percent=100.0, max_batch=8
        )
        ep = plan_pb2.Endpoint(pipeline="img", stage="img.a", replica=replica,
                               state=plan_pb2.REPLICA_STATE_READY)  # fmt: skip
        return plan_pb2.Routes(epoch=1, endpoints=[ep])

    host = camelot_status(listing, routes(-1))
    assert "host" in host and "100.0%" not in host
    assert "SM 100.0%" in camelot_status(listing, routes(0))
