"""`python -m shmbroker.bench` on the host backend, small sizes, few repeats: both orders of
the host hops give a row per size with every figure, and the result says which order ran
(the figures themselves are the benchmark's, not the test's)."""

from __future__ import annotations

import json

import pytest

from shmbroker import bench


@pytest.mark.parametrize("order", ["interleaved", "apart"])
def test_the_bench_measures_every_size_in_either_order(tmp_path, order):
    out = tmp_path / "transport.json"
    bench.main(
        ["--out", str(out), "--sizes", "4KiB,64KiB", "--repeats", "2", "--warmup", "1",
         "--backend", "host", "--host-hops", order]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["host_hops"] == order
    assert result["warmup"] == 1
    assert [r["size"] for r in result["rows"]] == ["4 KiB", "64 KiB"]
    for row in result["rows"]:
        for key in ("ref_ms", "ref_again_ms", "host_ms", "lease_ms"):
            assert row[key] > 0, key
    assert f"host hops {order}" in out.with_suffix(".md").read_text()
    assert result["summary"]["ref_flatness"] > 0


def test_a_negative_warmup_is_refused_by_name(tmp_path, capsys):
    out = tmp_path / "transport.json"
    with pytest.raises(SystemExit):
        bench.main(["--out", str(out), "--sizes", "4KiB", "--warmup", "-1", "--backend", "host"])
    assert "--warmup must be >= 0" in capsys.readouterr().err
    assert not out.exists()
