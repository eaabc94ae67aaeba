"""A replica's green-context share: the SM groups it may use, and a stream that runs there.

A `GreenSlice` is one green context over a set of split groups plus a non-blocking stream made
in it. Work reaches those SMs by being launched *on that stream*; nothing is made current:
CuPy keeps the primary context current on the replica's thread, so its memory pool, cuBLAS
handles and compiled kernels stay where they are, and only the stream decides the SMs (the H100
probe ran CuPy matmuls this way, on primary-context memory, with correct results). Setting a
green context current instead would tie CuPy's per-device caches to a context that a resize
destroys, and a green context can be current to one thread at a time anyway.

`GreenShare` owns the process's split and the slice in force. A resize is two steps so the
caller can keep a batch on one slice: `prepare(groups)` builds the new slice (~1 ms, nothing
switches), `commit(pending)` makes it the current one and destroys the old one after its
stream drained. `switch()` wires both into a `ShareSwitch`, which commits only at batch
boundaries.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from common.errors import FailedPrecondition, InvalidArgument

from .driver import CudaCallError, call, driver
from .split import DEFAULT_SMS_PER_GROUP, DeviceSplit, check_groups, split_device
from .switch import ShareSwitch


def ensure_primary_context(device: int) -> None:
    """Makes CuPy create the device's primary context now; green contexts retain it, and the
    driver advises having it alive so each green context does not initialise it again."""
    import cupy

    with cupy.cuda.Device(device):
        cupy.cuda.runtime.free(0)


class GreenSlice:
    """One green context over `groups` and its stream; `close()` drains and destroys both."""

    def __init__(
        self,
        device: int,
        groups: tuple[int, ...],
        green_ctx: Any,
        cu_stream: Any,
        multiprocessors: int,
        build_us: int,
    ) -> None:
        import cupy

        self.device = device
        self.groups = groups
        self.multiprocessors = multiprocessors
        self.build_us = build_us
        self._green_ctx = green_ctx
        self._cu_stream = cu_stream
        self.handle = int(cu_stream)
        # CuPy's view of the same stream: `with slice.stream:` sends CuPy work to these SMs
        with warnings.catch_warnings():
            # CuPy 14 deprecates ExternalStream in favour of Stream.from_external, which wants an
            # object with __cuda_stream__; a raw CUstream handle is what the driver gives us.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.stream = cupy.cuda.ExternalStream(self.handle, device_id=device)
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def synchronize(self) -> None:
        call("cuStreamSynchronize", self._cu_stream)

    def close(self) -> None:
        """Waits for the stream's work, gives its pooled memory back, destroys stream and context.

        Idempotent. Every step is attempted; the first failure is raised after the rest ran.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        first: BaseException | None = None
        for step in (self.synchronize, self._free_pooled, self._destroy_stream, self._destroy_ctx):
            try:
                step()
            except Exception as e:  # keep destroying: a leaked green context holds its SMs' state
                first = first or e
        if first is not None:
            raise first

    def _free_pooled(self) -> None:
        # CuPy pools freed blocks per stream; blocks left in this stream's arena would never be
        # reused by the next slice's stream, so each resize would strand a batch's memory.
        # The default pool serves the thread's current device: name ours, whoever calls.
        import cupy

        with cupy.cuda.Device(self.device):
            cupy.get_default_memory_pool().free_all_blocks(stream=self.stream)

    def _destroy_stream(self) -> None:
        call("cuStreamDestroy", self._cu_stream)

    def _destroy_ctx(self) -> None:
        call("cuGreenCtxDestroy", self._green_ctx)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"stream=0x{self.handle:x}"
        return f"GreenSlice(device={self.device}, groups={list(self.groups)}, {state})"


# A slice built by `prepare` and not yet committed.
PendingShare = GreenSlice


