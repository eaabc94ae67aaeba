"""Profiling a pipeline's stages on this node's GPU, into the scheduler's profile format.

Per stage:
1. Solo latency over SM shares x batch sizes. MPS fixes a process's share when it creates its
   CUDA context, so every share is a new child process (`worker stage`) started with
   CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; batches are timed inside it (CUDA events, median of
   repeats after warm-up). Memory: weights from the pool before and after building the model
   alone; per-item activations from the pool's growth while running the largest batch.
2. Contention, Bubble-Up style: a calibrated co-runner (`worker corunner`, a streaming device
   copy) at each pressure level (its SM share; its level is its solo bandwidth over the device
   peak, the co-runner at 100% alone) runs beside the stage at `contention_share`: the stage's
   slowdown at each level is its sensitivity; the bandwidth the co-runner loses beside the stage
   (over the peak) is the stage's pressure. The co-runners' own bandwidths (the peak, each level
   alone) are the device's, so a run measures them once and keeps its co-runners for every
   stage (`CoRunners`).

The format is `camelot-profiles/1` (common.profileformat, which both sides import; services do
not import the scheduler, so the document is written here and validated there). Everything but
the child processes is plain Python and is tested on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common import profileformat
from common.errors import InvalidArgument, Unavailable

SHARE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


@dataclass(frozen=True)
class Settings:
    pipelines: tuple[str, ...]
    size: str = "full"
    shares: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    pressure_shares: tuple[float, ...] = (10, 25, 50)
    contention_share: float = 50.0
    repeats: int = 20
    warmup: int = 3
    corunner_mib: int = 1024
    window_s: float = 1.0
    seed: int = 0
    # as a stage with --cuda-graphs on: graph-safe models replay CUDA graphs
    cuda_graphs: bool = True


@dataclass
class StageResult:
    pipeline: str
    stage: str
    latency_ms: dict[float, dict[int, float]] = field(default_factory=dict)
    weights_bytes: int = 0
    activation_bytes_per_item: int = 0
    output_bytes_per_item: int = 0
    pressure_levels: list[float] = field(default_factory=lambda: [0.0])
    slowdown: list[float] = field(default_factory=lambda: [1.0])
    pressure: float = 0.0
    # "pow2" where the stage replays CUDA graphs: a batch costs what its power-of-two bucket does
    batch_buckets: str = ""


def batches_for(max_batch: int, batches: Iterable[int]) -> list[int]:
    """The profiled batch sizes up to a stage's max_batch, always including it."""
    if max_batch < 1:
        raise InvalidArgument(f"max_batch must be >= 1, got {max_batch}")
    out = sorted({b for b in batches if 1 <= b <= max_batch} | {max_batch})
    return out


def sensitivity(
    solo_ms: float, beside_ms: Mapping[float, float]
) -> tuple[list[float], list[float]]:
    """(pressure levels, slowdown factors): starting at (0, 1), made non-decreasing (noise)."""
    if solo_ms <= 0:
        raise InvalidArgument("solo latency must be > 0")
    levels, slow = [0.0], [1.0]
    for level in sorted(beside_ms):
        if level <= levels[-1]:
            continue  # two co-runner shares drew the same bandwidth: keep the first
        levels.append(round(level, 6))
        slow.append(round(max(slow[-1], beside_ms[level] / solo_ms), 6))
    return levels, slow


def pressure_of(solo_gbs: float, beside_gbs: float, peak_gbs: float) -> float:
    """The stage's pressure: the bandwidth the co-runner lost beside it, over the device peak."""
    if peak_gbs <= 0:
        raise InvalidArgument("peak bandwidth must be > 0")
    return round(max(0.0, (solo_gbs - beside_gbs) / peak_gbs), 6)


def stage_json(r: StageResult) -> dict[str, Any]:
    return {
        "latency_ms": {
            _num(s): {str(b): round(ms, 6) for b, ms in sorted(row.items())}
            for s, row in sorted(r.latency_ms.items())
        },
        "weights_bytes": int(r.weights_bytes),
        "activation_bytes_per_item": int(r.activation_bytes_per_item),
        "output_bytes_per_item": int(r.output_bytes_per_item),
        "sensitivity": {"pressure": list(r.pressure_levels), "slowdown": list(r.slowdown)},
        "pressure": r.pressure,
        **({"batch_buckets": r.batch_buckets} if r.batch_buckets else {}),
    }


def document(
    results: Sequence[StageResult], device: str, date: str, note: str = ""
) -> dict[str, Any]:
    return profileformat.document(
        {f"{r.pipeline}/{r.stage}": stage_json(r) for r in results},
        device=device,
        date=date,
        synthetic=False,
        note=note or "measured by python -m services.profiler",
    )


