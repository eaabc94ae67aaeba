"""One error hierarchy for every Camelot process, each class carrying its gRPC status.

    CamelotError                      INTERNAL
    ├── DeviceFault                   INTERNAL           fatal GPU fault, the context lost
    ├── InvalidArgument               INVALID_ARGUMENT   bad request, shape, dtype
    │   └── BadRef                    INVALID_ARGUMENT   forged, out-of-slab or malformed ref
    ├── NotFound                      NOT_FOUND          unknown pipeline, lease, replica
    ├── FailedPrecondition            FAILED_PRECONDITION
    │   ├── StaleRef                  FAILED_PRECONDITION ref from an older broker generation
    │   └── LeaseEnded                FAILED_PRECONDITION lease released or expired
    ├── ResourceExhausted             RESOURCE_EXHAUSTED no room, queue full, payload too large
    │   └── OutOfMemory               RESOURCE_EXHAUSTED a model does not fit its GPU's memory
    ├── DeadlineExceeded              DEADLINE_EXCEEDED
    ├── Unavailable                   UNAVAILABLE        draining, no replica, peer down
    ├── Unauthenticated               UNAUTHENTICATED
    ├── PermissionDenied              PERMISSION_DENIED
    └── Cancelled                     CANCELLED

Servers wrap their methods with `grpc_errors` (maps these to `context.abort`,
anything else to INTERNAL with the traceback logged); clients turn an
`AioRpcError` back into the same class with `from_rpc_error`. A process that stops on
`OutOfMemory` exits with OUT_OF_MEMORY_EXIT (`lifecycle.run_process`), so the agent that started
it can tell the scheduler (which plans less memory onto that GPU) without parsing its log; one
that stops on `DeviceFault` (an illegal address, a device-side assert: its CUDA context, and under
MPS every client's on that GPU, is lost) exits with DEVICE_FAULT_EXIT, so its agent restarts what
shares the fault (docs/RELIABILITY.md, "Fatal GPU faults").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class CamelotError(Exception):
    """Base of every Camelot error; maps to INTERNAL unless a subclass says otherwise."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class DeviceFault(CamelotError):
    """A fatal GPU fault (cudaErrorIllegalAddress, a device-side assert, a lost MPS server): the
    process's CUDA context is unusable until it exits. INTERNAL and never retried elsewhere by the
    replica that raised it: the queries of the batch it hit may have caused it. `fault` is the
    CUDA error's name; `innocent` where the fault came from outside the process (a failed MPS
    server), so the batch it hit may be retried elsewhere."""

    def __init__(self, message: str, *, fault: str = "", innocent: bool = False) -> None:
        super().__init__(message)
        self.fault = fault
        self.innocent = innocent


# the exit status of a process that stopped on DeviceFault
DEVICE_FAULT_EXIT = 4


class InvalidArgument(CamelotError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class BadRef(InvalidArgument):
    pass


class NotFound(CamelotError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(CamelotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleRef(FailedPrecondition):
    pass


class LeaseEnded(FailedPrecondition):
    pass


class ResourceExhausted(CamelotError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfMemory(ResourceExhausted):
    """The device's memory ran out: CUDA out of memory loading a model or warming it up."""


# the exit status of a process that stopped on OutOfMemory (2 is any other error at start)
OUT_OF_MEMORY_EXIT = 3


class DeadlineExceeded(CamelotError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(CamelotError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(CamelotError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CamelotError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(CamelotError):
    code = grpc.StatusCode.CANCELLED


_BY_CODE: dict[grpc.StatusCode, type[CamelotError]] = {
    cls.code: cls
    for cls in (
        CamelotError,
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
    )
}

RETRY_AFTER_KEY = "retry-after-ms"


def from_rpc_error(err: grpc.RpcError) -> CamelotError:
    """The Camelot error for a failed call, keeping its message (raise it `from err`)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, CamelotError)
    retry_after: int | None = None
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_AFTER_KEY:
            retry_after = int(value)
    out = cls(details or code.name, retry_after_ms=retry_after)
    if cls is CamelotError:
        out.code = code  # keep UNKNOWN and friends precise
    return out


_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_value(name: str) -> int:
    """The numeric gRPC status of a code's name ("OK" -> 0); UNKNOWN (2) for any other name."""
    code = grpc.StatusCode.__members__.get(name)
    return int(code.value[0]) if code is not None else int(grpc.StatusCode.UNKNOWN.value[0])


def error_for_status(
    code: int | grpc.StatusCode, message: str, retry_after_ms: int | None = None
) -> CamelotError:
    """The Camelot error for a status carried in a message (a call's answer on a stream)."""
    status = code if isinstance(code, grpc.StatusCode) else _BY_VALUE.get(code)
    if status is None:
        status = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(status, CamelotError)
    out = cls(message or status.name, retry_after_ms=retry_after_ms)
    if cls is CamelotError:
        out.code = status
    return out


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def grpc_errors(method: F) -> F:
    """Decorates an async servicer method: Camelot errors become their status, the rest INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except CamelotError as e:
            if e.retry_after_ms is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(e.retry_after_ms)),))
            await context.abort(e.code, e.message)
        except grpc.aio.AbortError:
            raise
        except grpc.aio.AioRpcError as e:
            # A downstream call failed: pass its status on rather than hiding it as INTERNAL.
            mapped = from_rpc_error(e)
            await context.abort(mapped.code, mapped.message)
        except Exception:
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")

    return wrapper  # type: ignore[return-value]
