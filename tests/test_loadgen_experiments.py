"""The experiment harness and the e2e bench, end to end against the fake gateway and Admin API.

The fake's latency jumps above the QoS once a trial brings it more queries than the policy holds
(a per-policy peak rate over the trial's fixed length), so the peak search has a known answer to
find. Which queries are slow is decided by their place in their run, never by when they arrive,
and the QoS (2 s) is far above a loaded machine's delays: the verdicts asserted here hold on a
busy 2-core host (tests.test_loadgen_gateway says how).
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from common.errors import Unauthenticated
from loadgen import bench_e2e, traces
from loadgen.experiments import __main__ as experiments
from loadgen.experiments.admin import AdminClient
from tests.test_loadgen_gateway import TOKEN, serve_fake

PNG = b"\x89PNG\r\n\x1a\n"


async def run_experiment(argv: list[str]) -> dict:
    args = experiments.build_parser().parse_args(argv)
    json_path, md_path = await experiments.run(args, argv)
    doc = json.loads(json_path.read_text())
    assert md_path.read_text().startswith(f"# {doc['name']}")
    for plot in Path(json_path).parent.glob("*.png"):
        assert plot.read_bytes().startswith(PNG)
    return doc


TRIAL_S = 0.8
FAST = ["--trial-s", str(TRIAL_S), "--warmup-s", "0.3", "--gap-s", "0.4", "--arrivals", "uniform",
        "--prime-s", "0"]  # fmt: skip


def capacity(peak_qps: float, trial_s: float = TRIAL_S) -> int:
    """The fake's run capacity that makes `peak_qps` the highest rate a trial holds."""
    return round(peak_qps * trial_s)


@pytest.mark.slow
async def test_peak_load_finds_each_policys_peak_through_admin(tmp_path):
    async with serve_fake() as gw:
        st = gw.state
        st.sleep_s = 0.002
        st.run_capacity = {"max-load": capacity(70.0), "even": capacity(35.0)}
        st.policy_sm = {"max-load": [50.0, 50.0], "even": [100.0]}
        st.apply_polls = 3  # each plan takes the agents a few polls to apply
        doc = await run_experiment(
            ["peak-load", "--target", gw.target, "--admin", gw.target, "--token", TOKEN,
             "--mix", "vision:img-to-text", "--policies", "max-load,nope,even", "--start-qps", "10",
             "--rel-tol", "0.3", "--out-dir", str(tmp_path), *FAST]
        )  # fmt: skip
        epoch = st.epoch
    s = doc["summary"]
    # Doubling from 10 then bisecting to 30%: 60 for max-load (70), 30 for even (35).
    assert 40 <= s["vision.max-load_qps"] <= 70
    assert 20 <= s["vision.even_qps"] <= 35
    assert s["vision.camelot_over_best_baseline"] == pytest.approx(
        s["vision.max-load_qps"] / s["vision.even_qps"]
    )
    # each peak comes with its bracket, and the ratio with the range the brackets allow
    assert s["vision.max-load_qps"] <= 70 < s["vision.max-load_first_miss_qps"]
    assert s["vision.even_qps"] <= 35 < s["vision.even_first_miss_qps"]
    lo, hi = s["vision.camelot_over_best_baseline_range"]
    assert lo <= s["vision.camelot_over_best_baseline"] <= hi
    assert lo <= 70 / 35 <= hi
    assert epoch == 3  # two SetPolicy calls took effect
    # no query (probe, priming or trial) went out while a plan was being applied
    assert gw.state.submits_while_applying == 0
    # a policy the scheduler refuses loses its own rows, never the others'
    assert s["vision.nope_error"].startswith("INVALID_ARGUMENT")
    rows = doc["rows"]
    assert {r["policy"] for r in rows} == {"max-load", "even"}
    assert {r["epoch"] for r in rows if r["policy"] == "even"} == {3}
    assert all(r["met"] == (r["worst_p99_over_qos"] <= 1) for r in rows)
    assert any(not r["met"] for r in rows) and all(r["errors"] == 0 for r in rows)
    assert (tmp_path / "peak-load-vision.png").exists()
    # the result keeps what each policy ran: its plan's replicas and their shares
    ran = {p["set_as"]: p for p in doc["plans"]}
    assert set(ran) == {"max-load", "even"}
    assert ran["max-load"]["sm_percent"] == 100.0 and ran["even"]["epoch"] == 3
    assert [x["sm_percent"] for x in ran["max-load"]["stages"]] == [[50.0, 50.0]]
    assert [x["sm_percent"] for x in ran["even"]["stages"]] == [[100.0]]
    assert TOKEN not in json.dumps(doc) and TOKEN not in (tmp_path / "peak-load.md").read_text()
    # the rows so far, written after each policy, are gone once the whole result is written
    assert not (tmp_path / "peak-load-partial.json").exists()


