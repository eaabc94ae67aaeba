"""Host CPU per query, per process kind, of a mesh this process started.

`loadgen.utilization` tells process kinds apart by command line; here the kinds come from the
process tree, which a benchmark that starts the mesh itself knows: each process it started (redis,
broker, scheduler, agent, gateway) is a root, and every process below a root is of the root's kind
(a gateway's workers count as gateway), except stage replicas, which the agent starts and which
count per stage as `stage:<pipeline>/<stage>`. This process and the processes it started outside
the mesh (the open loop's sending processes) are `loadgen`; an MPS control daemon or server
(which detaches from its parent) is `mps`. Nothing else on the machine is counted.

A `CpuSampler` reads every counted process's CPU time (utime + stime of all its threads, from
`/proc/<pid>/stat`) and the machine's busy time (`/proc/stat`) every `every_s`, off the event
loop; `window(t0_us, t1_us)` is the CPU each kind spent between the samples nearest those times.
Clock ticks are 10 ms, so a trial of a few seconds carries ~1% of error per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.clock import mono_us
from loadgen.utilization import PROC, Gpus, busy_pct, cpu_times, parent_pid, process_ticks

LOADGEN = "loadgen"
STAGE = "stage"
# the MPS control daemon and server, as /proc cuts their names (to 15 characters)
MPS_COMM = "nvidia-cuda-mps"


def stage_label(argv: list[str]) -> str | None:
    """`stage:<pipeline>/<stage>` for a stage replica's command line, else None."""
    if "services.stage" not in argv:
        return None

    def value(flag: str) -> str:
        i = argv.index(flag) if flag in argv else -1
        return argv[i + 1] if 0 <= i < len(argv) - 1 else "?"

    return f"{STAGE}:{value('--pipeline')}/{value('--stage')}"


def kind_of_label(label: str) -> str:
    """The kind a label counts under (`stage:a/b` -> `stage`)."""
    return label.partition(":")[0]


@dataclass
class ProcessTree:
    """Labels the processes of the mesh rooted at `roots` (pid -> kind) and of `own` (this
    process); each pid is looked at once and remembered (None: not ours)."""

    roots: Mapping[int, str]
    own: int = field(default_factory=os.getpid)
    proc: Path = PROC
    _labels: dict[int, str | None] = field(default_factory=dict)

    def _stat(self, pid: int) -> str:
        return (self.proc / str(pid) / "stat").read_text()

    def label(self, pid: int, stat: str | None = None) -> str | None:
        if pid in self._labels:
            return self._labels[pid]
        text = stat if stat is not None else self._stat(pid)
        label = self._classify(pid, text)
        self._labels[pid] = label
        return label

    def _classify(self, pid: int, stat: str) -> str | None:
        if pid == self.own:
            return LOADGEN
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm.startswith(MPS_COMM):
            return "mps"
        if pid in self.roots:
            return self.roots[pid]
        ppid = parent_pid(stat)
        if ppid <= 1:
            return None
        try:
            above = self.label(ppid)
        except (OSError, ValueError):
            return None
        if above is None:
            return None
        argv = (self.proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        return stage_label(argv) or kind_of_label(above)

    def ticks(self) -> dict[int, tuple[str, int]]:
        """pid -> (label, CPU clock ticks) of every process of ours alive now."""
        out: dict[int, tuple[str, int]] = {}
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if self._labels.get(pid, "") is None:
                continue
            try:
                stat = self._stat(pid)
                label = self.label(pid, stat)
                if label is not None:
                    out[pid] = (label, process_ticks(stat))
            except (OSError, ValueError, IndexError):
                continue  # gone between the listing and the read
        return out


@dataclass(frozen=True)
class Sample:
    t_us: int
    ticks: dict[int, tuple[str, int]]
    host: tuple[int, int] | None
    gpu_pct: float | None


@dataclass(frozen=True)
class Window:
    """What the sampled processes spent between two samples."""

    t0_us: int
    t1_us: int
    cpu_ms: dict[str, float]  # per label
    host_cpu_pct: float | None
    gpu_util_pct: float | None
    # per kind, the CPU of its busiest single process: one saturated gateway worker or replica
    # (near 100% of a core per thread it can use) shows here while the kind's total looks idle
    busiest_ms: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.t1_us - self.t0_us) / 1e6

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, ms in self.cpu_ms.items():
            kind = kind_of_label(label)
            out[kind] = out.get(kind, 0.0) + ms
        return out


class CpuSampler:
    """Samples the tree's CPU ticks every `every_s` while the block runs (see the module)."""

    def __init__(self, tree: ProcessTree, every_s: float = 0.2, gpus: bool = True) -> None:
        self.tree = tree
        self.every_s = every_s
        self.samples: list[Sample] = []
        self._gpus = Gpus() if gpus else None
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> Sample:
        t = mono_us()
        ticks = self.tree.ticks()
        try:
            host: tuple[int, int] | None = cpu_times((self.tree.proc / "stat").read_text())
        except (OSError, ValueError):
            host = None
        gpu = self._gpus.busy_pct() if self._gpus is not None else None
        return Sample(t, ticks, host, gpu)

    async def __aenter__(self) -> CpuSampler:
        self.samples.append(await asyncio.to_thread(self._sample))
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.samples.append(await asyncio.to_thread(self._sample))
        if self._gpus is not None:
            self._gpus.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.samples.append(await asyncio.to_thread(self._sample))

    def _nearest(self, t_us: int) -> Sample:
        return min(self.samples, key=lambda s: abs(s.t_us - t_us))

    def window(self, t0_us: int, t1_us: int) -> Window:
        """CPU milliseconds per label between the samples nearest `t0_us` and `t1_us` (processes
        alive at both), the machine's busy percentage and the GPUs' mean busy percentage."""
        a, b = self._nearest(t0_us), self._nearest(t1_us)
        if b.t_us <= a.t_us:
            raise ValueError("a window needs two samples in order; the trial was too short")
        ms_per_tick = 1000.0 / os.sysconf("SC_CLK_TCK")
        cpu: dict[str, float] = {}
        busiest: dict[str, float] = {}
        for pid, (label, ticks) in b.ticks.items():
            if pid in a.ticks:
                ms = (ticks - a.ticks[pid][1]) * ms_per_tick
                cpu[label] = cpu.get(label, 0.0) + ms
                kind = kind_of_label(label)
                busiest[kind] = max(busiest.get(kind, 0.0), ms)
        host = busy_pct(a.host, b.host) if a.host is not None and b.host is not None else None
        gpu = [
            s.gpu_pct for s in self.samples if a.t_us < s.t_us <= b.t_us and s.gpu_pct is not None
        ]
        return Window(a.t_us, b.t_us, cpu, host, sum(gpu) / len(gpu) if gpu else None, busiest)


def roots_of(procs: list[Any]) -> dict[int, str]:
    """pid -> kind for a launcher's processes (`services.launcher.Proc`: named redis, broker,
    scheduler, agent, gateway)."""
    return {p.pid: p.name for p in procs}
