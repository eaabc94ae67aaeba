"""Integer-microsecond clocks: monotonic for durations, wall for placing records in windows."""

from __future__ import annotations

import time


def mono_us() -> int:
    return time.monotonic_ns() // 1000


def wall_us() -> int:
    return time.time_ns() // 1000
