"""Capped exponential backoff: the one way a component waits longer after each failure.

Attempt n (from 0) waits up to min(cap, base * 2^n). `jitter` is the share of that ceiling
drawn at random: 1 is full jitter (uniform in [0, ceiling], for many clients that must not
retry in step), 0 none (a supervisor's restart delay, logged and then slept).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2.0 ** 1024 overflows a float; long before that every delay is the cap
_MAX_EXPONENT = 512


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.05
    cap_s: float = 2.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def ceiling_s(self, attempt: int) -> float:
        return float(min(self.cap_s, self.base_s * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT)))

    def delay_s(self, attempt: int) -> float:
        """The ceiling, less a random share of it up to `jitter`."""
        ceiling = self.ceiling_s(attempt)
        if not self.jitter:
            return ceiling
        return ceiling * random.uniform(1.0 - self.jitter, 1.0)