async def test_a_run_cut_short_leaves_every_finished_policys_rows(tmp_path):
    import asyncio

    async with serve_fake() as gw:
        st = gw.state
        st.sleep_s = 0.002
        st.run_capacity = {"max-load": capacity(70.0), "even": capacity(35.0)}
        st.policy_sm = {"max-load": [50.0], "even": [100.0]}
        argv = ["peak-load", "--target", gw.target, "--admin", gw.target, "--token", TOKEN,
                "--mix", "vision:img-to-text", "--policies", "max-load,even", "--start-qps", "10",
                "--rel-tol", "0.3", "--out-dir", str(tmp_path), *FAST]  # fmt: skip
        args = experiments.build_parser().parse_args(argv)
        run = asyncio.create_task(experiments.run(args, argv))
        partial = tmp_path / "peak-load-partial.json"
        # cut it (as a lent GPU's time limit does) once max-load's search is written
        for _ in range(6000):
            if partial.exists() or run.done():
                break
            await asyncio.sleep(0.02)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    doc = json.loads(partial.read_text())
    assert doc["partial"] is True and TOKEN not in json.dumps(doc)
    assert {r["policy"] for r in doc["rows"]} == {"max-load"}
    assert 40 <= doc["summary"]["vision.max-load_qps"] <= 70
    assert [p["policy"] for p in doc["peaks"]] == ["max-load"]
    assert not (tmp_path / "peak-load.json").exists()


@pytest.mark.slow
async def test_low_load_integrates_sm_share_and_compares_to_the_best_baseline(tmp_path):
    async with serve_fake() as gw:
        gw.state.sleep_s = 0.002
        gw.state.policy_sm = {
            "min-resource": [30.0], "even": [50.0, 50.0], "exclusive": [100.0],
            "even:share=20": [20.0],
        }  # fmt: skip
        doc = await run_experiment(
            ["low-load", "--target", gw.target, "--admin", gw.target, "--token", TOKEN,
             "--mix", "img-to-text=1,speech-to-text=1", "--rate", "8",
             "--policies", "min-resource,even", "--sample-s", "0.2", "--out-dir", str(tmp_path),
             "--references", "even:share=20", *FAST, "--prime-s", "1.0"]
        )  # fmt: skip
        received = sum(gw.state.received.values())
    # each policy change is followed by 1 s of load at 8 qps that no row counts
    assert received - sum(r["count"] for r in doc["rows"]) >= 3 * 8
    s = doc["summary"]
    label = "img-to-text+speech-to-text"
    # Per pipeline: min-resource 30% against even's 100%, both for the whole trial.
    assert s[f"{label}.min-resource_sm_gpu_s"] == pytest.approx(2 * 0.30 * 0.8)
    assert s[f"{label}.even_sm_gpu_s"] == pytest.approx(2 * 1.0 * 0.8)
    # a reference is measured with its options but is no baseline: cheaper, and not counted
    assert s[f"{label}.even:share=20_sm_gpu_s"] == pytest.approx(2 * 0.20 * 0.8)
    assert s[f"{label}.saving_vs_best_baseline"] == pytest.approx(0.7)
    assert s[f"{label}.qos_met"] is True
    by_policy = {r["policy"]: r for r in doc["rows"]}
    assert by_policy["even"]["gpus"] == 2 and by_policy["min-resource"]["gpus"] == 1
    assert by_policy["min-resource"]["sm_percent_mean"] == pytest.approx(60.0)
    assert (tmp_path / "low-load-img-to-text_speech-to-text-sm.png").exists()
    assert (tmp_path / "low-load-img-to-text_speech-to-text-cdf.png").exists()


