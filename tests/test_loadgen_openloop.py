"""The open-loop generator against a real (fake-latency) gateway on port 0."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import numpy as np
import pytest

from common.errors import InvalidArgument, NotFound
from loadgen import traces
from loadgen.inputs import parse_mix
from loadgen.openloop import build_parser, run_open_loop, schedule_from_args
from tests.test_loadgen_gateway import limit, serve_fake


async def test_queueing_shows_in_latency_from_intended_send():
    # One request at a time, 20 ms each, offered at 100/s: the backlog grows by ~half the rate.
    async with serve_fake() as gw:
        gw.state.sleep_s = 0.02
        limit(gw.state, 1)
        schedule = traces.schedule(
            traces.constant(100.0, 0.5), np.random.default_rng(0), traces.Arrivals.UNIFORM
        )
        result = await run_open_loop(gw.target, schedule, parse_mix("img-to-text"), seed=1)
    stats = result.stats()
    assert stats["all"]["count"] == 50 == stats["all"]["ok"]
    assert gw.state.received["img-to-text"] == 50
    # 50 queued requests of 20 ms: the last ones wait for most of the others.
    assert stats["all"]["p99_ms"] > 10 * 20
    latencies = [r.latency_us for r in result.records]
    assert np.mean(latencies[-10:]) > 3 * np.mean(latencies[:10])
    for r in result.records:
        assert r.intended_us <= r.sent_us <= r.done_us and r.latency_us >= r.done_us - r.sent_us


async def test_client_lag_counts_in_latency():
    # The event loop is blocked for 300 ms mid-run: requests due meanwhile leave late, and the
    # lateness is part of their latency (a client timing from the actual send would hide it).
    async with serve_fake() as gw:
        schedule = traces.schedule(
            traces.constant(100.0, 0.6), np.random.default_rng(0), traces.Arrivals.UNIFORM
        )

        async def block() -> None:
            await asyncio.sleep(0.15)
            time.sleep(0.3)  # noqa: ASYNC251 (the point: a stalled client)

        blocker = asyncio.create_task(block())
        result = await run_open_loop(gw.target, schedule, parse_mix("img-to-text"))
        await blocker
    lags = [r.sent_us - r.intended_us for r in result.records]
    late = result.records[int(np.argmax(lags))]
    assert max(lags) > 150_000
    assert late.latency_us >= late.sent_us - late.intended_us + (late.done_us - late.sent_us)
    assert result.stats()["all"]["p99_ms"] > 150


async def test_mix_errors_and_status_codes():
    async with serve_fake() as gw:
        gw.state.fail["bad-pipe"] = grpc.StatusCode.RESOURCE_EXHAUSTED
        schedule = traces.poisson(200.0, 0.5, np.random.default_rng(2))
        mix = parse_mix("img-to-text=3,speech-to-text=1,bad-pipe=1")
        result = await run_open_loop(gw.target, schedule, mix, seed=5)
        with pytest.raises(NotFound):
            await run_open_loop(gw.target, [0.0], parse_mix("no-such-pipeline"))
    stats = result.stats()
    assert stats["all"]["count"] == len(schedule)
    assert stats["bad-pipe"]["errors"] == stats["bad-pipe"]["count"] > 0
    assert stats["bad-pipe"]["error_codes"] == {"RESOURCE_EXHAUSTED": stats["bad-pipe"]["count"]}
    assert stats["img-to-text"]["errors"] == 0 == stats["speech-to-text"]["errors"]
    assert stats["img-to-text"]["count"] > stats["speech-to-text"]["count"]
    # Every input matched its pipeline's spec (the gateway refuses others), and all were counted.
    assert sum(gw.state.received.values()) == len(schedule)
    assert stats["bad-pipe"]["p99_ms"] is None
    windows = result.windows(0.1)
    assert sum(w["count"] for w in windows) == len(schedule)


async def test_cli_writes_stats_and_records(tmp_path):
    out = tmp_path / "run.json"
    async with serve_fake() as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadgen.openloop", "--target", gw.target, "--rate", "40",
            "--duration", "0.5", "--arrivals", "uniform", "--mix", "img-to-text=1,speech-to-text=1",
            "--transport", "wire", "--out", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    doc = json.loads(out.read_text())
    assert doc["stats"]["all"]["count"] == 20 == len(doc["records"])
    assert set(doc["stats"]) == {"all", "img-to-text", "speech-to-text"}
    assert {"p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"} <= set(doc["stats"]["all"])
    assert doc["record_fields"][4] == "latency_us" and doc["records"][0][5] == "OK"
    assert json.loads(stdout)["all"]["count"] == 20
    assert set(gw.state.transports) == {2}  # TRANSPORT_WIRE


def test_cli_schedules_from_rate_trace_file_and_diurnal(tmp_path):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([[0, 10.0], [4, 10.0], [4, 30.0], [6, 30.0]]))
    rng = np.random.default_rng(0)

    def sched(*argv):
        args = build_parser().parse_args(["--target", "x:1", "--arrivals", "uniform", *argv])
        return schedule_from_args(args, rng)

    arrivals, duration = sched("--trace", str(trace))
    assert duration == 6 and len(arrivals) == 100  # 4 s at 10/s, then 2 s at 30/s
    arrivals, duration = sched("--rate", "20", "--duration", "3")
    assert duration == 3 and len(arrivals) == 60
    arrivals, duration = sched("--diurnal", "2,20")
    assert duration == 10 and 20 < len(arrivals) < 200


async def test_several_processes_send_one_schedule_on_one_timeline():
    schedule = traces.schedule(
        traces.constant(200.0, 1.0), np.random.default_rng(0), traces.Arrivals.UNIFORM
    )
    mix = parse_mix("img-to-text=1,speech-to-text=1")
    async with serve_fake() as gw:
        gw.state.sleep_s = 0.002
        one = await run_open_loop(gw.target, schedule, mix, seed=3)
        peers_one = set(gw.state.peers)
        gw.state.peers.clear()

        async def block() -> None:
            await asyncio.sleep(0.3)
            time.sleep(0.3)  # noqa: ASYNC251 (the parent stalls; its senders must not)

        blocker = asyncio.create_task(block())
        split = await run_open_loop(gw.target, schedule, mix, seed=3, processes=3, connections=6)
        await blocker
    assert len(split.records) == len(schedule) == split.stats()["all"]["ok"]
    assert gw.state.received.total() == 2 * len(schedule)
    # the same arrivals, pipelines and timeline as one process sends
    assert [r.intended_us - split.t0_us for r in split.records] == [
        r.intended_us - one.t0_us for r in one.records
    ]
    assert [r.pipeline for r in split.records] == [r.pipeline for r in one.records]
    # two connections in each of three processes
    assert len(peers_one) == 1 and len(gw.state.peers) == 6
    # the parent was stalled for 300 ms mid-run; the processes sent on time all the same
    assert max(r.sent_us - r.intended_us for r in split.records) < 100_000


async def test_a_sending_process_that_fails_says_why():
    from protos import gateway_pb2, tensor_pb2

    bad = gateway_pb2.PipelineInfo(
        name="img-to-text", input=tensor_pb2.TensorSpec(name="image", shape=[3])
    )  # no dtype: no input can be made for it
    async with serve_fake() as gw:
        with pytest.raises(RuntimeError, match="sending process 0 failed"):
            await run_open_loop(
                gw.target, [0.0, 0.1], parse_mix("img-to-text"), pipelines={"img-to-text": bad},
                processes=2,
            )  # fmt: skip


@pytest.mark.parametrize("slow_part", ["make_inputs", "channel"])
async def test_inputs_and_connections_are_made_before_the_timeline_starts(monkeypatch, slow_part):
    # full-size inputs and many connections take a while to make; the first arrivals must not
    # pay for them as lag
    from loadgen import openloop

    if slow_part == "make_inputs":
        real = openloop.make_inputs

        def slow(*args, **kwargs):
            time.sleep(0.3)
            return real(*args, **kwargs)

        monkeypatch.setattr(openloop, "make_inputs", slow)
    else:
        real_channel = grpc.aio.insecure_channel

        def slow_channel(*args, **kwargs):
            time.sleep(0.1)
            return real_channel(*args, **kwargs)

        monkeypatch.setattr(grpc.aio, "insecure_channel", slow_channel)
    async with serve_fake() as gw:
        result = await run_open_loop(
            gw.target, [0.0, 0.01, 0.02], parse_mix("img-to-text"), connections=3
        )
    assert max(r.sent_us - r.intended_us for r in result.records) < 100_000


def test_requests_go_out_on_the_connection_with_the_fewest_in_flight_ties_in_turn():
    from loadgen.sending import LeastOutstanding

    spread = LeastOutstanding(3)
    assert [spread.acquire() for _ in range(3)] == [0, 1, 2]  # all idle: in turn
    spread.release(1)  # connection 1's answer came back; 0 and 2 are still waiting
    assert spread.acquire() == 1
    for k in (0, 1, 2):
        spread.release(k)
    spread.acquire()  # 1 (its turn), now busy; of the idle two the next in turn goes
    assert spread.acquire() == 2 and spread.in_flight == [0, 1, 1]
    with pytest.raises(InvalidArgument):
        LeastOutstanding(0)


async def test_every_connection_of_every_process_carries_queries():
    """4 processes of 16 connections on the H100 sent each query on connection `i % 16` of the
    every-4th `i` they had: 16 of the 64 connections carried every query."""
    schedule = traces.schedule(
        traces.constant(200.0, 1.0), np.random.default_rng(0), traces.Arrivals.UNIFORM
    )
    async with serve_fake() as gw:
        gw.state.sleep_s = 0.001
        res = await run_open_loop(
            gw.target, schedule, parse_mix("img-to-text"), seed=3, processes=2, connections=8
        )
    assert res.stats()["all"]["ok"] == len(schedule)
    assert len(gw.state.peers) == 8
