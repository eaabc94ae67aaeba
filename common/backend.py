"""Which array backend this process runs on: `cuda` (CuPy) where usable, else `host` (NumPy).

Array code is written once against the namespace `xp` returned here.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)


class Backend(enum.Enum):
    HOST = "host"
    CUDA = "cuda"


@functools.cache
def cuda_available() -> bool:
    """True when CuPy imports and sees at least one device (never raises)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def resolve(requested: str = "auto") -> Backend:
    """`auto` picks cuda where usable; asking for cuda without it is an error, not a fallback."""
    if requested == "auto":
        return Backend.CUDA if cuda_available() else Backend.HOST
    backend = Backend(requested)
    if backend is Backend.CUDA and not cuda_available():
        raise RuntimeError("backend cuda requested but CUDA is not usable in this process")
    return backend


def label(requested: str) -> str:
    """The backend a client's result is labelled with: `auto` as this process would resolve it,
    anything else as given (a load generator labels the mesh it drives, whose CUDA it need not
    see itself, so unlike `resolve` this never refuses `cuda`)."""
    if requested == "auto":
        return str((Backend.CUDA if cuda_available() else Backend.HOST).value)
    return requested


def xp_for(backend: Backend) -> ModuleType:
    if backend is Backend.CUDA:
        import cupy

        return cupy  # type: ignore[no-any-return]
    return np


def to_host(array: object) -> np.ndarray:
    """A NumPy array of any backend's array (a device→host copy on cuda)."""
    get = getattr(array, "get", None)
    if callable(get):
        return get()  # type: ignore[no-any-return]
    return np.asarray(array)


# cudaDeviceScheduleBlockingSync: a host thread that waits for the device sleeps on an OS
# primitive instead of spinning a core (CUDA's default spins while it has cores to spare, which
# costs a replica a core for every batch the GPU runs).
BLOCKING_SYNC_FLAG = 0x04


def use_device(device: int) -> None:
    """Makes `device` current for this process, its primary context set (before it exists) to
    wait for the GPU without spinning."""
    import cupy

    blocking_sync(device)
    cupy.cuda.Device(device).use()


def blocking_sync(device: int) -> bool:
    """Sets the device's primary context to blocking sync (driver API through cuda-python,
    which CuPy's runtime module does not expose); False, with a warning, where that cannot be
    done: waits then spin, except those made through `wait_for`."""
    try:
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            from cuda import cuda as cu  # cuda-python < 12.6
        cu.cuInit(0)
        err, dev = cu.cuDeviceGet(device)
        if int(err) == 0:
            (err,) = cu.cuDevicePrimaryCtxSetFlags(dev, BLOCKING_SYNC_FLAG)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {int(err)}")
        return True
    except Exception as e:
        log.warning("device %d not set to blocking sync (%s): waits may spin", device, e)
        return False


_waits = threading.local()


def wait_for(stream: object = None) -> None:
    """Blocks until the work queued on `stream` (default: the current stream) is done, on an
    event made with cudaEventBlockingSync: the thread sleeps rather than spins. One event per
    thread and device, recorded again each time."""
    import cupy

    if stream is None:
        stream = cupy.cuda.get_current_stream()
    device = cupy.cuda.runtime.getDevice()
    events = getattr(_waits, "events", None)
    if events is None:
        events = _waits.events = {}
    event = events.get(device)
    if event is None:
        event = events[device] = cupy.cuda.Event(block=True, disable_timing=True)
    event.record(stream)
    event.synchronize()
