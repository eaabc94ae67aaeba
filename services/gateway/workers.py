"""Several gateway processes on one port: `--workers N`, in the manner of uvicorn's supervisor.

One gateway process carries about 130 queries/s on the H100 host before its event loop is the
whole mesh's ceiling (~0.7% of a core per query/s: docs/results/peak-load-one-gateway.md, every
policy missed at 120-160 qps with the gateway at 85-115% of a core; with three workers every
policy carried 220-320 qps, docs/results/peak-load.md). With N > 1 the process started is
a supervisor and serves nothing itself: it starts N workers, each a plain gateway (`--workers
1`) on the same TCP port. gRPC sets SO_REUSEPORT on its listening sockets, so the kernel deals
connections out among the workers; a client spreads its load only over several connections
(HTTP/2 keeps one per channel: the load generator's `--connections`, a Locust user each).

The supervisor forwards SIGTERM and SIGINT to the workers and exits once all have; a worker that
dies otherwise is started again after a doubling delay (reset once a run outlives
`STABLE_S`), so one crash never takes the port down.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from common.retry import Backoff

log = logging.getLogger(__name__)

POLL_S = 0.1
# a worker that ran this long before dying was healthy: its next restart starts the backoff over
STABLE_S = 10.0
RESTART_BACKOFF = Backoff(base_s=0.5, cap_s=30.0, jitter=0.0)


def worker_argv(argv: Sequence[str], index: int, metrics_port: int) -> list[str]:
    """A worker's arguments: the supervisor's, as one worker, with its own metrics port.
    argparse keeps the last of a repeated flag, so appending overrides."""
    out = [*argv, "--workers", "1"]
    if metrics_port > 0:
        out += ["--metrics-port", str(metrics_port + index)]
    return out


@dataclass
class Worker:
    index: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "services.gateway", *self.argv])
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("gateway worker %d started (pid %d)", self.index, self.proc.pid)


@dataclass
class Supervisor:
    argv: Sequence[str]
    workers: int
    metrics_port: int = 0
    grace_s: float = 10.0
    _children: list[Worker] = field(default_factory=list)
    _stopping: int = 0  # the signal that asked us to stop (0: none)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._children if w.proc is not None]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping:
            # a second signal: no more waiting for the grace period
            for w in self._children:
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
            return
        self._stopping = signum
        log.info("gateway supervisor: %s, stopping %d workers", signal.Signals(signum).name,
                 len(self._children))  # fmt: skip
        for w in self._children:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signum)

    def run(self) -> int:
        """Starts the workers and supervises them until a signal stops them; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._children = [
            Worker(i, worker_argv(self.argv, i, self.metrics_port)) for i in range(self.workers)
        ]
        for w in self._children:
            w.start()
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stopping and stop_deadline is None:
                stop_deadline = now + self.grace_s + 5.0
            alive = 0
            for w in self._children:
                if w.proc is not None and w.proc.poll() is None:
                    alive += 1
                    continue
                if self._stopping:
                    continue
                if w.restart_at is None:
                    assert w.proc is not None
                    lived = now - w.started_at
                    w.failures = 1 if lived >= STABLE_S else w.failures + 1
                    delay = RESTART_BACKOFF.delay_s(w.failures - 1)
                    w.restart_at = now + delay
                    log.warning("gateway worker %d (pid %d) exited with %s after %.1f s; "
                                "restarting in %.1f s", w.index, w.proc.pid, w.proc.returncode,
                                lived, delay)  # fmt: skip
                elif now >= w.restart_at:
                    w.start()
                    alive += 1
            if self._stopping and alive == 0:
                return 0
            if stop_deadline is not None and now > stop_deadline:
                for w in self._children:
                    if w.proc is not None and w.proc.poll() is None:
                        log.warning("gateway worker %d did not stop in time: killed", w.index)
                        w.proc.kill()
            time.sleep(POLL_S)
