"""Capped exponential backoff with full jitter, and the one retry loop built on it.

Only UNAVAILABLE and RESOURCE_EXHAUSTED are retried: both mean the request was not acted on.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from common.errors import CamelotError, ResourceExhausted, Unavailable

T = TypeVar("T")

RETRYABLE: tuple[type[CamelotError], ...] = (Unavailable, ResourceExhausted)


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.05
    cap_s: float = 2.0

    def delay_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
        return random.uniform(0.0, min(self.cap_s, self.base_s * (2**attempt)))


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    backoff: Backoff = Backoff()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await fn()
            except RETRYABLE as e:
                if attempt == self.attempts - 1:
                    raise
                delay = self.backoff.delay_s(attempt)
                if e.retry_after_ms is not None:
                    delay = max(delay, e.retry_after_ms / 1000)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")
