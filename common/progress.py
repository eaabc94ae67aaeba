"""Progress on long work, on stderr: step lines as things happen, and a bar for work of known size.

stdout stays for results (tables, JSON), so a bar never mixes into what a script reads. On a
terminal the bar redraws in place (at most ten times a second); into a file or a pipe it writes a
line at each quarter, so a log still shows the work moving without thousands of lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TextIO

WIDTH = 24
REDRAW_S = 0.1
QUARTERS = 4
TICK_S = 0.5


def step(message: str, stream: TextIO | None = None) -> None:
    """One line saying what starts now (or what just finished)."""
    out = stream if stream is not None else sys.stderr
    out.write(message + "\n")
    out.flush()


class Progress:
    """A bar for `total` units of work (queries, trials, seconds); `update` sets or adds."""

    def __init__(
        self, label: str, total: float, unit: str = "", stream: TextIO | None = None
    ) -> None:
        self.label = label
        self.total = max(float(total), 1e-9)
        self.unit = unit
        self.out = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.done = 0.0
        self.t0 = time.monotonic()
        self._drawn_at = 0.0
        self._quarter = -1
        self._closed = False
        self._draw(force=True)

    def advance(self, n: float = 1.0) -> None:
        self.update(self.done + n)

    def update(self, done: float) -> None:
        self.done = min(max(done, 0.0), self.total)
        self._draw()

    def close(self, note: str = "") -> None:
        """The final line (with `note`, e.g. what the work found); idempotent."""
        if self._closed:
            return
        self._closed = True
        line = self._line() + (f"  {note}" if note else "")
        self.out.write(("\r" + line + "\033[K\n") if self.tty else line + "\n")
        self.out.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close("" if kind is None else "interrupted")

    def _line(self) -> str:
        frac = self.done / self.total
        filled = int(round(frac * WIDTH))
        unit = f" {self.unit}" if self.unit else ""
        return (
            f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] "
            f"{_num(self.done)}/{_num(self.total)}{unit} {time.monotonic() - self.t0:.0f} s"
        )

    def _draw(self, force: bool = False) -> None:
        if self._closed:
            return
        if self.tty:
            now = time.monotonic()
            if force or now - self._drawn_at >= REDRAW_S:
                self._drawn_at = now
                self.out.write("\r" + self._line() + "\033[K")
                self.out.flush()
            return
        quarter = int(self.done / self.total * QUARTERS)
        if quarter != self._quarter and quarter < QUARTERS:
            self._quarter = quarter
            self.out.write(self._line() + "\n")
            self.out.flush()


@contextlib.asynccontextmanager
async def ticking(
    label: str, total_s: float, stream: TextIO | None = None
) -> AsyncIterator[Progress]:
    """A bar of seconds for timed work (a trial, a soak) that moves with the clock while the
    body runs; it ends at the time the body took."""
    bar = Progress(label, total_s, "s", stream)

    async def tick() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            bar.update(time.monotonic() - bar.t0)

    ticker = asyncio.create_task(tick())
    try:
        yield bar
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        bar.close()


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 or x >= 10 else f"{x:.1f}"
