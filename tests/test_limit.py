"""The `limit` and `plain` references (issue 22): the mix with no mesh (loadgen.limit, real
models in real processes on the host backend), and `exclusive` over the wire, measured beside
the policies in one peak-load run against the fake gateway and Admin API.

The fake's peaks are known (tests.test_loadgen_experiments explains its overload model); the
limit's verdicts rest on targets of seconds for tiny models, so they hold on a loaded host.
"""

from __future__ import annotations

import json

import pytest

from common.backend import Backend
from common.errors import InvalidArgument, NotFound
from contract.pipeline_config import pipelines_dir
from loadgen import limit
from loadgen.experiments.search import SearchConfig
from loadgen.inputs import parse_mix
from protos.tensor_pb2 import TRANSPORT_WIRE as WIRE
from tests.test_loadgen_experiments import FAST, capacity, run_experiment
from tests.test_loadgen_gateway import TOKEN, serve_fake


def test_the_batch_cap_is_the_largest_batch_within_half_the_target():
    table = {1: 3.0, 2: 4.0, 4: 6.0, 8: 11.0, 16: 20.0}
    assert limit.batch_cap(table, qos_ms=20.0) == 4
    assert limit.batch_cap(table, qos_ms=40.0) == 16
    # a batch of one over half the target still runs, alone
    assert limit.batch_cap(table, qos_ms=4.0) == 1
    assert limit.pow2_batches(20) == [1, 2, 4, 8, 16]


def test_serve_batches_what_has_arrived_up_to_the_cap():
    sizes: list[int] = []
    # every query arrived before the start: the batcher takes the cap, then the rest
    lat, unserved = limit.serve(sizes.append, [-0.5] * 10, cap=4, t0=limit.time.perf_counter(),
                                give_up_s=60.0)  # fmt: skip
    assert sizes == [4, 4, 2] and unserved == 0
    assert len(lat) == 10 and min(lat) >= 500.0


def test_serve_counts_what_it_gives_up_on_as_unserved():
    sizes: list[int] = []
    lat, unserved = limit.serve(sizes.append, [0.0, 0.0, 0.0], cap=2,
                                t0=limit.time.perf_counter(), give_up_s=-1.0)  # fmt: skip
    assert sizes == [] and lat == [] and unserved == 3


def test_pipelines_are_found_in_the_bundled_then_the_torch_folder():
    assert limit.find_pipeline("img-to-text", "tiny").name == "img-to-text"
    # the torch pipelines are served by name beside the reference ones (bench_served)
    torch = limit.find_pipeline("torch-captioning", "full")
    assert torch.name == "torch-captioning" and torch.qos_p99_ms > 0
    with pytest.raises(NotFound, match="no-such"):
        limit.find_pipeline("no-such", "tiny")
    with pytest.raises(NotFound, match="torch-captioning"):
        limit.find_pipeline("torch-captioning", "full", [str(pipelines_dir())])


def test_limit_settings_that_cannot_run_are_refused():
    with pytest.raises(InvalidArgument, match="max_batch"):
        limit.LimitConfig(Backend.HOST, max_batch=0)
    with pytest.raises(InvalidArgument, match="trial_s"):
        limit.LimitConfig(Backend.HOST, trial_s=1.0, warmup_s=1.0)


CFG = limit.LimitConfig(Backend.HOST, size="tiny", max_batch=4, calibrate_repeats=2,
                        trial_s=1.0, warmup_s=0.2)  # fmt: skip


@pytest.mark.slow
async def test_limit_runs_the_mix_in_its_own_processes_and_finds_a_peak():
    mix = parse_mix("two:img-to-text=1,speech-to-text=1")
    # targets of seconds: any host, however loaded, holds 8 qps of tiny models
    found = await limit.measure(
        mix, {"img-to-text": 5000.0, "speech-to-text": 5000.0}, CFG,
        SearchConfig(start_qps=8, min_qps=1, max_qps=16, max_trials=3),
    )  # fmt: skip
    assert found.peak_qps >= 8
    assert set(found.caps) == set(mix.pipelines) and all(1 <= c <= 4 for c in found.caps.values())
    assert all(set(ms) == {1, 2, 4} for ms in found.batch_ms.values())
    first = found.trials[0]
    # both pipelines got their share of the schedule, and were served
    assert first.met and first.stats["img-to-text"]["count"] > 0
    assert first.stats["speech-to-text"]["count"] > 0 and first.stats["all"]["errors"] == 0