def build_slice(
    split: DeviceSplit, groups: Sequence[int], descs: dict[tuple[int, ...], Any] | None = None
) -> GreenSlice:
    """A green context over exactly `groups` of `split`, and a non-blocking stream in it.

    `descs` caches resource descriptors per group set (the driver keeps each one alive for the
    process's life, so building one per resize would only accumulate them).
    """
    cu = driver()
    chosen = check_groups(groups, split.info.n_groups)
    t0 = time.perf_counter_ns()
    desc = descs.get(chosen) if descs is not None else None
    if desc is None:
        resources = split.resources_for(chosen)
        desc = call("cuDevResourceGenerateDesc", resources, len(resources))
        if descs is not None:
            descs[chosen] = desc
    flags = int(cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
    green_ctx = call("cuGreenCtxCreate", desc, split.cu_device, flags)
    try:
        non_blocking = int(cu.CUstream_flags.CU_STREAM_NON_BLOCKING)
        cu_stream = call("cuGreenCtxStreamCreate", green_ctx, non_blocking, 0)
        try:
            sm_type = cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
            resource = call("cuGreenCtxGetDevResource", green_ctx, sm_type)
            multiprocessors = int(resource.sm.smCount)
            build_us = (time.perf_counter_ns() - t0) // 1000
            return GreenSlice(
                split.info.device, chosen, green_ctx, cu_stream, multiprocessors, build_us
            )
        except BaseException:
            with contextlib.suppress(CudaCallError):  # the first error is the one to report
                call("cuStreamDestroy", cu_stream)
            raise
    except BaseException:
        with contextlib.suppress(CudaCallError):
            call("cuGreenCtxDestroy", green_ctx)
        raise


class GreenShare:
    """The green-context share of one replica process on one device.

    Thread model: `prepare` may run on any thread; `commit` must run where no batch is using
    the current slice (between batches on the replica's GPU thread, or through `switch()`).
    """

    def __init__(self, split: DeviceSplit, groups: Sequence[int]) -> None:
        """Builds the first slice over `groups` of this process's `split` (see `create`)."""
        self.split = split
        self._descs: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._current = build_slice(split, groups, self._descs)

    @classmethod
    def create(
        cls,
        device: int,
        groups: Sequence[int],
        *,
        sms_per_group: int = DEFAULT_SMS_PER_GROUP,
        split: DeviceSplit | None = None,
    ) -> GreenShare:
        """Splits the device (unless given this process's `split`) and builds the first slice."""
        ensure_primary_context(device)
        if split is None:
            split = split_device(device, sms_per_group)
        elif split.info.device != device:
            raise InvalidArgument(f"split is of device {split.info.device}, not {device}")
        return cls(split, groups)

    @property
    def current(self) -> GreenSlice:
        return self._current

    @property
    def stream(self) -> Any:
        """The current slice's CuPy stream (take it once per batch: a commit replaces it)."""
        return self._current.stream

    @property
    def multiprocessors(self) -> int:
        return self._current.multiprocessors

    @property
    def groups(self) -> tuple[int, ...]:
        return self._current.groups

    def prepare(self, groups: Sequence[int]) -> PendingShare:
        """Builds a slice over `groups`; nothing switches until `commit`."""
        if self._closed:
            raise FailedPrecondition("green share is closed")
        with self._lock:
            return build_slice(self.split, groups, self._descs)

    def commit(self, pending: PendingShare) -> int:
        """Makes `pending` the current slice and destroys the old one after its stream drained.

        Call between batches. Returns the microseconds it took (mostly the old stream's drain).
        """
        t0 = time.perf_counter_ns()
        with self._lock:
            if self._closed:
                raise FailedPrecondition("green share is closed")
            if pending is self._current:
                return 0
            if pending.closed or pending.device != self.split.info.device:
                raise FailedPrecondition(f"cannot commit {pending!r}")
            old, self._current = self._current, pending
        old.close()
        return (time.perf_counter_ns() - t0) // 1000

    def discard(self, pending: PendingShare) -> None:
        """Destroys a prepared slice that will never be committed."""
        if pending is self._current:
            raise FailedPrecondition("cannot discard the slice in force")
        pending.close()

    def resize(self, groups: Sequence[int]) -> int:
        """`prepare` then `commit`, for a caller already at a batch boundary; returns apply µs."""
        t0 = time.perf_counter_ns()
        pending = self.prepare(groups)
        try:
            self.commit(pending)
        except BaseException:
            if pending is not self._current:
                pending.close()
            raise
        return (time.perf_counter_ns() - t0) // 1000

    def switch(self) -> ShareSwitch[GreenSlice]:
        """A `ShareSwitch` over this share's slices: it commits requested slices at batch
        boundaries and discards ones superseded before they were used."""

        def on_swap(_old: GreenSlice, new: GreenSlice) -> None:
            self.commit(new)

        return ShareSwitch(self._current, on_swap=on_swap, on_discard=self.discard)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._current.close()


__all__ = [
    "CudaCallError",
    "GreenShare",
    "GreenSlice",
    "PendingShare",
    "build_slice",
    "ensure_primary_context",
]
