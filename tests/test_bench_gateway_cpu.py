"""The gateway CPU benchmark against a real gateway process: it finds the process and charges
its CPU time to the queries sent."""

from __future__ import annotations

import pytest

from loadgen import bench_gateway_cpu
from tests import mesh as testmesh

pytestmark = pytest.mark.slow


async def test_gateway_cpu_per_query_is_measured_on_the_real_process(tmp_path):
    tm = await testmesh.start(tmp_path, {"text-to-img": 1})
    try:
        rows, summary = await bench_gateway_cpu.measure(
            tm.gateway, "text-to-img", [40.0], duration_s=1.5, rounds=1
        )
    finally:
        await tm.mesh.stop_all()
    (row,) = rows
    assert row["queries"] > 20 and row["errors"] == 0
    # a gateway spends some CPU on every query; far less than a whole core per query
    assert 0.05 < row["gateway_cpu_ms_per_query"] < 1000.0 / row["rate_qps"]
    assert summary["gateway_cpu_ms_per_query.40qps"] == row["gateway_cpu_ms_per_query"]