@pytest.mark.slow
async def test_diurnal_without_admin_windows_the_day(tmp_path):
    async with serve_fake() as gw:
        gw.state.sleep_s = 0.002
        doc = await run_experiment(
            ["diurnal", "--no-admin", "--target", gw.target, "--mix", "img-to-text",
             "--min-qps", "5", "--max-qps", "40", "--duration-s", "3", "--window-s", "1",
             "--out-dir", str(tmp_path), "--arrivals", "uniform", "--gap-s", "0",
             "--warmup-s", "0"]
        )  # fmt: skip
        received = gw.state.received["img-to-text"]
    rows = doc["rows"]
    assert [r["t_s"] for r in rows] == [0, 1, 2]
    assert sum(r["count"] for r in rows) == doc["summary"]["requests"] == received
    # The compressed day: a quiet first third (night), a busier last third (afternoon).
    assert rows[0]["count"] < rows[2]["count"]
    assert doc["summary"]["policy"] == "current" and doc["summary"]["sm_gpu_s"] is None
    assert doc["summary"]["qos_met"] is True
    assert len(doc["trace"]) > 10
    assert (tmp_path / "diurnal-current.png").exists()


async def test_admin_client_sends_the_bearer_token():
    async with serve_fake() as gw:
        gw.state.policy_sm = {"even": [100.0]}
        async with AdminClient(gw.target, "wrong") as admin:
            with pytest.raises(Unauthenticated):
                await admin.get_plan()
        async with AdminClient(gw.target, TOKEN) as admin:
            plan = await admin.set_policy("even")
            assert plan.policy == "even" and plan.epoch == 2
            assert (await admin.wait_for_epoch(2, timeout_s=1)).epoch == 2
            with pytest.raises(Exception) as info:
                await admin.wait_for_epoch(5, timeout_s=0.3, poll_s=0.05)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_bench_e2e_writes_ref_and_wire_side_by_side(tmp_path):
    async with serve_fake() as gw:
        gw.state.sleep_s = 0.002
        argv = ["--target", gw.target, "--pipelines", "img-to-text,speech-to-text", "--rate", "20",
                "--duration", "0.5", "--warmup-s", "0", "--out-dir", str(tmp_path)]  # fmt: skip
        json_path, md_path = await bench_e2e.run(bench_e2e.build_parser().parse_args(argv), argv)
        transports = dict(gw.state.transports)
    doc = json.loads(json_path.read_text())
    assert doc["name"] == "e2e" and doc["command"].startswith("python -m loadgen.bench_e2e")
    assert [(r["pipeline"], r["transport"]) for r in doc["rows"]] == [
        ("img-to-text", "ref"), ("img-to-text", "wire"),
        ("speech-to-text", "ref"), ("speech-to-text", "wire"),
    ]  # fmt: skip
    assert all(r["count"] > 0 and r["errors"] == 0 for r in doc["rows"])
    for code, name in ((1, "ref"), (2, "wire")):
        assert transports[code] == sum(r["count"] for r in doc["rows"] if r["transport"] == name)
    assert set(doc["summary"]) == {
        "img-to-text.wire_over_ref_p50",
        "speech-to-text.wire_over_ref_p50",
    }
    assert all(v > 0 for v in doc["summary"].values())
    # where the time went, from the gateway's answers: 2 ms, of which the stage round trip is
    # 1.6 ms, with 0.2 ms batch wait and 1 ms compute inside the replica
    for r in doc["rows"]:
        assert r["gateway_ms"] == pytest.approx(0.4, abs=0.002)
        assert r["hops_ms"] == pytest.approx(0.4, abs=0.002)
        assert r["waiting_ms"] == pytest.approx(0.2, abs=0.002)
        assert r["compute_ms"] == pytest.approx(1.0, abs=0.002)
        assert r["client_ms"] > 0
        assert r["p50_ms"] >= r["gateway_ms"] + r["hops_ms"] + r["waiting_ms"] + r["compute_ms"]
    assert "| pipeline | transport | p50_ms | p99_ms | count | errors | client_ms |" in (
        md_path.read_text()
    )


def test_policy_specs_carry_options_and_bad_ones_are_refused():
    from common.errors import InvalidArgument
    from loadgen.experiments.admin import parse_policy

    assert parse_policy("max-load") == ("max-load", {})
    assert parse_policy("exclusive:sharing=mps:tolerance=0.05") == (
        "exclusive",
        {"sharing": "mps", "tolerance": "0.05"},
    )
    for bad in ("exclusive:sharing", ":a=b", "even:=3", "even:a="):
        with pytest.raises(InvalidArgument):
            parse_policy(bad)


