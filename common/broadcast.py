"""A versioned value that many watchers follow: the newest value, never a queue of them.

A publisher sets the value; every watcher wakes and reads the newest one, so a watcher that
falls behind skips what it missed instead of holding memory for it (routes, a plan: only the
newest matters). Versions count publishes from 1; version 0 means nothing was published yet.
`close()` ends every watcher, so a server that stops need not wait for the streams that
follow it. asyncio only: publish and close from the event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Generic, TypeVar

T = TypeVar("T")


class Broadcast(Generic[T]):
    def __init__(self, initial: T) -> None:
        self._value = initial
        self._version = 0
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def value(self) -> T:
        return self._value

    @property
    def version(self) -> int:
        return self._version

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, value: T) -> bool:
        """Sets `value` under the next version and wakes every watcher. A value equal to the one
        in force is not published again (False), except as the first publish."""
        if self._version and value == self._value:
            return False
        self._value = value
        self._version += 1
        self._wake()
        return True

    def close(self) -> None:
        """Ends every watcher, now and later; a publish after it is kept but wakes nobody."""
        self._closed = True
        self._wake()

    async def wait_after(self, version: int) -> bool:
        """Waits until the version is past `version` (True) or the broadcast is closed (False)."""
        while self._version <= version and not self._closed:
            await self._changed.wait()
        return not self._closed

    async def watch(self) -> AsyncGenerator[T, None]:
        """The value once one is published, then each later one, until `close()`."""
        seen = 0
        while await self.wait_after(seen):
            seen = self._version
            yield self._value

    def _wake(self) -> None:
        # wake every waiter of this version; later waiters wait on a fresh event
        event, self._changed = self._changed, asyncio.Event()
        event.set()
