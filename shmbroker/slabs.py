"""Slabs: large allocations exported once, created lazily per (pool, device) up to a cap.

A pool is a pipeline name (or "default"): its buffers come only from its own slabs, so a ref
of one pipeline never points into another's memory. A slab is POSIX shared memory (device -1)
or a CUDA allocation exported with cudaIpcGetMemHandle (device >= 0). It must be a base
allocation of its own (never a memory-pool chunk): a handle opens at the base, and refs carry
offsets from it.

Freed buffers go back to the slab's free list at once, or, when their query was abandoned and
a kernel may still write to them, to a quarantine that the sweeper drains after a grace period.
Only the broker creates and unlinks shared memory; `CREATED_HERE` lets a client in the same
process know a segment is the broker's, so it leaves the resource tracker alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any, Protocol

from common.errors import InvalidArgument, ResourceExhausted
from protos import broker_pb2
from shmbroker.allocator import ALIGNMENT, FreeList, align_up

log = logging.getLogger(__name__)

HOST_DEVICE = -1
SHM_DIR = "/dev/shm"
CREATED_HERE: set[str] = set()
# IPC handle -> device pointer of CUDA slabs allocated by this process: CUDA refuses to open a
# handle in the process that exported it, so an in-process client uses the pointer directly
LOCAL_CUDA: dict[bytes, int] = {}


class Memory(Protocol):
    """One exported allocation."""

    backend: broker_pb2.SlabBackend.ValueType
    nbytes: int
    shm_name: str
    ipc_handle: bytes

    def close(self) -> None: ...


class HostMemory:
    """A POSIX shared-memory segment, created (and later unlinked) by the broker only."""

    backend = broker_pb2.SLAB_BACKEND_HOST
    ipc_handle = b""

    def __init__(self, nbytes: int) -> None:
        # tmpfs pages are taken on first touch; a segment larger than what is left would
        # SIGBUS the stage that touches it, so refuse it here (Docker's default is 64 MiB)
        if os.path.isdir(SHM_DIR):
            st = os.statvfs(SHM_DIR)
            avail = st.f_bavail * st.f_frsize
            if avail < nbytes:
                raise ResourceExhausted(
                    f"{SHM_DIR} has {avail} bytes free, a slab needs {nbytes} (raise shm_size)"
                )
        self._shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self.nbytes = nbytes
        self.shm_name = self._shm.name
        CREATED_HERE.add(self.shm_name)

    def close(self) -> None:
        self._shm.close()
        self._shm.unlink()
        CREATED_HERE.discard(self.shm_name)


class CudaMemory:
    """A cudaMalloc'd block on one device (not from CuPy's pool), exported once."""

    backend = broker_pb2.SLAB_BACKEND_CUDA
    shm_name = ""

    def __init__(self, nbytes: int, device: int) -> None:
        import cupy

        with cupy.cuda.Device(device):
            try:
                self._mem: Any = cupy.cuda.Memory(nbytes)
            except (cupy.cuda.memory.OutOfMemoryError, cupy.cuda.runtime.CUDARuntimeError) as e:
                raise ResourceExhausted(f"device {device} cannot hold a {nbytes}-byte slab") from e
            self.ipc_handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self._mem.ptr))
        self.nbytes = nbytes
        LOCAL_CUDA[self.ipc_handle] = int(self._mem.ptr)

    def close(self) -> None:
        LOCAL_CUDA.pop(self.ipc_handle, None)
        self._mem = None


def synchronize_devices(devices: Iterable[int]) -> None:
    """A synchronize on each CUDA device: returns at once (the broker runs no kernel) unless the
    process's context there is lost, when it raises the fault."""
    import cupy

    for device in devices:
        with cupy.cuda.Device(device):
            cupy.cuda.runtime.deviceSynchronize()


def make_memory(device: int, nbytes: int) -> Memory:
    if device == HOST_DEVICE:
        return HostMemory(nbytes)
    return CudaMemory(nbytes, device)


@dataclass
class Slab:
    slab_id: str
    pool: str
    device: int
    generation: int
    memory: Memory
    space: FreeList
    # (ready at, offset) of buffers in quarantine, in release order
    quarantine: deque[tuple[float, int]] = field(default_factory=deque)
    quarantined_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.space.capacity

    def info(self) -> broker_pb2.SlabInfo:
        return broker_pb2.SlabInfo(
            slab_id=self.slab_id,
            generation=self.generation,
            backend=self.memory.backend,
            device=self.device,
            nbytes=self.nbytes,
            pool=self.pool,
            shm_name=self.memory.shm_name,
            ipc_handle=self.memory.ipc_handle,
        )

    def drain(self, now: float) -> int:
        """Frees the quarantined buffers whose grace period is over; returns the bytes freed."""
        freed = 0
        while self.quarantine and self.quarantine[0][0] <= now:
            _, offset = self.quarantine.popleft()
            freed += self.space.free(offset)
        self.quarantined_bytes -= freed
        return freed

    def stats(self) -> broker_pb2.SlabStats:
        usage = self.space.usage()
        return broker_pb2.SlabStats(
            slab_id=self.slab_id,
            pool=self.pool,
            device=self.device,
            nbytes=self.nbytes,
            used_bytes=usage.used_bytes - self.quarantined_bytes,
            quarantined_bytes=self.quarantined_bytes,
            fragmentation=usage.fragmentation,
            free_blocks=usage.free_blocks,
        )


