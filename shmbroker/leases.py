"""Leases: the unit of ownership of broker buffers (one per query).

A lease ends in one of four ways: released DONE (its buffers are free at once), released
ABORTED, its TTL passing, or its owner process dying (those three quarantine the buffers, since
a kernel may still be writing to them). Ended lease ids are remembered for a while so that a
late Allocate on one gets FAILED_PRECONDITION rather than NOT_FOUND.

Owner liveness is `os.kill(pid, 0)` plus, on Linux, the process start time read when the lease
opened, so that a zombie or a recycled pid does not keep a dead owner's leases alive.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from common.errors import InvalidArgument, LeaseEnded, NotFound

POOL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
LABEL_MAX = 256
MAX_TTL_S = 24 * 3600.0
ENDED_REMEMBERED = 65536


class EndReason(enum.Enum):
    DONE = "done"
    ABORTED = "aborted"
    EXPIRED = "expired"
    OWNER_DIED = "owner_died"

    @property
    def quarantines(self) -> bool:
        return self is not EndReason.DONE


@dataclass(frozen=True)
class Buffer:
    slab_id: str
    offset: int
    nbytes: int


@dataclass
class Lease:
    lease_id: str
    pool: str
    owner_pid: int
    owner_start: str | None
    label: str
    expires_at: float  # monotonic seconds
    expires_unix_us: int
    buffers: list[Buffer] = field(default_factory=list)
    # an arena: one large buffer its holder sub-allocates queries' buffers in (LendArena)
    arena: bool = False


def process_start(pid: int) -> str | None:
    """Start time of pid in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is None:
        return True
    # gone to a zombie, or the pid now names another process
    return process_start(pid) == start


class LeaseTable:
    """Open leases by id; time comes from `clock` (monotonic seconds) so tests can drive it."""

    def __init__(
        self,
        default_ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        alive: Callable[[int, str | None], bool] = process_alive,
    ) -> None:
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self._alive = alive
        self._open: dict[str, Lease] = {}
        # ended lease -> (why, when): remembered for one default TTL, the time a ref of it can
        # still be on its way, and never more than ENDED_REMEMBERED of them
        self._ended: OrderedDict[str, tuple[EndReason, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._open.values()))

    def open(self, pool: str, owner_pid: int, ttl_s: float, label: str) -> Lease:
        pool = pool or "default"
        if not POOL_RE.match(pool):
            raise InvalidArgument(f"pool {pool!r} is not 1-64 of [A-Za-z0-9_.-]")
        if not 0 <= ttl_s <= MAX_TTL_S or ttl_s != ttl_s:
            raise InvalidArgument(f"ttl_s {ttl_s!r} is not in [0, {MAX_TTL_S:g}]")
        if owner_pid < 0:
            raise InvalidArgument(f"owner_pid {owner_pid} is negative")
        if len(label) > LABEL_MAX:
            raise InvalidArgument(f"label is {len(label)} characters, over {LABEL_MAX}")
        owner_start = None
        if owner_pid:
            if not self._alive(owner_pid, None):
                raise InvalidArgument(f"owner_pid {owner_pid} is not a running process")
            owner_start = process_start(owner_pid)
        ttl = ttl_s or self.default_ttl_s
        lease = Lease(
            lease_id=secrets.token_hex(12),
            pool=pool,
            owner_pid=owner_pid,
            owner_start=owner_start,
            label=label,
            expires_at=0.0,
            expires_unix_us=0,
        )
        self._set_expiry(lease, ttl)
        self._open[lease.lease_id] = lease
        return lease

    def _set_expiry(self, lease: Lease, ttl_s: float) -> None:
        lease.expires_at = self._clock() + ttl_s
        lease.expires_unix_us = time.time_ns() // 1000 + int(ttl_s * 1e6)

    def get(self, lease_id: str) -> Lease:
        """The open lease; NOT_FOUND if never seen, FAILED_PRECONDITION if it has ended."""
        lease = self._open.get(lease_id)
        if lease is not None:
            return lease
        ended = self._ended.get(lease_id)
        reason = ended[0] if ended is not None else None
        if reason is not None:
            raise LeaseEnded(f"lease {lease_id} has ended ({reason.value})")
        raise NotFound(f"unknown lease {lease_id!r}")

    def renew(self, lease_id: str, ttl_s: float) -> Lease:
        if not 0 <= ttl_s <= MAX_TTL_S or ttl_s != ttl_s:
            raise InvalidArgument(f"ttl_s {ttl_s!r} is not in [0, {MAX_TTL_S:g}]")
        lease = self.get(lease_id)
        self._set_expiry(lease, ttl_s or self.default_ttl_s)
        return lease

    def end(self, lease_id: str, reason: EndReason) -> Lease | None:
        """Ends an open lease and returns it; None when it is unknown or already ended."""
        lease = self._open.pop(lease_id, None)
        if lease is None:
            return None
        now = self._clock()
        self._ended[lease_id] = (reason, now)
        horizon = now - self.default_ttl_s
        while self._ended and (
            len(self._ended) > ENDED_REMEMBERED or next(iter(self._ended.values()))[1] < horizon
        ):
            self._ended.popitem(last=False)
        return lease

    def expired(self) -> list[str]:
        now = self._clock()
        return [lease.lease_id for lease in self._open.values() if lease.expires_at <= now]

    def orphaned(self) -> list[str]:
        """Leases whose owner process is gone (each owner checked once)."""
        verdict: dict[tuple[int, str | None], bool] = {}
        out = []
        for lease in self._open.values():
            if not lease.owner_pid:
                continue
            key = (lease.owner_pid, lease.owner_start)
            if key not in verdict:
                verdict[key] = self._alive(*key)
            if not verdict[key]:
                out.append(lease.lease_id)
        return out
