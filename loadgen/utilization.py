"""How busy the host's CPUs and the GPUs were while a trial ran: the evidence for what limits a
mesh's peak (a GPU-bound mesh shows the GPU near 100%, a host-bound one the CPUs).

- host: the busy fraction of all cores from `/proc/stat` (everything but idle and iowait),
  over the interval between samples; it counts every process on the machine, load generator
  included, so run the generator elsewhere when the figure has to be the mesh's alone;
- GPU: NVML's `utilization.gpu`, the fraction of the sample period in which a kernel ran, averaged
  over the node's GPUs (absent without NVML). It says a kernel ran, not how many SMs it filled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")


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

    def __init__(self, every_s: float = 0.5, stat_path: Path = PROC_STAT) -> None:
        self.every_s = every_s
        self.stat_path = stat_path
        self.host: list[float] = []
        self.gpu: list[float] = []
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

    async def _loop(self) -> None:
        before = self._read()
        while True:
            await asyncio.sleep(self.every_s)
            try:
                now = self._read()
                if before is not None and now is not None:
                    pct = busy_pct(before, now)
                    if pct is not None:
                        self.host.append(pct)
                before = now
                if self._gpus is not None:
                    g = self._gpus.busy_pct()
                    if g is not None:
                        self.gpu.append(g)
            except Exception as e:  # a missed sample is not a failed trial
                log.warning("utilisation sample failed: %r", e)

    def summary(self) -> dict[str, float | None]:
        """Mean host CPU and GPU busy percentages over the samples (None where there were none)."""
        return {
            "host_cpu_pct": round(statistics.fmean(self.host), 1) if self.host else None,
            "gpu_util_pct": round(statistics.fmean(self.gpu), 1) if self.gpu else None,
        }