class Slabs:
    """Every slab of one broker boot, grouped by (pool, device); each device is capped at
    `max_bytes`, or at `slabs_per_pool` slabs for each pool with slabs there where that is more
    (`cap`)."""

    def __init__(
        self,
        generation: int,
        *,
        slab_bytes: int,
        max_bytes: int,
        quarantine_s: float,
        slabs_per_pool: int = 0,
        devices: int,
        clock: Callable[[], float] = time.monotonic,
        memory: Callable[[int, int], Memory] = make_memory,
    ) -> None:
        if slab_bytes <= 0 or slab_bytes % ALIGNMENT:
            raise ValueError(f"slab_bytes {slab_bytes} is not a positive multiple of {ALIGNMENT}")
        self.generation = generation
        self.slab_bytes = slab_bytes
        self.max_bytes = max_bytes
        self.slabs_per_pool = slabs_per_pool
        self.quarantine_s = quarantine_s
        self.devices = devices  # CUDA devices this broker may use; 0 on a host-only node
        self._clock = clock
        self._memory = memory
        self._by_id: dict[str, Slab] = {}
        self._groups: dict[tuple[str, int], list[Slab]] = {}
        self._counter = 0

    def __iter__(self) -> Iterator[Slab]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, slab_id: str) -> Slab:
        return self._by_id[slab_id]

    def device_bytes(self, device: int) -> int:
        return sum(s.nbytes for s in self._by_id.values() if s.device == device)

    def cap(self, device: int, pool: str = "") -> int:
        """The most slab bytes `device` may hold once `pool` has slabs there."""
        pools = {p for p, d in self._groups if d == device} | ({pool} if pool else set())
        return max(self.max_bytes, self.slabs_per_pool * self.slab_bytes * len(pools))

    def check_device(self, device: int) -> None:
        if device != HOST_DEVICE and not 0 <= device < self.devices:
            raise InvalidArgument(
                f"device {device} does not exist here (cuda devices: {self.devices})"
            )

    def create(self, pool: str, device: int, nbytes: int) -> Slab:
        """A new slab for (pool, device), or RESOURCE_EXHAUSTED when the device cap is reached."""
        self.check_device(device)
        held, cap = self.device_bytes(device), self.cap(device, pool)
        if held + nbytes > cap:
            raise ResourceExhausted(
                f"no room: device {device} holds {held} bytes of slabs, a new {nbytes}-byte slab "
                f"would pass its cap of {cap} bytes"
            )
        memory = self._memory(device, nbytes)
        where = "host" if device == HOST_DEVICE else f"cuda{device}"
        slab = Slab(
            slab_id=f"{pool}.{where}.{self._counter}",
            pool=pool,
            device=device,
            generation=self.generation,
            memory=memory,
            space=FreeList(nbytes),
        )
        self._counter += 1
        self._by_id[slab.slab_id] = slab
        self._groups.setdefault((pool, device), []).append(slab)
        log.info("slab %s: %d bytes", slab.slab_id, nbytes)
        return slab

    def allocate(self, pool: str, device: int, nbytes: int) -> tuple[Slab, int]:
        """Room for nbytes in the pool's slabs on device: existing ones first, then a new one.

        Never waits: with no room it raises RESOURCE_EXHAUSTED, with a retry hint when buffers
        in quarantine will come free.
        """
        self.check_device(device)
        group = self._groups.get((pool, device), [])
        for slab in group:
            offset = slab.space.alloc(nbytes)
            if offset is not None:
                return slab, offset
        now = self._clock()
        for slab in group:
            if slab.drain(now):
                offset = slab.space.alloc(nbytes)
                if offset is not None:
                    return slab, offset
        size = max(self.slab_bytes, align_up(nbytes))
        try:
            slab = self.create(pool, device, size)
        except ResourceExhausted as e:
            ready = [q[0][0] for q in (s.quarantine for s in group) if q]
            retry_ms = max(1, int((min(ready) - now) * 1000) + 1) if ready else None
            raise ResourceExhausted(
                f"no room for {nbytes} bytes in pool {pool!r} on device {device}: {e.message}",
                retry_after_ms=retry_ms,
            ) from None
        offset = slab.space.alloc(nbytes)
        assert offset is not None  # a fresh slab of at least nbytes
        return slab, offset

    def free(self, slab_id: str, offset: int, *, quarantine: bool) -> int:
        """Returns a buffer (or sends it to quarantine); returns its aligned size."""
        slab = self._by_id[slab_id]
        if not quarantine or self.quarantine_s <= 0:
            return slab.space.free(offset)
        size = slab.space.size_of(offset)
        slab.quarantine.append((self._clock() + self.quarantine_s, offset))
        slab.quarantined_bytes += size
        return size

    def drain(self) -> int:
        now = self._clock()
        return sum(slab.drain(now) for slab in self._by_id.values())

    def close(self) -> None:
        """Frees and unlinks every slab (the end of this boot)."""
        for slab in self._by_id.values():
            try:
                slab.memory.close()
            except Exception:
                log.exception("closing slab %s", slab.slab_id)
        self._by_id.clear()
        self._groups.clear()
