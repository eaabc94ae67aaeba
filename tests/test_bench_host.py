"""The host-path benchmark: its process accounting on real process trees, how it judges a rate,
and a smoke run of the whole program against a real mesh of null stages (host backend, one low
rate, a couple of seconds) that checks the result's shape and that the CPU figures are there."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from common.errors import InvalidArgument
from contract.pipeline_config import load_config
from loadgen import bench_host, hostladder, hostprofile
from loadgen.hostcost import CpuSampler, ProcessTree, stage_label
from loadgen.records import OK, Record


def test_a_replica_is_labelled_by_its_pipeline_and_stage():
    argv = ["python", "-m", "services.stage", "--pipeline", "null3", "--stage", "b", "--x", "1"]
    assert stage_label(argv) == "stage:null3/b"
    assert stage_label(["python", "-m", "services.gateway"]) is None


def test_processes_take_their_roots_kind_except_replicas_and_strangers_are_not_counted(
    tree_procs,
):
    root, kids = tree_procs
    tree = ProcessTree({root: "agent"})
    ticks = tree.ticks()
    labels = {pid: label for pid, (label, _) in ticks.items()}
    assert labels[root] == "agent"
    assert sorted(labels[k] for k in kids) == ["agent", "stage:p/s"]
    # this process is the load generator; init and the test runner's parent are no one's
    assert tree.label(tree.own) == "loadgen"
    assert 1 not in ticks and tree.label(1) is None


async def test_a_window_charges_cpu_to_the_kind_that_spent_it(tree_procs):
    root, _ = tree_procs
    tree = ProcessTree({root: "agent"})
    async with CpuSampler(tree, every_s=0.1, gpus=False) as sampler:
        t0 = sampler.samples[0].t_us
        # the burning child must run for a few clock ticks, however loaded the machine
        deadline = time.monotonic() + 30
        while True:
            await asyncio.sleep(0.3)
            window = sampler.window(t0, sampler.samples[-1].t_us)
            if window.cpu_ms.get("agent", 0) >= 30 or time.monotonic() > deadline:
                break
    assert window.cpu_ms["agent"] >= 30 and window.seconds > 0
    assert window.by_kind()["stage"] >= 0
    # the burning child is the agent's busiest process: its own CPU, not the kind's sum
    assert 30 <= window.busiest_ms["agent"] <= window.cpu_ms["agent"]
    row = hostladder.cost_row(window, 10)
    assert 0 < row["busiest_pct.agent"] <= row["cpu_pct"]["agent"]
    assert window.host_cpu_pct is not None and window.gpu_util_pct is None


def record(pipeline: str, latency_ms: float, status: str = OK) -> Record:
    return Record(pipeline, 0, 0, int(latency_ms * 1000), status)


def test_a_rate_holds_within_target_and_collapses_past_it():
    fine = [record("a", 5)] * 99 + [record("a", 20)]
    assert hostladder.judge(fine, {"a": 25.0}, 0.01)[:2] == (True, False)
    tail = [record("a", 5)] * 90 + [record("a", 40)] * 10
    assert hostladder.judge(tail, {"a": 25.0}, 0.01)[:2] == (False, False)
    slow = [record("a", 40)] * 100
    assert hostladder.judge(slow, {"a": 25.0}, 0.01)[:2] == (False, True)
    failing = [record("a", 5)] * 90 + [record("a", 0, "DEADLINE_EXCEEDED")] * 10
    assert hostladder.judge(failing, {"a": 25.0}, 0.01)[:2] == (False, True)
    # a mix holds only when every pipeline holds its own target
    mix = [record("a", 5)] * 100 + [record("b", 50)] * 100
    held, _, per = hostladder.judge(mix, {"a": 25.0, "b": 60.0}, 0.01)
    assert held and per["b"]["p99_ms"] == 50.0
    assert not hostladder.judge(mix, {"a": 25.0, "b": 40.0}, 0.01)[0]


def test_only_null_pipelines_are_taken_without_reference():
    with pytest.raises(Exception, match="not null pipelines: text-to-img"):
        bench_host.workloads(
            bench_host.build_parser().parse_args(["--pipelines", "text-to-img"]), "host"
        )
    args = bench_host.build_parser().parse_args(["--reference"])
    (ref,) = bench_host.workloads(args, "cuda")
    assert ref.size == "full" and ref.policy == "exclusive" and len(ref.pipelines) == 4
    assert bench_host.workloads(args, "host")[0].policy == "even"
    args = bench_host.build_parser().parse_args(["--option", "replicas=3"])
    assert {w.options for w in bench_host.workloads(args, "host")} == {(("replicas", "3"),)}
    with pytest.raises(Exception, match="not KEY=VALUE"):
        bench_host.workloads(bench_host.build_parser().parse_args(["--option", "x"]), "host")


def test_input_bytes_resizes_the_null_chains_into_valid_pipelines_of_their_own(tmp_path):
    args = bench_host.build_parser().parse_args(
        ["--pipelines", "null1,null3", "--input-bytes", "100,2764800"]
    )
    loads = bench_host.workloads(args, "host", tmp_path)
    assert [w.name for w in loads] == ["null1-100b", "null1-2764800b", "null3-100b",
                                       "null3-2764800b"]  # fmt: skip
    assert {w.directory for w in loads} == {str(tmp_path)}
    cfg = load_config("null3-2764800b", str(tmp_path))
    for size in ("tiny", "full"):
        assert tuple(cfg.resolve(size).input.shape) == (2764800,)
    # every stage's null model takes (and so gives on) the same tensor
    assert [st.options for st in cfg.stages] == [
        {"inputs": [{"name": "x", "dtype": "uint8", "shape": [2764800]}]}
    ] * 3
    for bad, why in (
        (["--pipelines", "null-dag", "--input-bytes", "100"], "not null-dag"),
        (["--input-bytes", "0"], "sizes in 1.."),
        (["--input-bytes", "4k"], "not a comma list"),
        (["--reference", "--input-bytes", "100"], "--reference has its own"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            bench_host.workloads(bench_host.build_parser().parse_args(bad), "host", tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_short_run_on_the_host_writes_the_result_with_cpu_per_kind(tmp_path):
    argv = ["--pipelines", "null3", "--backend", "host", "--rates", "15", "--duration-s", "3",
            "--warmup-s", "0.5", "--prime-s", "0", "--idle-s", "1", "--gap-s", "0",
            "--client-processes", "2", "--connections", "2", "--gateway-workers", "1",
            "--deadline-s", "20", "--out-dir", str(tmp_path), "--name", "host-smoke",
            "--option", "replicas=2", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    spy = hostprofile.py_spy() is not None
    if spy:  # where py-spy is installed, the trial also samples the busiest processes' stacks
        argv += ["--profile-at", "15", "--profile-s", "1"]
    json_path, md_path = await bench_host.run(bench_host.build_parser().parse_args(argv), argv)
    doc = json.loads(json_path.read_text())
    assert doc["name"] == "host-smoke" and doc["backend"] == "host"
    assert doc["command"].startswith("python -m loadgen.bench_host --pipelines null3")
    assert {"null3_max_qps", "null3_cpu_ms_per_query"} <= set(doc["summary"])
    assert doc["summary"]["null3_idle_mesh_cpu_pct"] >= 0
    (row,) = doc["rows"]
    assert row["workload"] == "null3" and row["rate_qps"] == 15
    assert row["count"] > 0 and row["errors"] == 0
    for kind in ("gateway", "stage", "loadgen"):
        assert row[f"cpu_ms.{kind}"] > 0, kind
    assert sorted(row["cpu_ms_by_stage"]) == ["null3/a", "null3/b", "null3/c"]
    assert all(ms > 0 for ms in row["cpu_ms_by_stage"].values())
    # the mesh's figure leaves the load generator out and counts everything else
    mesh = sum(row[f"cpu_ms.{k}"] or 0 for k in hostladder.KINDS if k != "loadgen")
    assert row["mesh_cpu_ms_per_query"] == pytest.approx(mesh, rel=1e-3, abs=1e-3)
    assert doc["settings"]["workloads"][0]["directory"] == "services/pipelines/null"
    # the policy's option reached the scheduler: even ran two replicas of every stage
    assert doc["settings"]["workloads"][0]["options"] == [["replicas", "2"]]
    logs = {p.name for p in (tmp_path / "run" / "null3").rglob("*.log")}
    for stage in "abc":
        assert any(f"null3.{stage}.1" in name for name in logs), (stage, sorted(logs))
    assert "mesh_cpu_ms_per_query" in md_path.read_text()
    if spy:
        profiled = row["host_profile"]
        assert any(k.startswith("gateway@") for k in profiled), profiled
        assert any(k.startswith("stage:null3/") for k in profiled), profiled
        assert all("error" not in p for p in profiled.values()), profiled
        assert "Where the host CPU went at 15 qps (null3)" in md_path.read_text()
        assert list((tmp_path / "host-smoke-pyspy").glob("null3-15-gateway@*.txt"))
    else:
        assert "host_profile" not in row
