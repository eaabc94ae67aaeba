"""Host CPU and GPU busy figures a trial records (CPU: /proc/stat; NVML absent here)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from loadgen.utilization import (
    UtilizationSampler,
    busy_pct,
    cpu_times,
    mesh_processes,
    process_pct,
    process_ticks,
)

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

    def burn() -> None:  # BLAS releases the GIL: the core is busy, the event loop is not starved
        a = np.ones((200, 200))
        while not stop.is_set():
            a @ a

    worker = threading.Thread(target=burn)
    worker.start()
    try:
        async with UtilizationSampler(every_s=0.1) as sampler:
            # sample counts, not a fixed time: a loaded host may sample late
            for _ in range(600):
                if len(sampler.host) >= 4:
                    break
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        worker.join()
    got = sampler.summary()
    # one core of os.cpu_count() kept busy (half of it, to leave room for scheduling)
    assert got["host_cpu_pct"] is not None
    assert got["host_cpu_pct"] > 50 / (os.cpu_count() or 1)
    assert len(sampler.host) >= 3
    assert got["gpu_util_pct"] is None
    assert got["cpu_pct.loadgen"] is not None and got["cpu_pct.loadgen"] > 20  # the burning thread


async def test_an_unreadable_stat_file_gives_no_figure_and_no_error(tmp_path: Path) -> None:
    async with UtilizationSampler(every_s=0.05, stat_path=tmp_path / "absent") as sampler:
        await asyncio.sleep(0.2)
    got = sampler.summary()
    assert got["host_cpu_pct"] is None and got["gpu_util_pct"] is None


def fake_proc(root: Path, pid: int, cmdline: str, utime: int, stime: int, ppid: int = 1) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
    comm = "(python3 -m x)"  # a command name with spaces and parentheses' content
    rest = ["S", str(ppid), "1", "1", "0", "-1", "0", "0", "0", "0", "0", str(utime), str(stime)]
    (d / "stat").write_text(f"{pid} {comm} {' '.join(rest)} 0 0 20 0 1 0\n")


def test_processes_are_told_apart_and_timed(tmp_path: Path) -> None:
    assert process_ticks("7 (a b) S 1 1 1 0 -1 0 0 0 0 0 30 12 0 0") == 42
    fake_proc(tmp_path, 10, "python -m services.gateway --port 1", 100, 50)
    fake_proc(tmp_path, 11, "python -m services.stage --pipeline p", 10, 0)
    fake_proc(tmp_path, 12, "python -m services.stage --pipeline q", 20, 0)
    fake_proc(tmp_path, 13, "python -m scheduler --port 2", 5, 5)
    fake_proc(tmp_path, 14, "bash -c sleep", 99, 99)  # not ours
    fake_proc(tmp_path, 15, "python -m services.gateway --port 1", 7, 7)  # a second worker
    (tmp_path / "self").mkdir()
    before = mesh_processes(tmp_path)
    assert {pid: kind for pid, (kind, _) in before.items()} == {
        10: "gateway",
        11: "stage",
        12: "stage",
        13: "scheduler",
        15: "gateway",
    }
    hz = os.sysconf("SC_CLK_TCK")
    fake_proc(tmp_path, 10, "python -m services.gateway --port 1", 100 + hz, 50)  # 1 s of CPU
    fake_proc(tmp_path, 11, "python -m services.stage --pipeline p", 10 + hz // 2, 0)
    fake_proc(tmp_path, 12, "python -m services.stage --pipeline q", 20 + hz // 4, 0)
    got = process_pct(before, mesh_processes(tmp_path), 2.0)
    fake_proc(tmp_path, 15, "python -m services.gateway --port 1", 7 + hz // 10, 7)
    got = process_pct(before, mesh_processes(tmp_path), 2.0)
    # two workers, one dealt most of the connections: the sum, and the busiest worker apart
    assert got["gateway"] == pytest.approx(55.0)
    assert got["gateway_max"] == pytest.approx(50.0)  # half of one core over 2 s
    assert got["stage"] == pytest.approx(37.5, abs=1) and got["stage_max"] == pytest.approx(
        25, abs=1
    )
    assert got["scheduler"] == 0.0


def test_the_load_generators_own_sending_processes_count_as_load_generator(tmp_path: Path) -> None:
    me = os.getpid()
    spawn = "python -c from multiprocessing.spawn import spawn_main --multiprocessing-fork"
    fake_proc(tmp_path, 20, spawn, 10, 0, ppid=me)  # a sender of loadgen.clients
    fake_proc(tmp_path, 21, "python -m services.stage --pipeline p", 10, 0, ppid=me)  # a bench's
    fake_proc(tmp_path, 22, spawn, 10, 0, ppid=me + 1)  # someone else's child
    kinds = {pid: kind for pid, (kind, _) in mesh_processes(tmp_path).items()}
    assert kinds == {20: "loadgen", 21: "stage"}
