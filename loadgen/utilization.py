"""How busy the host's CPUs and the GPUs were while a trial ran: the evidence for what limits a
mesh's peak (a GPU-bound mesh shows the GPU near 100%, a host-bound one the CPUs).

- host: the busy fraction of all cores from `/proc/stat` (everything but idle and iowait),
  over the interval between samples; it counts every process on the machine, load generator
  included, so run the generator elsewhere when the figure has to be the mesh's alone;
- GPU: NVML's `utilization.gpu`, the fraction of the sample period in which a kernel ran, averaged
  over the node's GPUs (absent without NVML). It says a kernel ran, not how many SMs it filled;
- per process kind (gateway, stage replicas, broker, scheduler, agent, and this load generator
  with the sending processes it started):
  CPU time from `/proc/<pid>/stat` over the interval, in percent of one core, so a single-threaded
  process near 100 is the ceiling. For the stages and the gateway's workers, the sum and the
  busiest process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROC = Path("/proc")
PROC_STAT = PROC / "stat"
# what a process's command line contains -> its kind (first match wins)
KINDS = (
    ("services.gateway", "gateway"),
    ("services.stage", "stage"),
    ("shmbroker", "broker"),
    ("services.agent", "agent"),
    ("-m scheduler", "scheduler"),
)


# kinds that run as many processes: their busiest one is reported beside the sum
MANY = ("stage", "gateway")


def cpu_times(text: str) -> tuple[int, int]:
    """(busy, total) jiffies from the aggregate `cpu` line of /proc/stat."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            # guest time is already counted in user and nice
            total = sum(values[:8])
            return total - idle, total
    raise ValueError("no aggregate cpu line in /proc/stat")


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    busy, total = after[0] - before[0], after[1] - before[1]
    return None if total <= 0 else 100.0 * busy / total


def process_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat."""
    # the command name is in parentheses and may hold spaces: count fields after the last ")"
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def parent_pid(stat: str) -> int:
    """The parent's pid from the text of /proc/<pid>/stat."""
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def kind_of(cmdline: str, own: bool, child: bool = False) -> str | None:
    """`own`: this process; `child`: one it started (the load generator's sending processes,
    `loadgen.clients`, unless the command line names a mesh process: a bench may start the mesh
    itself)."""
    if own:
        return "loadgen"
    for needle, kind in KINDS:
        if needle in cmdline:
            return kind
    return "loadgen" if child else None


def mesh_processes(
    proc: Path = PROC, kinds: dict[int, str | None] | None = None
) -> dict[int, tuple[str, int]]:
    """pid -> (kind, CPU ticks) for every Camelot process and this one. `kinds` caches each
    pid's kind between calls, so a command line is read once per process."""
    me = os.getpid()
    known = {} if kinds is None else kinds
    out: dict[int, tuple[str, int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = ""  # read once: for a new pid's parent, and for its ticks if it is ours
            if pid not in known:
                cmdline = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
                )
                stat = (entry / "stat").read_text()
                known[pid] = kind_of(cmdline, pid == me, parent_pid(stat) == me)
            kind = known[pid]
            if kind is not None:
                out[pid] = (kind, process_ticks(stat or (entry / "stat").read_text()))
        except (OSError, ValueError, IndexError):
            continue  # gone between the listing and the read, or not ours to read
    return out


def process_pct(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], seconds: float
) -> dict[str, float]:
    """Per kind: CPU percent of one core over the interval (sum), and for the kinds of many
    processes the busiest one (`stage_max`, `gateway_max`: a saturated replica or gateway
    worker is near 100 while the sum says little; a gateway's workers are dealt connections
    by the kernel's hash, not evenly)."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    busiest: dict[str, float] = {}
    for pid, (kind, ticks) in after.items():
        if pid not in before or seconds <= 0:
            continue
        pct = 100.0 * (ticks - before[pid][1]) / hz / seconds
        out[kind] = out.get(kind, 0.0) + pct
        if kind in MANY:
            busiest[kind] = max(busiest.get(kind, 0.0), pct)
    out.update({f"{kind}_max": pct for kind, pct in busiest.items()})
    return out


class Gpus:
    """NVML's per-GPU busy percentage; `available` False where there is no NVML or no GPU."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception as e:  # no driver, no library, no device: CPU-only host
            log.debug("no GPU utilisation (%r)", e)

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def busy_pct(self) -> float | None:
        if not self.handles:
            return None
        return statistics.fmean(
            float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self.handles
        )

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


class UtilizationSampler:
    """Samples host CPU and GPU busy percentages every `every_s` while the block runs."""

    def __init__(
        self, every_s: float = 0.5, stat_path: Path = PROC_STAT, proc: Path = PROC
    ) -> None:
        self.every_s = every_s
        self.stat_path = stat_path
        self.proc = proc
        self.host: list[float] = []
        self.gpu: list[float] = []
        self.processes: dict[str, list[float]] = {}
        self._kinds: dict[int, str | None] = {}
        self._gpus: Gpus | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> UtilizationSampler:
        self._gpus = Gpus()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._gpus is not None:
            self._gpus.close()

    def _read(self) -> tuple[int, int] | None:
        try:
            return cpu_times(self.stat_path.read_text())
        except (OSError, ValueError):
            return None

    def _processes(self) -> tuple[dict[int, tuple[str, int]], float]:
        return mesh_processes(self.proc, self._kinds), time.monotonic()

    async def _loop(self) -> None:
        # /proc is read on a worker thread: the load generator's event loop never waits on it
        before = self._read()
        procs_before, t_before = await asyncio.to_thread(self._processes)
        while True:
            await asyncio.sleep(self.every_s)
            try:
                now = self._read()
                if before is not None and now is not None:
                    pct = busy_pct(before, now)
                    if pct is not None:
                        self.host.append(pct)
                before = now
                procs, t = await asyncio.to_thread(self._processes)
                for kind, value in process_pct(procs_before, procs, t - t_before).items():
                    self.processes.setdefault(kind, []).append(value)
                procs_before, t_before = procs, t
                if self._gpus is not None:
                    g = self._gpus.busy_pct()
                    if g is not None:
                        self.gpu.append(g)
            except Exception as e:  # a missed sample is not a failed trial
                log.warning("utilisation sample failed: %r", e)

    def summary(self) -> dict[str, float | None]:
        """Mean host CPU and GPU busy percentages over the samples (None where there were none),
        and `cpu_pct.<kind>` per process kind (percent of one core)."""
        out: dict[str, float | None] = {
            "host_cpu_pct": round(statistics.fmean(self.host), 1) if self.host else None,
            "gpu_util_pct": round(statistics.fmean(self.gpu), 1) if self.gpu else None,
        }
        for kind, values in sorted(self.processes.items()):
            out[f"cpu_pct.{kind}"] = round(statistics.fmean(values), 1)
        return out
