"""Arenas: a process that allocates on every query borrows whole arenas from the broker and
sub-allocates in them locally, so no broker call lies on a query's path.

    buffers = ArenaBuffers(client)                    # client: a connected BrokerClient
    lease, refs = await buffers.open_and_allocate([(np.uint8, (224, 224, 3)), ...], pool="va")
    ... refs go to the stages, which view them as they view any broker ref ...
    await buffers.release([lease])                    # DONE: reusable at once

An arena is a broker lease holding one large buffer (`LendArena`): it keeps every guarantee of
a lease. It belongs to this process (the broker reclaims it, quarantined, when the process
dies), it lives in its pool's slabs (a pipeline's refs never point into another's memory), its
TTL is renewed in the background, and its refs carry the slab's generation. Inside it, a query's
*local lease* is one block of the arena's free list holding all the query's buffers; its id is
`<arena lease>.<n>`, so a stage's "inputs belong to the query's lease" check keeps its meaning.
The refs are signed here with the broker's key (served to node-local processes only), so a
stage verifies them exactly as it verifies refs the broker signed.

A local lease ends DONE (its block is free at once) or ABORTED (a stage may still write to it:
the block waits `quarantine_s` before reuse, as the broker's quarantine does). A query larger
than an arena, or one that finds every arena full when no more may be borrowed, falls back to
the broker's own `Allocate` (a round trip, as before arenas), so nothing is refused that the
broker would have granted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.dtypes import from_numpy
from common.errors import CamelotError, FailedPrecondition, NotFound, ResourceExhausted
from protos import tensor_pb2
from shmbroker import refs
from shmbroker.allocator import ALIGNMENT, FreeList, align_up
from shmbroker.client import BrokerClient, DTypeLike

log = logging.getLogger(__name__)

# Arena TTL at the broker, renewed every third of it.
ARENA_TTL_S = 30.0
# Arenas one process may hold per (pool, device) before queries fall back to the broker.
MAX_ARENAS_PER_POOL = 8
# How long an aborted query's block waits before reuse (the broker's default quarantine).
QUARANTINE_S = 2.0
# Distinct buffer lists whose layout is kept (a gateway asks for one per pipeline).
MAX_LAYOUTS = 256


def is_local_lease(lease_id: str) -> bool:
    """True for an arena's local lease (`<arena lease>.<n>`): its holder alone knows whether it
    is open; the broker knows only the arena's."""
    return "." in lease_id


@dataclass(eq=False)  # compared by identity: `in` on the release path must not compare refs
class _Arena:
    lease_id: str
    pool: str
    device: int
    ref: tensor_pb2.TensorRef  # the whole arena
    free: FreeList

    def __post_init__(self) -> None:
        # the ref's fields every query's buffers repeat, read once
        self.slab_id: str = self.ref.slab_id
        self.generation: int = int(self.ref.slab_generation)
        self.offset: int = int(self.ref.offset)


@dataclass(frozen=True)
class _Layout:
    """A query's buffers, laid out once per list of (dtype, shape) a gateway asks for."""

    # (wire dtype, shape, bytes, aligned bytes) per buffer
    buffers: tuple[tuple[tensor_pb2.DType.ValueType, tuple[int, ...], int, int], ...]
    total: int


def _layout(items: Sequence[tuple[DTypeLike, tuple[int, ...]]]) -> _Layout:
    buffers = []
    for dt, shape in items:
        dtype, dims = np.dtype(dt), tuple(int(d) for d in shape)
        nbytes = dtype.itemsize * math.prod(dims)
        buffers.append((from_numpy(dtype), dims, nbytes, align_up(nbytes)))
    return _Layout(tuple(buffers), sum(b[3] for b in buffers))


@dataclass
class _Local:
    arena: _Arena
    offset: int  # of the block, inside the arena


@dataclass
class ArenaStats:
    arenas: int
    arena_bytes: int
    live_leases: int
    quarantined: int
    fallbacks: int


