"""Opening broker slabs in a client process: once per slab, then array views with no copy.

Host slabs are attached as POSIX shared memory. Python before 3.13 registers even an attached
segment with the resource tracker, which would unlink it when this process exits; so the
client unregisters it (unless the broker runs in this very process and owns the segment).

CUDA slabs are opened with cudaIpcOpenMemHandle on the slab's device. The handle names the
whole base allocation; a view is `MemoryPointer(base, offset)` wrapped in a `cupy.ndarray`.
"""

from __future__ import annotations

import logging
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Protocol

import numpy as np

from common.errors import BadRef
from protos import broker_pb2
from shmbroker.slabs import CREATED_HERE, LOCAL_CUDA

log = logging.getLogger(__name__)

# attached segments still viewed when their client closed: kept mapped until process exit
# rather than letting SharedMemory.__del__ fail on the live exports
_PINNED: list[shared_memory.SharedMemory] = []


class Mapping(Protocol):
    info: broker_pb2.SlabInfo

    def view(self, offset: int, nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
        """An array of dtype and shape over [offset, offset + nbytes) of the slab."""
        ...

    def close(self) -> None: ...


class HostMapping:
    def __init__(self, info: broker_pb2.SlabInfo) -> None:
        self.info = info
        try:
            if sys.version_info >= (3, 13):
                self._shm = shared_memory.SharedMemory(name=info.shm_name, track=False)
            else:
                self._shm = shared_memory.SharedMemory(name=info.shm_name)
                if info.shm_name not in CREATED_HERE:
                    name = getattr(self._shm, "_name", "/" + info.shm_name)
                    resource_tracker.unregister(name, "shared_memory")
        except FileNotFoundError:
            raise BadRef(f"slab {info.slab_id}: shared memory {info.shm_name!r} is gone") from None
        if self._shm.size < info.nbytes:
            self._shm.close()
            raise BadRef(
                f"slab {info.slab_id}: segment is {self._shm.size} bytes, not {info.nbytes}"
            )
        buf = self._shm.buf
        assert buf is not None
        self._base: np.ndarray[Any, np.dtype[np.uint8]] | None = np.frombuffer(
            buf, dtype=np.uint8, count=info.nbytes
        )

    def view(
        self, offset: int, nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]
    ) -> np.ndarray[Any, Any]:
        if self._base is None:
            raise BadRef(f"slab {self.info.slab_id} is closed in this process")
        return self._base[offset : offset + nbytes].view(dtype).reshape(shape)

    def close(self) -> None:
        self._base = None
        try:
            self._shm.close()
        except BufferError:
            _PINNED.append(self._shm)


class CudaMapping:
    def __init__(self, info: broker_pb2.SlabInfo) -> None:
        import cupy

        self.info = info
        self.device = info.device
        runtime = cupy.cuda.runtime
        local = LOCAL_CUDA.get(bytes(info.ipc_handle))
        self._opened = local is None
        if local is not None:
            self._ptr = local  # the broker runs in this process
        else:
            with cupy.cuda.Device(info.device):
                try:
                    self._ptr = int(
                        runtime.ipcOpenMemHandle(
                            bytes(info.ipc_handle), runtime.cudaIpcMemLazyEnablePeerAccess
                        )
                    )
                except runtime.CUDARuntimeError as e:
                    raise BadRef(f"slab {info.slab_id}: cannot open its IPC handle: {e}") from e
        self._mem: Any = cupy.cuda.UnownedMemory(self._ptr, info.nbytes, self, info.device)

    def view(self, offset: int, nbytes: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
        import cupy

        if self._mem is None:
            raise BadRef(f"slab {self.info.slab_id} is closed in this process")
        with cupy.cuda.Device(self.device):
            return cupy.ndarray(
                shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(self._mem, offset)
            )

    def close(self) -> None:
        import cupy

        if self._mem is None:
            return
        self._mem = None
        if not self._opened:
            return
        with cupy.cuda.Device(self.device):
            try:
                cupy.cuda.runtime.ipcCloseMemHandle(self._ptr)
            except cupy.cuda.runtime.CUDARuntimeError:
                log.warning("closing IPC handle of slab %s failed", self.info.slab_id)


def open_slab(info: broker_pb2.SlabInfo) -> Mapping:
    if info.backend == broker_pb2.SLAB_BACKEND_CUDA:
        return CudaMapping(info)
    if info.backend == broker_pb2.SLAB_BACKEND_HOST:
        return HostMapping(info)
    raise BadRef(f"slab {info.slab_id} has unknown backend {info.backend}")
