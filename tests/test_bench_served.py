"""bench_served's accounting: which configs a run serves, what a pipeline's row says, and which
pipelines count as served (the mesh run itself is the benchmark; these are its rules)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from contract.pipeline_config import gather_configs as gather
from contract.pipeline_config import pipelines_dir
from loadgen.bench_served import pipeline_row, suggested_qos, summarize
from loadgen.records import Record


def rec(pipeline: str, latency_ms: float, status: str = "OK", compute_ms: float = 0.0) -> Record:
    return Record(pipeline, 0, 0, int(latency_ms * 1000), status,
                  compute_us=int(compute_ms * 1000))  # fmt: skip


def test_gather_copies_every_config_and_refuses_a_name_in_two_folders(tmp_path: Path) -> None:
    into = tmp_path / "into"
    into.mkdir()
    names = gather([pipelines_dir()], into)
    assert names == sorted(p.stem for p in pipelines_dir().glob("*.yaml"))
    assert sorted(p.stem for p in into.glob("*.yaml")) == names

    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(pipelines_dir() / f"{names[0]}.yaml", twin)
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(InvalidArgument, match=names[0]):
        gather([pipelines_dir(), twin], again)
    with pytest.raises(InvalidArgument, match="not a folder"):
        gather([tmp_path / "nope"], again)


def test_a_row_counts_errors_by_code_and_takes_the_median_compute_of_answers() -> None:
    records = [rec("a", 10, compute_ms=2), rec("a", 20, compute_ms=4), rec("a", 30, compute_ms=9),
               rec("a", 5, "UNAVAILABLE"), rec("b", 99)]  # fmt: skip
    row = pipeline_row("a", records, 300.0, 2.5, 5.0)
    assert (row["count"], row["errors"], row["error_codes"]) == (4, 1, {"UNAVAILABLE": 1})
    assert row["gpu_ms_per_query"] == 4.0
    assert row["p99_ms"] is not None and 29 < row["p99_ms"] <= 30
    assert row["suggested_qos_p99_ms"] == 75.0  # 2.5 x ~30 ms, rounded up to 5


def test_suggested_qos_rounds_up_and_a_pipeline_with_errors_or_no_answers_is_not_served() -> None:
    assert suggested_qos(10.1, 2.5, 5.0) == 30.0
    assert suggested_qos(None, 2.5, 5.0) is None
    rows = [
        {"pipeline": "a", "count": 10, "errors": 0, "p99_ms": 1.0},
        {"pipeline": "b", "count": 10, "errors": 1, "p99_ms": 2.0},
        {"pipeline": "c", "count": 0, "errors": 0, "p99_ms": None},
    ]
    s = summarize(rows)
    assert (s["pipelines"], s["pipelines_served"], s["errors"]) == (3, 1, 1)
    assert s["b_p99_ms"] == 2.0
