"""When a dynamic batch waits for more requests: one rule for the stage's batcher, which applies
it, and the scheduler's queueing model, which predicts what it does.

A batch closes at `max_batch` requests or `max_wait` after its first request was taken. Waiting
trades the first request's latency for a larger batch, and pays only if company is likely to
come: at the recent arrival rate λ, a batch whose first request finds the queue empty waits only
when λ·max_wait >= MIN_EXPECTED_ARRIVALS, and otherwise runs at once. At low load a request so
skips every stage's wait; under load batches form as before (and a queue that built up while the
previous batch ran is taken whole either way).
"""

from __future__ import annotations

from collections import deque

import numpy as np

# Waiting pays when at least this many more requests are expected within max_wait.
MIN_EXPECTED_ARRIVALS = 1.0
# Arrivals the batcher's rate estimate spans.
RATE_WINDOW = 16


def effective_wait(rate_per_unit: float, max_wait: float) -> float:
    """The wait a batch takes at an arrival rate (per the unit of `max_wait`): max_wait or 0."""
    return max_wait if rate_per_unit * max_wait >= MIN_EXPECTED_ARRIVALS else 0.0


def effective_wait_array(rate_per_unit: np.ndarray, max_wait: float | np.ndarray) -> np.ndarray:
    """`effective_wait` elementwise."""
    wait = np.asarray(max_wait, dtype=float)
    return np.where(rate_per_unit * wait >= MIN_EXPECTED_ARRIVALS, wait, 0.0)


class ArrivalRate:
    """The arrival rate over the last RATE_WINDOW arrivals (per microsecond)."""

    def __init__(self) -> None:
        self._times: deque[int] = deque(maxlen=RATE_WINDOW)

    def arrived(self, now_us: int) -> None:
        self._times.append(now_us)

    def per_us(self, now_us: int) -> float:
        """Arrivals per microsecond; 0 until two have been seen. The span runs to `now_us`, so a
        rate learned in a burst fades once the arrivals stop."""
        if len(self._times) < 2:
            return 0.0
        span = max(now_us, self._times[-1]) - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else float("inf")
