"""`--workers N`: gateway processes sharing one port, started, spread over and kept by a supervisor.

A real mesh on the host backend; the gateway is started with two workers, the load generator
opens many connections, and both workers' CPU clocks must move (the kernel dealt connections to
both). A worker killed from outside is started again while the other keeps answering; SIGTERM to
the supervisor stops every worker.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from loadgen import openloop, records, traces
from loadgen.inputs import parse_mix
from services.gateway.workers import worker_argv
from tests import mesh as testmesh
from tests.test_agent import eventually

pytestmark = pytest.mark.slow

PIPE = "speech-to-text"


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(t) for t in text]
    return sorted(out)


def running(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


# the mesh's processes start on a loaded 2-core machine: longer than test_agent's default
WAIT_S = 30.0


async def load(target: str, qps: float, seconds: float) -> records.Result:
    rng = np.random.default_rng(1)
    schedule = traces.schedule(traces.constant(qps, seconds), rng, traces.Arrivals.UNIFORM)
    return await openloop.run_open_loop(
        target, schedule, parse_mix(PIPE), 1, 5.0, duration_s=seconds, connections=16
    )


def test_a_worker_runs_as_one_gateway_with_its_own_metrics_port():
    argv = ["--port", "5000", "--workers", "3", "--metrics-port", "9100"]
    assert worker_argv(argv, 2, 9100)[-4:] == ["--workers", "1", "--metrics-port", "9102"]
    assert worker_argv(["--port", "5000"], 0, 0)[-2:] == ["--workers", "1"]


async def test_two_workers_share_the_port_survive_a_crash_and_stop_together(tmp_path):
    tm = await testmesh.start(tmp_path, {PIPE: 1}, gateway_args=("--workers", "2"))
    try:
        sup = next(p for p in tm.mesh.procs if p.name == "gateway")
        await eventually(lambda: len(children(sup.pid)) == 2, WAIT_S, what="two workers")
        await eventually(
            lambda: sup.log_path.read_text().count('"serving"') >= 2, WAIT_S, what="both serve"
        )
        workers = children(sup.pid)
        before = {pid: cpu_ticks(pid) for pid in workers}
        result = await load(tm.gateway, 60.0, 2.0)
        stats = result.stats(0.0)
        assert stats["all"]["count"] >= 100 and stats["all"]["errors"] == 0, stats["all"]
        # both workers took a share of the connections and did work for them
        assert all(cpu_ticks(pid) > before[pid] for pid in workers)

        os.kill(workers[0], signal.SIGKILL)
        await eventually(
            lambda: len(children(sup.pid)) == 2 and workers[0] not in children(sup.pid),
            WAIT_S,
            what="the killed worker replaced",
        )
        await eventually(
            lambda: sup.log_path.read_text().count('"serving"') >= 3, WAIT_S, what="it serves"
        )
        after = await load(tm.gateway, 40.0, 1.0)
        assert after.stats(0.0)["all"]["errors"] == 0

        now = children(sup.pid)
        sup.popen.send_signal(signal.SIGTERM)
        await eventually(lambda: not sup.alive(), WAIT_S, what="the supervisor to exit")
        assert sup.popen.returncode == 0
        assert not any(running(pid) for pid in now)
    finally:
        await tm.mesh.stop_all()