@dataclass
class ArenaBuffers:
    """The gateway's `Buffers`: query leases and buffers from borrowed arenas."""

    client: BrokerClient
    arena_bytes: int = 0  # 0: the broker's default (a sixteenth of a slab)
    max_arenas: int = MAX_ARENAS_PER_POOL
    quarantine_s: float = QUARANTINE_S
    clock: Any = time.monotonic
    _arenas: dict[tuple[str, int], list[_Arena]] = field(default_factory=dict)
    _local: dict[str, _Local] = field(default_factory=dict)
    _quarantine: deque[tuple[float, str]] = field(default_factory=deque)
    _seq: int = 0
    _fallbacks: int = 0
    _lend_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _layouts: dict[tuple[Any, ...], _Layout] = field(default_factory=dict)
    _renewer: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def warm_pool(self, pool: str, device: int = 0) -> bool:
        """Borrows the pool's first arena and opens its slab, so no query pays for either. False
        (and a warning) where the device's slabs are full (`BrokerClient.warm_pool`): the holder
        serves anyway, its queries borrowing an arena once there is room and taking broker
        leases, or failing RESOURCE_EXHAUSTED one by one, until then."""
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        if not await self.client.warm_pool(pool, device):
            return False
        try:
            if not self._arenas.get((pool, device)):
                await self._lend(pool, device)
        except ResourceExhausted as e:
            log.warning("pool %s on device %d: no arena lent at start (%s); its queries borrow one "
                        "when there is room", pool, device, e.message)  # fmt: skip
            return False
        return True

    async def aclose(self) -> None:
        """Stops renewing and gives every arena back (quarantined at the broker)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        leases = [a.lease_id for arenas in self._arenas.values() for a in arenas]
        self._arenas.clear()
        self._local.clear()
        self._quarantine.clear()
        if leases:
            try:
                await self.client.release(leases, aborted=True)
            except CamelotError as e:
                log.warning("arenas not given back (the broker reclaims them): %s", e)

    def stats(self) -> ArenaStats:
        self._drain_quarantine()
        arenas = [a for group in self._arenas.values() for a in group]
        return ArenaStats(
            arenas=len(arenas),
            arena_bytes=sum(a.free.capacity for a in arenas),
            live_leases=len(self._local) - len(self._quarantine),
            quarantined=len(self._quarantine),
            fallbacks=self._fallbacks,
        )

    # -- the Buffers protocol ----------------------------------------------------------------

    async def open_and_allocate(
        self,
        items: Sequence[tuple[DTypeLike, tuple[int, ...]]],
        *,
        pool: str = "default",
        ttl_s: float = 0.0,
        label: str = "",
        device: int = 0,
    ) -> tuple[str, list[tensor_pb2.TensorRef]]:
        """A local lease holding one buffer per (dtype, shape), in one block of an arena."""
        if self.client.dirty:
            # the broker may have restarted: arenas of an older generation are gone
            await self.client.refresh()
        self._drain_quarantine()
        key = tuple(items)
        layout = self._layouts.get(key)
        if layout is None:
            layout = _layout(items)
            if len(self._layouts) < MAX_LAYOUTS:
                self._layouts[key] = layout
        total = layout.total
        found = self._place(pool, device, total)
        if found is None:
            found = await self._place_after_lending(pool, device, total)
        if found is None:
            # larger than an arena, or every arena full: the broker's own lease, as before
            return await self.open_broker_lease(
                items, pool=pool, ttl_s=ttl_s, label=label, device=device
            )
        arena, offset = found
        self._seq += 1
        lease_id = f"{arena.lease_id}.{self._seq}"
        self._local[lease_id] = _Local(arena, offset)
        ref_key = self.client.ref_key
        out = []
        at = arena.offset + offset
        slab_id, generation = arena.slab_id, arena.generation
        for wire_dtype, shape, nbytes, size in layout.buffers:
            ref = tensor_pb2.TensorRef(
                slab_id=slab_id,
                slab_generation=generation,
                offset=at,
                nbytes=nbytes,
                dtype=wire_dtype,
                shape=shape,
                lease_id=lease_id,
                # signed from the values at hand: reading them back from the ref costs more
                tag=refs.tag_of(
                    ref_key, slab_id, generation, at, nbytes, wire_dtype, shape, lease_id
                ),
            )
            out.append(ref)
            at += size
        return lease_id, out

    async def view(self, ref: tensor_pb2.TensorRef) -> Any:
        return await self.client.view(ref)

    def pool_of(self, slab_id: str) -> str:
        return self.client.pool_of(slab_id)

    async def open_broker_lease(
        self,
        items: Sequence[tuple[DTypeLike, tuple[int, ...]]],
        *,
        pool: str = "default",
        ttl_s: float = 0.0,
        label: str = "",
        device: int = 0,
    ) -> tuple[str, list[tensor_pb2.TensorRef]]:
        """A lease of the broker's own (not an arena's): for a query no arena has room for, or
        whose stages allocate their outputs themselves, which they can do only under a lease
        the broker knows. Counted as a fallback."""
        self._fallbacks += 1
        return await self.client.open_and_allocate(
            items, pool=pool, ttl_s=ttl_s, label=label, device=device
        )

    def release_local(self, lease_id: str, *, aborted: bool = False) -> bool:
        """Ends a local lease at once, with no I/O; False when lease_id is not one."""
        if lease_id not in self._local:
            return False
        if aborted:
            # a stage may still write into the block: it waits before reuse
            self._quarantine.append((self.clock() + self.quarantine_s, lease_id))
        else:
            self._free(lease_id)
        return True

    async def release(self, lease_ids: Sequence[str], *, aborted: bool = False) -> None:
        """Ends local leases (idempotent); broker leases among them are released there."""
        remote = [
            lease_id
            for lease_id in lease_ids
            if not self.release_local(lease_id, aborted=aborted) and not is_local_lease(lease_id)
        ]
        if remote:
            await self.client.release(remote, aborted=aborted)

    # -- inside ------------------------------------------------------------------------------

    def _free(self, lease_id: str) -> None:
        local = self._local.pop(lease_id)
        if local.arena in self._arenas.get((local.arena.pool, local.arena.device), ()):
            local.arena.free.free(local.offset)

    def _drain_quarantine(self) -> None:
        now = self.clock()
        while self._quarantine and self._quarantine[0][0] <= now:
            _, lease_id = self._quarantine.popleft()
            if lease_id in self._local:
                self._free(lease_id)

    def _place(self, pool: str, device: int, nbytes: int) -> tuple[_Arena, int] | None:
        generation = self.client.generation
        arenas = self._arenas.get((pool, device), [])
        for arena in list(arenas):
            if arena.generation != generation:
                arenas.remove(arena)  # the broker that lent it is gone
                continue
            if nbytes > arena.free.capacity:
                continue
            offset = arena.free.alloc(nbytes)
            if offset is not None:
                return arena, offset
        return None

    async def _place_after_lending(
        self, pool: str, device: int, nbytes: int
    ) -> tuple[_Arena, int] | None:
        async with self._lend_lock:
            found = self._place(pool, device, nbytes)  # another query may have lent one
            if found is not None:
                return found
            arenas = self._arenas.get((pool, device), [])
            if len(arenas) >= self.max_arenas or (arenas and nbytes > arenas[0].free.capacity):
                return None
            try:
                arena = await self._lend(pool, device)
            except ResourceExhausted:
                return None
            if nbytes > arena.free.capacity:
                return None
            offset = arena.free.alloc(nbytes)
            return None if offset is None else (arena, offset)

    async def _lend(self, pool: str, device: int) -> _Arena:
        resp = await self.client.lend_arena(
            pool=pool, device=device, nbytes=self.arena_bytes, ttl_s=ARENA_TTL_S, label="arena"
        )
        capacity = int(resp.ref.nbytes) // ALIGNMENT * ALIGNMENT
        arena = _Arena(resp.lease.lease_id, pool, device, resp.ref, FreeList(capacity))
        self._arenas.setdefault((pool, device), []).append(arena)
        log.info("borrowed arena %s of %d bytes for pool %s", arena.lease_id, capacity, pool)
        return arena

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(ARENA_TTL_S / 3)
            for key, arenas in list(self._arenas.items()):
                for arena in list(arenas):
                    try:
                        await self.client.renew(arena.lease_id, ARENA_TTL_S)
                    except (NotFound, FailedPrecondition) as e:
                        # expired or from a broker that restarted: stop lending from it
                        log.warning("arena %s is gone: %s", arena.lease_id, e)
                        arenas.remove(arena)
                    except CamelotError as e:
                        log.warning("arena %s not renewed: %s", arena.lease_id, e)
                if not arenas:
                    self._arenas.pop(key, None)
