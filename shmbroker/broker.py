"""The broker itself, without gRPC: slabs, leases, signed refs, the sweeper and statistics.

Every method runs on the server's event loop thread, so the state needs no locks; nothing here
awaits except the sweeper loop. The generation is the wall clock in nanoseconds at boot, so a
later boot has a larger one and refs that outlive a restart are recognised as stale. The key that
signs refs leaves the process only through the key socket (`keys.py`), to trusted local peers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from common import metrics
from common.backend import Backend
from common.devicefault import device_fault, exit_now
from common.dtypes import nbytes_of
from common.errors import CamelotError, DeviceFault, InvalidArgument, ResourceExhausted
from protos import broker_pb2, tensor_pb2
from shmbroker import keys, refs
from shmbroker.allocator import ALIGNMENT
from shmbroker.leases import Buffer, EndReason, Lease, LeaseTable
from shmbroker.slabs import HOST_DEVICE, Memory, Slabs, make_memory, synchronize_devices

log = logging.getLogger(__name__)

MAX_ITEMS = 1024  # buffers per Allocate call
RATE_WINDOW_S = 10.0
# An arena of the default size is this fraction of a slab (64 MiB of CUDA's 1 GiB): every gateway
# worker borrows one per pool at start, and a busy one more (arena.MAX_ARENAS_PER_POOL). At a
# quarter, eight workers and four pipelines held all 8 GiB of a device's default cap, and half the
# workers of an H100 mesh could not start (docs/results/peak-load-h100-ref4-9b918cc.md).
ARENA_SLAB_FRACTION = 16


@dataclass(frozen=True)
class BrokerConfig:
    """What the domain needs from the process settings."""

    node: str
    backend: Backend
    slab_bytes: int
    max_bytes: int
    lease_ttl_s: float
    quarantine_s: float
    sweep_interval_s: float
    # the cap is at least this many slabs for each pool with slabs on the device (0: max_bytes
    # alone; `Slabs.cap`)
    slabs_per_pool: int = 0
    # where the ref key is served ("" for nowhere), and the group trusted beside the user (-1:
    # none)
    key_socket: str = ""
    socket_gid: int = -1


def cuda_device_count() -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        memory: Callable[[int, int], Memory] = make_memory,
        context_check: Callable[[Iterable[int]], None] = synchronize_devices,
        on_fault: Callable[[DeviceFault], None] = lambda f: exit_now(f, "broker"),
    ) -> None:
        self.config = config
        # each sweep, a call into the CUDA context of every device with a slab: a fatal fault
        # there (an MPS client's whole server failed) ends the process (`on_fault`)
        self._context_check = context_check
        self.on_fault = on_fault
        self.node = config.node
        self.backend = config.backend
        self.generation = time.time_ns()
        self.ref_key = refs.new_key()
        devices = cuda_device_count() if config.backend is Backend.CUDA else 0
        self.slabs = Slabs(
            self.generation,
            slab_bytes=config.slab_bytes,
            max_bytes=config.max_bytes,
            slabs_per_pool=config.slabs_per_pool,
            quarantine_s=config.quarantine_s,
            devices=devices,
            clock=clock,
            memory=memory,
        )
        self.leases = LeaseTable(config.lease_ttl_s, clock=clock)
        self._clock = clock
        self.allocations_total = 0
        self.exhausted_total = 0
        self.expired_total = 0
        self.reclaimed_total = 0
        self._rate: deque[tuple[float, int]] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self.keys = (
            keys.KeyServer(
                config.key_socket,
                self.generation,
                self.ref_key,
                keys.Trust.of_this_process(config.socket_gid),
                config.socket_gid,
            )
            if config.key_socket
            else None
        )
        self._keys_task: asyncio.Task[None] | None = None

    @property
    def default_device(self) -> int:
        return 0 if self.backend is Backend.CUDA else HOST_DEVICE

    # -- lifecycle ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Creates the default pool's first slab, so a SERVING broker has memory to lend."""
        if len(self.slabs) == 0:
            self.slabs.create("default", self.default_device, self.config.slab_bytes)

    def start(self) -> None:
        """Starts the sweeper and the key socket on the running loop."""
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep_forever())
        if self.keys is not None and self._keys_task is None:
            self.keys.listen()
            self._keys_task = loop.create_task(self.keys.start())

    async def close(self) -> None:
        """Stops the sweeper and the key socket and frees (unlinks) every slab."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        if self.keys is not None:
            if self._keys_task is not None:
                await self._keys_task
                self._keys_task = None
            await self.keys.close()
        self.slabs.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed; continuing")
            self.check_context()

    def check_context(self) -> None:
        """Whether the CUDA context that holds the slabs still works. The broker launches no
        kernel, so only this call sees a fault that took its context: under MPS a fatal fault
        in any client reaches every client of the GPU's server, which takes no new client (no
        replica restarts) until all the old ones have exited, this one too."""
        devices = sorted({s.device for s in self.slabs if s.device >= 0})
        if not devices:
            return
        try:
            self._context_check(devices)
        except Exception as e:
            fault = device_fault(e, "", who="the broker", then="the broker restarts")
            if fault is None:
                log.warning("CUDA context check failed (not a fatal fault): %r", e)
                return
            log.error("%s", fault.message)
            self.on_fault(fault)

    # -- operations --------------------------------------------------------------------------

    def describe(self) -> broker_pb2.DescribeResponse:
        """The slab table. Never the ref key, on any listener: only the key socket serves it."""
        backend = (
            broker_pb2.SLAB_BACKEND_CUDA
            if self.backend is Backend.CUDA
            else broker_pb2.SLAB_BACKEND_HOST
        )
        return broker_pb2.DescribeResponse(
            slabs=[slab.info() for slab in self.slabs],
            generation=self.generation,
            node=self.node,
            backend=backend,
            alignment=ALIGNMENT,
        )

    def open_lease(self, pool: str, owner_pid: int, ttl_s: float, label: str) -> broker_pb2.Lease:
        return _lease_pb(self.leases.open(pool, owner_pid, ttl_s, label))

    def renew(self, lease_id: str, ttl_s: float) -> broker_pb2.Lease:
        return _lease_pb(self.leases.renew(lease_id, ttl_s))

    def closed_leases(self, lease_ids: Sequence[str]) -> list[broker_pb2.ClosedLease]:
        """The leases among lease_ids that are not open, each with its status; changes none."""
        if len(lease_ids) > MAX_ITEMS:
            raise InvalidArgument(f"{len(lease_ids)} leases in one CheckLeases, over {MAX_ITEMS}")
        closed = []
        for lease_id in lease_ids:
            try:
                self.leases.get(lease_id)
            except CamelotError as e:
                closed.append(
                    broker_pb2.ClosedLease(
                        lease_id=lease_id, code=e.code.value[0], message=e.message
                    )
                )
        return closed

    def open_and_allocate(
        self, open_: broker_pb2.OpenLeaseRequest, items: Sequence[broker_pb2.Allocation]
    ) -> tuple[broker_pb2.Lease, list[tensor_pb2.TensorRef]]:
        """Opens a lease and allocates the items with no lease_id under it; all or nothing (the
        lease goes with its buffers when they cannot be had)."""
        lease = self.open_lease(open_.pool, open_.owner_pid, open_.ttl_s, open_.label)
        todo = [
            broker_pb2.Allocation(
                lease_id=i.lease_id or lease.lease_id, dtype=i.dtype, shape=i.shape, device=i.device
            )
            for i in items
        ]
        try:
            return lease, self.allocate(todo)
        except Exception:
            self.release([lease.lease_id], EndReason.DONE)
            raise

    def lend_arena(self, request: broker_pb2.LendArenaRequest) -> broker_pb2.Arena:
        """A lease holding one buffer of request.nbytes, which its holder sub-allocates."""
        default = self.config.slab_bytes // ARENA_SLAB_FRACTION // ALIGNMENT * ALIGNMENT
        nbytes = request.nbytes or max(ALIGNMENT, default)
        if nbytes > self.config.slab_bytes:
            raise InvalidArgument(
                f"an arena of {nbytes} bytes is larger than a slab ({self.config.slab_bytes} bytes)"
            )
        lease = self.leases.open(request.pool, request.owner_pid, request.ttl_s, request.label)
        lease.arena = True
        try:
            (ref,) = self.allocate(
                [
                    broker_pb2.Allocation(
                        lease_id=lease.lease_id,
                        dtype=tensor_pb2.DTYPE_UINT8,
                        shape=[nbytes],
                        device=request.device,
                    )
                ]
            )
        except Exception:
            self.release([lease.lease_id], EndReason.DONE)
            raise
        log.info(
            "arena %s of %d bytes lent to pid %d (%s)",
            lease.lease_id,
            nbytes,
            request.owner_pid,
            request.label,
        )
        return broker_pb2.Arena(lease=_lease_pb(lease), ref=ref)

    def allocate(self, items: Sequence[broker_pb2.Allocation]) -> list[tensor_pb2.TensorRef]:
        """One buffer per item, all or nothing; RESOURCE_EXHAUSTED at once when there is no room."""
        if len(items) > MAX_ITEMS:
            raise InvalidArgument(f"{len(items)} items in one Allocate, over {MAX_ITEMS}")
        # check everything before taking any memory
        plan: list[tuple[Lease, int, int]] = []
        for item in items:
            lease = self.leases.get(item.lease_id)
            if lease.arena and lease.buffers:
                raise InvalidArgument(
                    f"lease {item.lease_id} is an arena: its holder allocates inside it"
                )
            nbytes = nbytes_of(item.dtype, item.shape)
            device = item.device if self.backend is Backend.CUDA else HOST_DEVICE
            self.slabs.check_device(device)
            plan.append((lease, device, nbytes))
        out: list[tensor_pb2.TensorRef] = []
        taken: list[tuple[Lease, Buffer]] = []
        try:
            for item, (lease, device, nbytes) in zip(items, plan, strict=True):
                slab, offset = self.slabs.allocate(lease.pool, device, nbytes)
                buf = Buffer(slab.slab_id, offset, nbytes)
                lease.buffers.append(buf)
                taken.append((lease, buf))
                ref = tensor_pb2.TensorRef(
                    slab_id=slab.slab_id,
                    slab_generation=self.generation,
                    offset=offset,
                    nbytes=nbytes,
                    dtype=item.dtype,
                    shape=item.shape,
                    lease_id=lease.lease_id,
                )
                ref.tag = refs.sign(self.ref_key, ref)
                out.append(ref)
        except Exception as e:
            for lease, buf in taken:
                lease.buffers.remove(buf)
                self.slabs.free(buf.slab_id, buf.offset, quarantine=False)
            if isinstance(e, ResourceExhausted):
                self.exhausted_total += 1
            raise
        self.allocations_total += len(out)
        return out

    def release(self, lease_ids: Sequence[str], reason: EndReason) -> tuple[int, int]:
        """Ends the open leases among lease_ids; returns (ended, bytes freed or quarantined)."""
        released = 0
        freed = 0
        for lease_id in lease_ids:
            lease = self.leases.end(lease_id, reason)
            if lease is None:
                continue  # unknown or already ended: release is idempotent
            released += 1
            for buf in lease.buffers:
                freed += self.slabs.free(buf.slab_id, buf.offset, quarantine=reason.quarantines)
            if reason is not EndReason.DONE:
                log.info(
                    "lease %s (%s, pid %d) ended: %s, %d buffers",
                    lease_id,
                    lease.label,
                    lease.owner_pid,
                    reason.value,
                    len(lease.buffers),
                )
        return released, freed

    def sweep(self) -> None:
        """Ends expired and orphaned leases, drains quarantine, samples the rate, sets gauges."""
        expired = self.leases.expired()
        self.expired_total += self.release(expired, EndReason.EXPIRED)[0]
        orphaned = self.leases.orphaned()
        self.reclaimed_total += self.release(orphaned, EndReason.OWNER_DIED)[0]
        self.slabs.drain()
        now = self._clock()
        self._rate.append((now, self.allocations_total))
        while len(self._rate) > 2 and now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        self._set_gauges()

    def _set_gauges(self) -> None:
        used: dict[tuple[str, str], int] = {}
        held: dict[tuple[str, str], int] = {}
        for slab in self.slabs:
            key = (slab.pool, str(slab.device))
            stats = slab.stats()
            used[key] = used.get(key, 0) + stats.used_bytes
            held[key] = held.get(key, 0) + slab.nbytes
        for key, value in used.items():
            metrics.BROKER_USED_BYTES.labels(*key).set(value)
        for key, value in held.items():
            metrics.BROKER_SLAB_BYTES.labels(*key).set(value)
        metrics.BROKER_LIVE_LEASES.set(sum(1 for lease in self.leases if not lease.arena))

    def allocations_per_s(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def stats(self) -> broker_pb2.StatsResponse:
        slabs = [slab.stats() for slab in self.slabs]
        leases = [lease for lease in self.leases if not lease.arena]
        arenas = [lease for lease in self.leases if lease.arena]
        return broker_pb2.StatsResponse(
            slabs=slabs,
            live_leases=len(leases),
            live_buffers=sum(len(lease.buffers) for lease in leases),
            live_arenas=len(arenas),
            arena_bytes=sum(b.nbytes for lease in arenas for b in lease.buffers),
            used_bytes=sum(s.used_bytes for s in slabs),
            allocations_per_s=self.allocations_per_s(),
            allocations_total=self.allocations_total,
            exhausted_total=self.exhausted_total,
            expired_total=self.expired_total,
            reclaimed_total=self.reclaimed_total,
            generation=self.generation,
        )


def _lease_pb(lease: Lease) -> broker_pb2.Lease:
    return broker_pb2.Lease(
        lease_id=lease.lease_id, pool=lease.pool, expires_unix_us=lease.expires_unix_us
    )
