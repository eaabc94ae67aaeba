"""Switching a replica's share at batch boundaries only.

A resize arrives on a gRPC thread while the GPU thread is in the middle of a batch. The batch
must finish on the share it started on (its inputs, kernels and outputs on one stream), and
the old share may be destroyed only once no batch uses it. `ShareSwitch` holds the share in
force and at most one requested successor:

    share = switch.begin_batch()   # the share this whole batch uses
    ...                            # every launch of the batch goes to `share`
    switch.end_batch()

`request(new)` may come from any thread. The successor is installed at the first moment no batch
is in flight: at once when idle, else when the last running batch ends. A request superseded
before it was installed is discarded unused. Installing calls `on_swap(old, new)` under the
switch's lock, on the thread that triggered it, with no batch in flight, so the old share is
released before any batch can begin on the new one. Overlapping batches are allowed; a switch
then waits for a moment with none in flight. Nothing here touches a GPU: the shares are opaque.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Generic, TypeVar

from common.errors import Cancelled, FailedPrecondition

log = logging.getLogger(__name__)

T = TypeVar("T")


class ShareSwitch(Generic[T]):
    """The share in force and a pending successor, swapped only when no batch is in flight."""

    def __init__(
        self,
        initial: T,
        *,
        on_swap: Callable[[T, T], None] | None = None,
        on_discard: Callable[[T], None] | None = None,
    ) -> None:
        self._current = initial
        self._pending: tuple[T, Future[T]] | None = None
        self._in_flight = 0
        self._swaps = 0
        self._on_swap = on_swap
        self._on_discard = on_discard
        self._lock = threading.Lock()

    @property
    def current(self) -> T:
        return self._current

    @property
    def pending(self) -> T | None:
        pending = self._pending
        return pending[0] if pending is not None else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def swaps(self) -> int:
        return self._swaps

    def request(self, new: T) -> Future[T]:
        """Asks for `new` to be the share; the future resolves with it once installed, or fails
        with CANCELLED if a later request supersedes it first. Any thread."""
        done: Future[T] = Future()
        superseded: tuple[T, Future[T]] | None = None
        with self._lock:
            superseded, self._pending = self._pending, None
            if new is self._current:
                done.set_result(new)
            else:
                self._pending = (new, done)
                if self._in_flight == 0:
                    self._swap_locked()
        if superseded is not None:
            self._discard(*superseded)
        return done

    def begin_batch(self) -> T:
        """The share the batch starting now must use from its first launch to its last."""
        with self._lock:
            if self._pending is not None and self._in_flight == 0:
                self._swap_locked()
            self._in_flight += 1
            return self._current

    def end_batch(self) -> None:
        """Marks a batch done (its GPU work finished); installs a pending share if now idle."""
        with self._lock:
            if self._in_flight == 0:
                raise FailedPrecondition("end_batch without a matching begin_batch")
            self._in_flight -= 1
            if self._in_flight == 0 and self._pending is not None:
                self._swap_locked()

    @contextlib.contextmanager
    def batch(self) -> Iterator[T]:
        """`begin_batch` and `end_batch` around a block, also when it raises."""
        share = self.begin_batch()
        try:
            yield share
        finally:
            self.end_batch()

    def _swap_locked(self) -> None:
        assert self._pending is not None and self._in_flight == 0
        (new, done), self._pending = self._pending, None
        old, self._current = self._current, new
        self._swaps += 1
        try:
            if self._on_swap is not None:
                self._on_swap(old, new)
        except Exception as e:
            # `new` is in force either way (no batch may run on `old` any more); the requester
            # learns that releasing the old share failed
            log.exception("releasing the old share failed while switching to the new one")
            done.set_exception(e)
        else:
            done.set_result(new)

    def _discard(self, share: T, done: Future[T]) -> None:
        done.set_exception(Cancelled("superseded by a newer share request before it was used"))
        if self._on_discard is not None:
            try:
                self._on_discard(share)
            except Exception:
                log.exception("discarding a superseded share failed")