async def test_a_replan_between_trials_is_applied_and_primed_before_the_next_trial():
    from loadgen.experiments.harness import Harness
    from loadgen.inputs import parse_mix

    async with serve_fake() as gw:
        st = gw.state
        st.sleep_s, st.policy_sm = 0.001, {"max-load": [50.0]}
        async with AdminClient(gw.target, TOKEN) as admin:
            h = Harness(gw.target, admin, trial_s=0.5, warmup_s=0.0, gap_s=0.0, prime_s=0.5)
            await h.connect()
            mix = parse_mix("img-to-text")
            await h.apply_policy("max-load", mix)
            sent = sum(st.received.values())
            await h.settle(mix, 20.0)  # nothing changed: no wait, no priming
            assert sum(st.received.values()) == sent and h.replans == 0
            # the policy re-plans (its p99 neared a target at the last rate); agents take a while
            st.epoch += 1
            st.apply_polls = st.unapplied = 3
            await h.settle(mix, 20.0)
            assert st.unapplied == 0 and st.submits_while_applying == 0
            assert h.replans == 1 and h.epoch == st.epoch
            assert sum(st.received.values()) - sent >= 5  # primed at 20 qps for 0.5 s


async def test_a_plan_that_changes_again_while_it_is_primed_is_waited_for_before_the_trial():
    """On the H100 max-load re-planned while its last plan was primed at 900 qps, and the trial
    ran while that newer plan's replicas were replaced (p99 800 ms; 66 ms on the plan at rest)."""
    from loadgen.experiments.harness import SETTLE_ROUNDS, Harness
    from loadgen.inputs import parse_mix

    class Replanning(Harness):
        bumps = 0

        async def prime(self, mix, rate_qps):
            await super().prime(mix, rate_qps)
            if self.bumps < self.limit:  # the priming load makes the policy re-plan again
                self.bumps += 1
                st.epoch += 1
                st.apply_polls = st.unapplied = 2

    async with serve_fake() as gw:
        st = gw.state
        st.sleep_s, st.policy_sm = 0.001, {"max-load": [50.0]}
        async with AdminClient(gw.target, TOKEN) as admin:
            h = Replanning(gw.target, admin, trial_s=0.5, warmup_s=0.0, gap_s=0.0, prime_s=0.2)
            h.limit = 1
            await h.connect()
            mix = parse_mix("img-to-text")
            await h.apply_policy("max-load", mix)
            st.epoch += 1
            await h.settle(mix, 20.0)
            # the plan primed first and the one that replaced it while primed: both waited for
            assert h.replans == 2 and h.epoch == st.epoch and st.unapplied == 0
            assert [p["set_as"] for p in h.plans[-2:]] == ["re-plan", "re-plan"]
            # a policy that never stops re-planning holds the trial back only so long
            h.limit, h.bumps = 99, 0
            st.epoch += 1
            replans = h.replans
            await h.settle(mix, 20.0)
            assert h.replans - replans == SETTLE_ROUNDS and h.epoch < st.epoch


async def test_a_plan_the_agents_never_apply_is_marked_so_in_the_plans_and_the_summary():
    """On the H100 the agents never applied max-load's plan (its new replicas could not start)
    and the experiment went on after its settle time, as it should, but its result did not say
    that max-load's trials ran on the previous policy's replicas in part."""
    from loadgen.experiments.harness import Harness
    from loadgen.inputs import parse_mix

    async with serve_fake() as gw:
        st = gw.state
        st.sleep_s, st.policy_sm = 0.001, {"even": [50.0], "max-load": [30.0]}
        async with AdminClient(gw.target, TOKEN) as admin:
            h = Harness(gw.target, admin, trial_s=0.5, warmup_s=0.0, gap_s=0.0, prime_s=0.5,
                        settle_s=0.5)  # fmt: skip
            await h.connect()
            mix = parse_mix("img-to-text")
            summary: dict = {}
            assert await h.try_apply("even", mix, summary, "m") is not None
            assert h.plans[-1]["applied"] is True and summary == {}
            st.apply_polls = 10**9  # the agents never get there
            assert await h.try_apply("max-load", mix, summary, "m") is not None
            assert h.plans[-1]["set_as"] == "max-load" and h.plans[-1]["applied"] is False
            assert summary == {"m.max-load_applied": False}