async def test_a_pipeline_that_cannot_be_built_fails_the_limit_by_name():
    with pytest.raises(InvalidArgument, match="no-such-pipeline"):
        await limit.measure(
            parse_mix("no-such-pipeline=1"), {"no-such-pipeline": 100.0}, CFG, SearchConfig()
        )
    with pytest.raises(InvalidArgument, match="no QoS target"):
        await limit.measure(parse_mix("img-to-text=1"), {}, CFG, SearchConfig())


@pytest.mark.slow
async def test_peak_load_measures_plain_and_limit_beside_the_policies(tmp_path):
    async with serve_fake() as gw:
        st = gw.state
        st.sleep_s = 0.002
        st.run_capacity = {"max-load": capacity(70.0), "exclusive": capacity(35.0)}
        st.policy_sm = {"max-load": [50.0, 50.0], "exclusive": [100.0]}
        doc = await run_experiment(
            ["peak-load", "--target", gw.target, "--admin", gw.target, "--token", TOKEN,
             "--mix", "vision:img-to-text", "--policies", "max-load",
             "--references", "plain,limit", "--backend", "host", "--limit-size", "tiny",
             "--limit-max-batch", "4", "--start-qps", "10", "--max-qps", "80",
             "--rel-tol", "0.3", "--out-dir", str(tmp_path), *FAST]
        )  # fmt: skip
        policies_set = st.policy
        wire_submits = st.transports[WIRE]
    s = doc["summary"]
    # plain is exclusive's plan, sent over the wire; it is a reference, not a baseline
    assert policies_set == "exclusive" and wire_submits > 0
    assert 20 <= s["vision.plain_qps"] <= 35
    assert s["vision.camelot_over_plain"] == pytest.approx(
        s["vision.max-load_qps"] / s["vision.plain_qps"]
    )
    assert "vision.camelot_over_best_baseline" not in s
    # the limit ran the real tiny model with no mesh: 80 qps with a 2 s target
    assert s["vision.limit_qps"] >= 40
    assert s["vision.mesh_over_limit"] == pytest.approx(
        s["vision.max-load_qps"] / s["vision.limit_qps"]
    )
    assert {r["policy"] for r in doc["rows"]} == {"max-load", "plain", "limit"}
    assert doc["limits"]["vision"]["caps"] == {"img-to-text": 4}
    assert json.loads(json.dumps(doc))["summary"] == s


async def test_low_load_refuses_the_limit_reference(tmp_path):
    async with serve_fake() as gw:
        with pytest.raises(InvalidArgument, match="peak-load reference"):
            await run_experiment(
                ["low-load", "--target", gw.target, "--admin", gw.target, "--token", TOKEN,
                 "--mix", "img-to-text=1", "--rate", "8", "--policies", "min-resource",
                 "--references", "limit", "--out-dir", str(tmp_path), *FAST]
            )  # fmt: skip


def test_limit_searches_with_more_trials_than_the_policies():
    """Its trials need no plan applied or primed, and its peak is every ratio's denominator: on
    the H100 with 5 trials it stopped at 1200 held and 2400 missed, before bisecting."""
    from loadgen.experiments.__main__ import build_parser, limit_measure

    argv = ["peak-load", "--references", "limit", "--max-trials", "5"]
    search = SearchConfig(max_trials=5)
    measure = limit_measure(build_parser().parse_args(argv), search)
    assert measure is not None and measure.keywords["search"].max_trials == 8
    args = build_parser().parse_args([*argv, "--limit-extra-trials", "0"])
    assert limit_measure(args, search).keywords["search"].max_trials == 5
    with pytest.raises(InvalidArgument, match="limit-extra-trials"):
        limit_measure(build_parser().parse_args([*argv, "--limit-extra-trials", "-1"]), search)
    # no limit among the references: nothing to measure
    assert limit_measure(build_parser().parse_args(["peak-load"]), search) is None
