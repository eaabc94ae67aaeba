"""The broker's client library, used by stages and the gateway (asyncio, grpc.aio).

    client = await BrokerClient.connect("unix:/tmp/camelot/broker.sock")
    lease = await client.open_lease("resnet", label=query_id)
    ref, out = await client.alloc_array(lease, np.float16, (32, 1000))   # writable view
    ... send ref (a few hundred bytes) to the next stage, which does:
    x = await client.view(ref)             # zero-copy NumPy or CuPy array, checked
    await client.release([lease])          # when the query is done

A process opens each slab once and keeps it; `view` checks a ref before touching memory: its
slab is known (the table is fetched again once when it is not, or when the ref is of a newer
generation, or when the channel to the broker dropped), its generation is the broker's current
one (older: FAILED_PRECONDITION, "stale"), its tag verifies (else INVALID_ARGUMENT, "forged"),
it lies inside the slab, and dtype × shape is its size. Every RPC carries a deadline, and a
failed RPC is raised as the matching `common.errors` class.

The key that verifies (and, for arenas, signs) refs comes from the broker's key socket beside
its Unix socket (`shmbroker.keys`), which serves only the broker's user (and socket group). A
client of a TCP target has no key: it can lease and allocate, but every view or signature
raises PERMISSION_DENIED rather than take a ref it cannot check.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from common.backend import Backend
from common.dtypes import from_numpy, nbytes_of, to_numpy
from common.errors import (
    BadRef,
    CamelotError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    StaleRef,
    Unavailable,
    error_for_status,
    from_rpc_error,
)
from common.lifecycle import TlsFiles, channel
from protos import broker_pb2, broker_pb2_grpc, tensor_pb2
from shmbroker import keys, refs
from shmbroker.mapping import Mapping, open_slab

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 5.0
T = TypeVar("T")
DTypeLike = np.dtype[Any] | type
# (wire dtype, shape) -> (NumPy dtype, bytes) of the refs seen, bounded (a ref's shape is the
# sender's to choose)
MAX_LAYOUTS = 1024
# Describe and the key socket are two calls: a broker that restarts between them gives a key of
# another generation than the table, and the pair is fetched again, this many times at most
KEY_ATTEMPTS = 3


class NeedsRefresh(BadRef):
    """`view_cached` met a slab or generation this process has not loaded: await `view`."""


class BrokerClient:
    def __init__(
        self, channel: grpc.aio.Channel, *, pid: int, deadline_s: float, key_path: str = ""
    ) -> None:
        self._channel = channel
        self.key_path = key_path
        self._stub = broker_pb2_grpc.BrokerStub(channel)
        self.pid = pid
        self.deadline_s = deadline_s
        self.generation = 0
        self.node = ""
        self.backend = Backend.HOST
        self._key = b""
        self._infos: dict[str, broker_pb2.SlabInfo] = {}
        self._open: dict[str, Mapping] = {}
        self._layouts: dict[tuple[int, tuple[int, ...]], tuple[np.dtype[Any], int]] = {}
        self._dirty = False
        self._refresh_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        pid: int | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        tls: TlsFiles | None = None,
    ) -> BrokerClient:
        """Connects, loads the slab table and, on a Unix target, the ref key (PERMISSION_DENIED
        when the broker does not trust this process with it). pid owns the leases (default: this
        process; 0: none, so they end only by release or TTL). tls: mutual TLS to a TCP target."""
        ch = channel(target, tls, interceptors)
        client = cls(
            ch,
            pid=os.getpid() if pid is None else pid,
            deadline_s=deadline_s,
            key_path=keys.key_path_of_target(target),
        )
        try:
            await client.refresh()
        except BaseException:
            await ch.close()
            raise
        client._watcher = asyncio.get_running_loop().create_task(client._watch_channel())
        return client

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None
        self._close_mappings()
        await self._channel.close()

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await method(request, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from e

    # -- slab table --------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetches the slab table (Describe), and the key of a new generation from the key
        socket; a new generation drops every opened slab."""
        async with self._refresh_lock:
            resp, key = await self._describe()
            self._dirty = False
            if resp.generation != self.generation:
                if self.generation:
                    log.info("broker generation %d -> %d", self.generation, resp.generation)
                self._close_mappings()
            self.generation = resp.generation
            self.node = resp.node
            self._key = key
            self.backend = (
                Backend.CUDA if resp.backend == broker_pb2.SLAB_BACKEND_CUDA else Backend.HOST
            )
            self._infos = {info.slab_id: info for info in resp.slabs}

    async def _describe(self) -> tuple[broker_pb2.DescribeResponse, bytes]:
        """The slab table and its generation's key (b"" without a key socket)."""
        for _ in range(KEY_ATTEMPTS):
            resp: broker_pb2.DescribeResponse = await self._call(
                self._stub.Describe, broker_pb2.DescribeRequest()
            )
            if not self.key_path:
                return resp, b""
            if resp.generation == self.generation and self._key:
                return resp, self._key
            generation, key = await keys.fetch_key(self.key_path, self.deadline_s)
            if generation == resp.generation:
                return resp, key
            log.info("broker restarted between Describe and its key socket; asking again")
        raise Unavailable(f"the broker at {self.key_path} kept restarting while connecting")

    @property
    def dirty(self) -> bool:
        """True when the channel dropped since the table was loaded (the broker may be new)."""
        return self._dirty

    @property
    def ref_key(self) -> bytes:
        """The key that signs this broker boot's refs (a process that sub-allocates an arena
        signs its refs with it); PERMISSION_DENIED for a client without one."""
        if not self._key:
            raise self._no_key()
        return self._key

    def _no_key(self) -> PermissionDenied:
        return PermissionDenied(
            "this broker client has no ref key (only a client of the broker's Unix socket gets "
            "it): it can neither check nor sign refs"
        )

    def pool_of(self, slab_id: str) -> str:
        """The pool a slab of the loaded table serves; "" for a slab not in it."""
        info = self._infos.get(slab_id)
        return info.pool if info is not None else ""

    def open_all(self) -> None:
        """Opens every slab known now (a warm-up, so that no request pays for it)."""
        for slab_id in self._infos:
            self._mapping(slab_id)

    def _mapping(self, slab_id: str) -> Mapping:
        mapping = self._open.get(slab_id)
        if mapping is None:
            mapping = open_slab(self._infos[slab_id])
            self._open[slab_id] = mapping
        return mapping

    def _close_mappings(self) -> None:
        for mapping in self._open.values():
            mapping.close()
        self._open.clear()
        self._infos = {}

    async def _watch_channel(self) -> None:
        # a dropped connection may mean a broker restart: check the table before the next view
        state = self._channel.get_state(try_to_connect=False)
        while True:
            try:
                await self._channel.wait_for_state_change(state)
                new = self._channel.get_state(try_to_connect=False)
            except Exception:
                log.exception("broker channel watch stopped")
                self._dirty = True
                return
            if state is grpc.ChannelConnectivity.READY and new is not state:
                self._dirty = True
            state = new

    # -- leases and buffers ------------------------------------------------------------------

    async def open_lease(self, pool: str = "default", ttl_s: float = 0.0, label: str = "") -> str:
        lease: broker_pb2.Lease = await self._call(
            self._stub.OpenLease,
            broker_pb2.OpenLeaseRequest(pool=pool, owner_pid=self.pid, ttl_s=ttl_s, label=label),
        )
        return lease.lease_id

    async def renew(self, lease_id: str, ttl_s: float = 0.0) -> broker_pb2.Lease:
        return await self._call(
            self._stub.Renew, broker_pb2.RenewRequest(lease_id=lease_id, ttl_s=ttl_s)
        )

    async def allocate(
        self, items: Sequence[tuple[str, DTypeLike, tuple[int, ...]]], device: int = 0
    ) -> list[tensor_pb2.TensorRef]:
        """One buffer per (lease_id, dtype, shape), in one RPC; all or nothing."""
        request = broker_pb2.AllocateRequest(
            items=[
                broker_pb2.Allocation(
                    lease_id=lease_id,
                    dtype=from_numpy(np.dtype(dtype)),
                    shape=[int(d) for d in shape],
                    device=device,
                )
                for lease_id, dtype, shape in items
            ]
        )
        resp: broker_pb2.AllocateResponse = await self._call(self._stub.Allocate, request)
        return list(resp.refs)

    async def open_and_allocate(
        self,
        items: Sequence[tuple[DTypeLike, tuple[int, ...]]],
        *,
        pool: str = "default",
        ttl_s: float = 0.0,
        label: str = "",
        device: int = 0,
    ) -> tuple[str, list[tensor_pb2.TensorRef]]:
        """Opens a lease and allocates (dtype, shape) buffers under it, in one RPC."""
        request = broker_pb2.AllocateRequest(
            items=[
                broker_pb2.Allocation(
                    dtype=from_numpy(np.dtype(dtype)), shape=[int(d) for d in shape], device=device
                )
                for dtype, shape in items
            ],
            open=broker_pb2.OpenLeaseRequest(
                pool=pool, owner_pid=self.pid, ttl_s=ttl_s, label=label
            ),
        )
        resp: broker_pb2.AllocateResponse = await self._call(self._stub.Allocate, request)
        return resp.lease.lease_id, list(resp.refs)

    async def lend_arena(
        self,
        *,
        pool: str = "default",
        device: int = 0,
        nbytes: int = 0,
        ttl_s: float = 0.0,
        label: str = "",
    ) -> broker_pb2.Arena:
        """Borrows an arena (nbytes 0: the broker's default size) owned by this process, and
        opens its slab here."""
        arena: broker_pb2.Arena = await self._call(
            self._stub.LendArena,
            broker_pb2.LendArenaRequest(
                pool=pool,
                device=device,
                nbytes=nbytes,
                owner_pid=self.pid,
                ttl_s=ttl_s,
                label=label,
            ),
        )
        await self.view(arena.ref)  # loads the table if the slab is new, and opens it
        return arena

    async def warm_pool(self, pool: str, device: int = 0) -> bool:
        """Makes sure `pool` has a slab on `device` and this process has it open (a one-byte
        lease), so a first query pays no slab open (0.1-0.2 s on CUDA). False (and a warning)
        where the device's slabs are full: a warm-up is no condition for serving, and a process
        that died of it (gateway workers, stage replicas on a full H100) served nothing at all;
        the slab then opens at the pool's first ref."""
        try:
            lease, _ = await self.open_and_allocate(
                [(np.uint8, (1,))], pool=pool, ttl_s=10.0, label="warm-up", device=device
            )
        except ResourceExhausted as e:
            log.warning("pool %s on device %d not warmed: %s", pool, device, e.message)
            return False
        try:
            self.open_all()
        finally:
            await self.release([lease])
        return True

    async def alloc_array(
        self, lease_id: str, dtype: DTypeLike, shape: tuple[int, ...], device: int = 0
    ) -> tuple[tensor_pb2.TensorRef, Any]:
        """One buffer and a writable view of it."""
        (ref,) = await self.allocate([(lease_id, dtype, shape)], device)
        return ref, await self.view(ref)

    async def release(
        self, lease_ids: Sequence[str], *, aborted: bool = False
    ) -> broker_pb2.ReleaseResponse:
        """Ends leases (idempotent). aborted: a producer may still write, so the broker
        quarantines the buffers for a grace period before reuse."""
        reason = broker_pb2.RELEASE_REASON_ABORTED if aborted else broker_pb2.RELEASE_REASON_DONE
        return await self._call(
            self._stub.Release, broker_pb2.ReleaseRequest(lease_ids=list(lease_ids), reason=reason)
        )

    async def closed_leases(self, lease_ids: Sequence[str]) -> dict[str, CamelotError]:
        """The leases among lease_ids that are not open, each with the error a use of it gets
        (FailedPrecondition when it was released, expired or reclaimed; NotFound when the broker
        never issued it or forgot it long ago). One RPC; changes nothing."""
        resp: broker_pb2.CheckLeasesResponse = await self._call(
            self._stub.CheckLeases, broker_pb2.CheckLeasesRequest(lease_ids=list(lease_ids))
        )
        return {c.lease_id: error_for_status(c.code, c.message) for c in resp.closed}

    async def stats(self) -> broker_pb2.StatsResponse:
        return await self._call(self._stub.Stats, broker_pb2.StatsRequest())

    # -- views -------------------------------------------------------------------------------

    async def view(self, ref: tensor_pb2.TensorRef) -> Any:
        """A zero-copy array (NumPy on host slabs, CuPy on the slab's device) of the ref."""
        if self._dirty or ref.slab_generation > self.generation or ref.slab_id not in self._infos:
            await self.refresh()
        return self._view(ref)

    def view_cached(self, ref: tensor_pb2.TensorRef) -> Any:
        """`view` without I/O; NeedsRefresh when the slab table must be fetched first."""
        return self._view(ref, cached=True)

    def _view(self, ref: tensor_pb2.TensorRef, cached: bool = False) -> Any:
        # every field read once: a ref is checked at every hop of every query, and a protobuf
        # field read costs about as much as the check that uses it
        slab_id, generation = ref.slab_id, ref.slab_generation
        info = self._infos.get(slab_id)
        if cached and (self._dirty or generation > self.generation or info is None):
            raise NeedsRefresh(f"slab {slab_id!r} is not loaded in this process yet")
        if generation < self.generation:
            raise StaleRef(
                f"stale ref: generation {generation} is older than the broker's "
                f"{self.generation} (the broker restarted)"
            )
        if generation > self.generation:
            raise BadRef(f"ref generation {generation} is newer than the broker's")
        if info is None:
            raise BadRef(f"unknown slab {slab_id!r}")
        offset, nbytes, wire_dtype, shape = ref.offset, ref.nbytes, ref.dtype, tuple(ref.shape)
        key = self._key
        if not key:
            # anyone can compute a tag under the empty key: no key must mean no ref accepted
            raise self._no_key()
        tag = refs.tag_of(key, slab_id, generation, offset, nbytes, wire_dtype, shape, ref.lease_id)
        if not hmac.compare_digest(tag, ref.tag):
            raise BadRef("forged ref: its tag does not match")
        if offset + nbytes > info.nbytes:
            raise BadRef(
                f"ref [{offset}, {offset + nbytes}) lies outside slab "
                f"{slab_id} of {info.nbytes} bytes"
            )
        layout = self._layouts.get((wire_dtype, shape))
        if layout is None:
            try:
                layout = (to_numpy(wire_dtype), nbytes_of(wire_dtype, shape))
            except InvalidArgument as e:
                raise BadRef(f"bad ref: {e.message}") from None
            if len(self._layouts) < MAX_LAYOUTS:
                self._layouts[(wire_dtype, shape)] = layout
        dtype, want = layout
        if want != nbytes:
            raise BadRef(
                f"ref nbytes {nbytes} != {dtype} x {list(shape)} = "
                f"{dtype.itemsize * math.prod(shape)} bytes"
            )
        mapping = self._open.get(slab_id)
        if mapping is None:
            mapping = self._mapping(slab_id)
        return mapping.view(offset, nbytes, dtype, shape)