async def test_a_missed_trial_is_confirmed_on_its_requests_pooled():
    from loadgen.experiments.harness import Harness
    from loadgen.inputs import parse_mix

    async with serve_fake() as gw:
        st = gw.state
        st.sleep_s = 0.001
        st.run_capacity = {"initial": capacity(150.0, trial_s=1.0)}
        mix = parse_mix("img-to-text")
        # 100 requests a run: one slow request is its p99 alone, not the p99 of 200
        plain = Harness(gw.target, None, trial_s=1.0, warmup_s=0.0, gap_s=0.4,
                        arrivals=traces.Arrivals.UNIFORM)  # fmt: skip
        confirmed = Harness(gw.target, None, trial_s=1.0, warmup_s=0.0, gap_s=0.4,
                            arrivals=traces.Arrivals.UNIFORM, confirm_misses=1)  # fmt: skip
        for h in (plain, confirmed):
            await h.connect()
        st.spikes = 1
        one, _ = await plain.trial(mix, 100.0)
        assert not one.met and one.detail["runs"] == 1
        # the one slow query is named, and where its time went (the fake: half of it compute)
        assert one.detail["over_qos"] == 1
        assert one.detail["tail.compute_ms"] == pytest.approx(st.slow_s * 1000 / 2, rel=0.05)
        assert one.detail["typical.compute_ms"] < 5.0
        # and per stage: the slow one ran alone, the rest in fours
        only = one.detail["stages"]["img-to-text/only"]
        assert only["tail.queries"] == 1 and only["tail.batch"] == 1
        assert only["queries"] >= 99 and 3.9 < only["batch"] < 4.0
        st.spikes = 1
        two, _ = await confirmed.trial(mix, 100.0)
        assert two.met and two.detail["runs"] == 2 and two.stats["all"]["count"] >= 190
        # a real overload misses again and stays a miss
        over, _ = await confirmed.trial(mix, 250.0)
        assert not over.met and over.detail["runs"] == 2
        assert over.bound == ""  # the server's miss: the client kept its timeline


async def test_a_miss_the_load_generator_caused_gives_no_verdict_on_the_server():
    import asyncio
    import time

    from loadgen.experiments.harness import Harness
    from loadgen.experiments.search import CLIENT
    from loadgen.inputs import parse_mix

    async with serve_fake() as gw:
        gw.state.sleep_s = 0.001
        gw.state.qos_p99_ms = 400.0
        h = Harness(gw.target, None, trial_s=1.5, warmup_s=0.0, gap_s=0.0,
                    arrivals=traces.Arrivals.UNIFORM, max_lag_frac=0.25)  # fmt: skip
        await h.connect()
        mix = parse_mix("img-to-text")
        fine, _ = await h.trial(mix, 60.0)
        assert fine.met and fine.bound == "" and fine.detail["lag_p99_ms"] < 100.0
        # the sending process stalls for a second mid-trial (as one serialising megabyte inputs
        # past its rate does): the queries due meanwhile leave up to a second late, and their
        # latency, which counts from the intended send, misses the 400 ms target
        asyncio.get_running_loop().call_later(0.5, time.sleep, 1.0)
        stalled, _ = await h.trial(mix, 60.0)
        assert not stalled.met and stalled.bound == CLIENT
        assert stalled.detail["lag_p99_ms"] > 500.0
        # the same stall while the server is past its capacity too: counted from the actual
        # sends the targets are still missed, so the miss is the server's
        gw.state.slow_s = 0.6
        gw.state.run_capacity = {"initial": 30}
        asyncio.get_running_loop().call_later(0.5, time.sleep, 1.0)
        both, _ = await h.trial(mix, 60.0)
        assert not both.met and both.bound == ""
        assert both.detail["lag_p99_ms"] > 500.0


async def test_min_queries_lengthens_a_low_rate_trial_for_the_rarest_pipeline():
    from loadgen.experiments.harness import Harness
    from loadgen.inputs import parse_mix

    async with serve_fake() as gw:
        gw.state.sleep_s = 0.001
        h = Harness(gw.target, None, trial_s=0.5, warmup_s=0.0, gap_s=0.0,
                    arrivals=traces.Arrivals.UNIFORM, min_queries=20)  # fmt: skip
        await h.connect()
        mix = parse_mix("img-to-text=3,speech-to-text=1")
        # speech-to-text gets a quarter of 40 qps: 20 queries need 2 s, not 0.5
        assert h.trial_length_s(mix, 40.0) == pytest.approx(2.0)
        assert h.trial_length_s(mix, 400.0) == 0.5  # enough queries in the plain length
        trial, result = await h.trial(mix, 40.0)
        assert trial.detail["trial_s"] == pytest.approx(2.0)
        assert trial.stats["speech-to-text"]["count"] >= 15
        assert trial.detail["min_pipeline_count"] == trial.stats["speech-to-text"]["ok"]


