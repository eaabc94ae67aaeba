"""Host CPU and GPU busy figures a trial records (CPU: /proc/stat; NVML absent here)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from loadgen.utilization import UtilizationSampler, busy_pct, cpu_times

STAT = """cpu  100 5 50 800 20 3 2 0 7 0
cpu0 50 2 25 400 10 1 1 0 3 0
intr 12345
"""


def test_cpu_times_count_everything_but_idle_and_iowait() -> None:
    busy, total = cpu_times(STAT)
    assert total == 100 + 5 + 50 + 800 + 20 + 3 + 2 + 0  # guest is inside user already
    assert busy == total - 800 - 20
    assert busy_pct((0, 0), (busy, total)) == pytest.approx(100 * 160 / 980)
    assert busy_pct((5, 10), (5, 10)) is None
    with pytest.raises(ValueError):
        cpu_times("intr 1\n")


async def test_sampler_sees_a_busy_core_and_no_gpu_here() -> None:
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(10_000))

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        async with UtilizationSampler(every_s=0.1) as sampler:
            await asyncio.sleep(0.6)
    finally:
        stop.set()
        worker.join()
    got = sampler.summary()
    # one core of os.cpu_count() kept busy (half of it, to leave room for scheduling)
    assert got["host_cpu_pct"] is not None
    assert got["host_cpu_pct"] > 50 / (os.cpu_count() or 1)
    assert len(sampler.host) >= 3
    assert got["gpu_util_pct"] is None


async def test_an_unreadable_stat_file_gives_no_figure_and_no_error(tmp_path: Path) -> None:
    async with UtilizationSampler(every_s=0.05, stat_path=tmp_path / "absent") as sampler:
        await asyncio.sleep(0.2)
    assert sampler.summary() == {"host_cpu_pct": None, "gpu_util_pct": None}