def redis_items(doc: Mapping[str, Any]) -> dict[str, str]:
    """Key -> value for Redis: one string per stage, the stage object plus device and date."""
    return profileformat.redis_items(doc)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Child:
    """One worker process at one SM share, driven by JSON lines."""

    def __init__(
        self, args: Sequence[str], share: float, env: Mapping[str, str] | None = None
    ) -> None:
        environ = dict(os.environ if env is None else env)
        environ[SHARE_ENV] = _num(share)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.profiler.worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environ,
        )
        self.hello = self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise Unavailable(f"profiler worker {self.proc.args!r} exited with {code}")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read()

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.send(cmd="exit")
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def profile_stage(
    settings: Settings,
    pipeline: str,
    stage: str,
    max_batch: int,
    log: Callable[[str], None] = print,
    config: str = "",
    corunners: CoRunners | None = None,
) -> StageResult:
    """Runs on the GPU: every share x batch alone, then beside the co-runner levels. `config`
    is the pipeline's config path where it is not a bundled one (a user's own YAML);
    `corunners`, a run's co-runners shared by its stages (else this stage starts its own)."""
    res = StageResult(pipeline, stage)
    batches = batches_for(max_batch, settings.batches)
    args = [
        "stage",
        config or pipeline,
        settings.size,
        stage,
        str(max(batches)),
        str(settings.seed),
        "on" if settings.cuda_graphs else "off",
    ]
    b = max(batches)
    # a run's co-runners stay the run's; a stage profiled alone starts and closes its own
    own = CoRunners(settings) if corunners is None else contextlib.nullcontext(corunners)
    with own as runners:
        shares = list(settings.shares)
        # the contention levels run in the child of the contention share where that share is
        # profiled too (one model build and graph capture fewer), else in a child of its own
        if settings.contention_share not in shares:
            shares.append(settings.contention_share)
        for share in shares:
            with Child(args, share) as w:
                if share in settings.shares:
                    res.latency_ms[share] = _solo_row(settings, res, w, share, batches)
                    log(f"{pipeline}/{stage} @ {share}%: {res.latency_ms[share]}")
                if share == settings.contention_share:
                    _contention(settings, res, w, runners, b, pipeline, stage, log)
    return res


def _solo_row(
    settings: Settings, res: StageResult, w: Child, share: float, batches: list[int]
) -> dict[int, float]:
    """Every batch timed alone in the child at `share`; memory from the largest share's."""
    row = {}
    for b in batches:
        got = w.ask(cmd="time", batch=b, repeats=settings.repeats, warmup=settings.warmup)
        row[b] = float(got["ms"])
        if share == max(settings.shares) and b == max(batches):
            res.weights_bytes = int(w.hello["weights_bytes"])
            res.batch_buckets = str(w.hello.get("batch_buckets", ""))
            res.activation_bytes_per_item = int(got["working_bytes"]) // b
            res.output_bytes_per_item = int(got["output_bytes_per_item"])
    return row


def _contention(
    settings: Settings,
    res: StageResult,
    w: Child,
    runners: CoRunners,
    b: int,
    pipeline: str,
    stage: str,
    log: Callable[[str], None],
) -> None:
    """The stage's slowdown at batch `b` beside each co-runner level, and its pressure."""
    peak = runners.peak()
    solo = float(w.ask(cmd="time", batch=b, repeats=settings.repeats)["ms"])
    beside: dict[float, float] = {}
    for level_share in settings.pressure_shares:
        c, alone = runners.level(level_share)
        c.send(cmd="start")
        ms = float(
            w.ask(cmd="time", batch=b, repeats=settings.repeats, min_s=settings.window_s)["ms"]
        )
        during = float(c.ask(cmd="stop")["gbs"])
        beside[alone / peak] = ms
        if level_share == max(settings.pressure_shares):
            res.pressure = pressure_of(alone, during, peak)
        log(f"{pipeline}/{stage} beside a {level_share}% co-runner: {ms / solo:.2f}x")
    res.pressure_levels, res.slowdown = sensitivity(solo, beside)


class CoRunners:
    """The co-runner processes of one profiling run, one per share, started when first needed
    and kept (idle, blocked on their stdin) for every stage after: its bandwidth at full share
    (the pressure scale) and alone at each level depend on the device, not on the stage, so
    they are measured once per run, not once per stage (each is a process start, a CuPy
    context and a window)."""

    def __init__(self, settings: Settings, child: Callable[..., Child] | None = None) -> None:
        self.settings = settings
        self._child = child if child is not None else Child
        self._children: dict[float, Child] = {}
        self._alone: dict[float, float] = {}

    def _get(self, share: float) -> tuple[Child, float]:
        c = self._children.get(share)
        if c is None:
            c = self._children[share] = self._child(
                ["corunner", str(self.settings.corunner_mib)], share
            )
            self._alone[share] = _window(c, self.settings.window_s)
        return c, self._alone[share]

    def peak(self) -> float:
        """The co-runner's bandwidth alone at 100% of the SMs."""
        return self._get(100.0)[1]

    def level(self, share: float) -> tuple[Child, float]:
        """The co-runner at `share` (idle) and its bandwidth alone there."""
        return self._get(share)

    def close(self) -> None:
        for c in self._children.values():
            c.close()
        self._children.clear()

    def __enter__(self) -> CoRunners:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _window(c: Child, seconds: float) -> float:
    import time

    c.send(cmd="start")
    time.sleep(seconds)
    return float(c.ask(cmd="stop")["gbs"])