@pytest.mark.parametrize(
    "bad",
    [{"min_queries": -1}, {"confirm_misses": -2}, {"connections": 0}, {"trial_s": 0.0},
     {"warmup_s": 2.0}, {"max_lag_frac": 0.0}],
)  # fmt: skip
def test_harness_refuses_settings_that_cannot_make_a_trial(bad):
    from common.errors import InvalidArgument
    from loadgen.experiments.harness import Harness

    with pytest.raises(InvalidArgument):
        Harness("127.0.0.1:1", None, **{"trial_s": 1.0, **bad})


async def samples_reach(sampler, n: int, timeout_s: float = 60.0) -> None:
    """Waits until the sampler holds n samples (polled: it has no event to wait on)."""
    import asyncio

    for _ in range(int(timeout_s / 0.01)):
        if len(sampler.samples) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(sampler.samples)} samples after {timeout_s} s, wanted {n}")


async def test_the_share_sampler_keeps_each_plan_it_sees():

    from loadgen.experiments.harness import ShareSampler
    from loadgen.inputs import parse_mix

    async with serve_fake() as gw:
        st = gw.state
        st.policy_sm = {"initial": [30.0], "later": [20.0, 20.0]}
        async with AdminClient(gw.target, TOKEN) as admin:
            async with ShareSampler(admin, 0.05, parse_mix("img-to-text")) as sampler:
                # sample counts, not sleeps: a loaded host may take any time to sample
                await samples_reach(sampler, 2)
                st.policy, st.epoch = "later", st.epoch + 1  # the policy re-plans mid-run
                await samples_reach(sampler, len(sampler.samples) + 2)
    assert [p["epoch"] for p in sampler.plans] == [1, 2]
    assert [p["sm_percent"] for p in sampler.plans] == [30.0, 40.0]
    assert sampler.plans[1]["stages"][0]["sm_percent"] == [20.0, 20.0]
    assert sampler.plans[1]["t_s"] > sampler.plans[0]["t_s"]


def test_a_result_keeps_the_environment_its_plans_were_priced_with():
    from loadgen.experiments.__main__ import planning_env

    env = {"CAMELOT_STAGE_HOST_MS": "0.97", "CAMELOT_GATEWAY_CPU_MS": "3.0", "HOME": "/root",
           "CAMELOT_ADMIN_TOKEN": "secret"}  # fmt: skip
    assert planning_env(env) == {"CAMELOT_STAGE_HOST_MS": "0.97", "CAMELOT_GATEWAY_CPU_MS": "3.0"}


async def test_clients_on_the_node_send_refs_except_under_plain(monkeypatch):
    """`--shm`: every policy's trials borrow their inputs from the broker and send refs, but
    `plain` (what operators run without Camelot) still sends bytes."""
    from loadgen.experiments import harness as harness_mod
    from loadgen.experiments.harness import Harness
    from loadgen.inputs import parse_mix

    sent: list[tuple[str, str]] = []

    async def fake_open_loop(target, schedule, mix, seed, deadline_s, **kw):
        sent.append((kw["transport"], kw["shm_broker"]))
        return None

    monkeypatch.setattr(harness_mod, "run_open_loop", fake_open_loop)
    h = Harness("127.0.0.1:1", None, trial_s=0.5, warmup_s=0.0, gap_s=0.0,
                shm_broker="unix:/run/b.sock")  # fmt: skip
    mix = parse_mix("img-to-text")
    await h.run(mix, [0.0], 0.5)
    h._policy_transport = "wire"
    await h.run(mix, [0.0], 0.5)
    assert sent == [("default", "unix:/run/b.sock"), ("wire", "")]


def test_shm_mesh_takes_the_served_meshs_broker(tmp_path):
    import os

    from common.errors import InvalidArgument
    from common.meshrecord import MeshRecord
    from loadgen.experiments.__main__ import shm_broker

    env = {"CAMELOT_RUN_DIR": str(tmp_path)}
    assert shm_broker("") == "" and shm_broker("127.0.0.1:5") == "127.0.0.1:5"
    with pytest.raises(InvalidArgument, match="no served mesh"):
        shm_broker("mesh", env)
    record = MeshRecord(gateway="g:1", scheduler="s:2", token_file="t", pid=os.getpid())
    record.write(tmp_path)
    with pytest.raises(InvalidArgument, match="names no broker"):
        shm_broker("mesh", env)
    MeshRecord(**{**record.__dict__, "broker": "unix:/x/broker.sock"}).write(tmp_path)
    assert shm_broker("mesh", env) == "unix:/x/broker.sock"
