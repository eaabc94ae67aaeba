"""Talking to a spawned child process over a pipe: the parent waits for the child's next
`(kind, body)` message, and a child that fails sends `("error", text)` instead. Used by the
predictor bench's stage processes and the open-loop client's sending processes.

    ChildFailed     the child died, was silent too long, or sent something else
    └── ChildReported   the child said it failed (its own text)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any

# how often a parent waiting for a message checks that the child still lives
POLL_S = 1.0


class ChildFailed(Exception):
    """A child process did not send the message its parent waited for."""


class ChildReported(ChildFailed):
    """The child sent `("error", text)`: `text` says why."""


def expect(conn: Connection, what: str, timeout_s: float, proc: Any) -> Any:
    """The body of the child's next message, which must be of kind `what`. Notices a child that
    died without a word (a native crash, killed for memory) within `POLL_S`."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(POLL_S):
        if not proc.is_alive():
            raise ChildFailed(f"process exited with {proc.exitcode}")
        if time.monotonic() > deadline:
            raise ChildFailed(f"no {what!r} within {timeout_s:.0f} s")
    try:
        kind, body = conn.recv()
    except EOFError:
        raise ChildFailed(f"process exited before {what!r}") from None
    if kind == "error":
        raise ChildReported(str(body))
    if kind != what:
        raise ChildFailed(f"expected {what!r}, got {kind!r}")
    return body


def reap(procs: Iterable[Any], grace_s: float) -> None:
    """Waits up to `grace_s` for each child to end, then kills the ones still running."""
    for proc in procs:
        proc.join(timeout=grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
