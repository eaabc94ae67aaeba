"""follow-load's day: the staircase of load it runs, and how long the scheduler's loop takes to
answer one of its steps in each sharing mode (a level shorter than that tests the triggers, not
whether plans keep up)."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import InvalidArgument
from loadgen import traces
from scheduler.service.loop import GREEN_REPLAN_INTERVAL_S
from scheduler.service.settings import SchedulerSettings

MODES = ("mps", "green")
# what applying a share change takes per mode (docs/results/reconfigure.json, H100, p50): under
# MPS a new process beside the old one, with green contexts an in-place resize
APPLY_S = {"mps": 3.4, "green": 0.02}


def loop_reaction_s(mode: str, window_s: float = 0.0, min_replan_interval_s: float = 0.0) -> float:
    """How long the scheduler's loop takes, at worst, to answer a load step in `mode`
    (docs/CONTROL-LOOP.md): a window to see the new rate, the least time between re-plans, the
    apply, and a window that holds only the new plan before its p99 counts as evidence. 0 for
    a setting means the scheduler's default."""
    if mode not in APPLY_S:
        raise InvalidArgument(f"unknown sharing mode {mode!r}; known: {', '.join(MODES)}")
    window = window_s or SchedulerSettings.window_s
    interval = min_replan_interval_s or SchedulerSettings.min_replan_interval_s
    if mode == "green":
        interval = min(interval, GREEN_REPLAN_INTERVAL_S)
    return 2 * window + interval + APPLY_S[mode]


@dataclass(frozen=True)
class Day:
    """The day's trace and how many load changes it makes."""

    trace: traces.Trace
    levels: tuple[float, ...]

    @property
    def load_changes(self) -> int:
        return sum(a != b for a, b in zip(self.levels, self.levels[1:], strict=False))


def make_day(
    peak_qps: float, peak_frac: float, trough_frac: float, rungs: int, step_s: float
) -> Day:
    """Night, morning rise, afternoon peak, evening fall: trough x r^i for i = 0..rungs and back
    down, r = (peak / trough)^(1 / rungs), each held `step_s`."""
    if peak_qps <= 0:
        raise InvalidArgument(f"no peak to make a day from (peak {peak_qps:g} qps)")
    if not 0 < trough_frac < peak_frac:
        raise InvalidArgument(f"need 0 < trough_frac < peak_frac, got {trough_frac}, {peak_frac}")
    if rungs < 1 or step_s <= 0:
        raise InvalidArgument(f"need rungs >= 1 and step_s > 0, got {rungs}, {step_s}")
    low, high = trough_frac * peak_qps, peak_frac * peak_qps
    up = [low * (high / low) ** (i / rungs) for i in range(rungs + 1)]
    levels = (*up, *reversed(up[:-1]))
    return Day(traces.step(levels, step_s), tuple(levels))
