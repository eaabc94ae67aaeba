"""Which errors are fatal GPU faults: the process's CUDA context is lost and only an exit clears it.

A kernel that reads through a bad pointer or fails a device-side assert leaves a *sticky* error:
every later call in that context fails the same way. Under MPS (Volta and later) the fault is
reported to every client of the GPU's server, and the server takes no new client for that GPU
until all of them have exited; with green contexts or plain processes it stays in the faulting
process. Either way the replica cannot serve again and must exit (`DEVICE_FAULT_EXIT`), and so
must any other client of that server whose context the fault took (a gateway or a broker that is
an MPS client: `exit_now`).

Two kinds, because they say different things about the batch that met them:

    kernel   the GPU ran a kernel that faulted (illegal address, assert, ...): the batch's own
             queries may be the cause, so they fail INTERNAL and are not retried elsewhere
    server   the MPS server or the connection to it failed (805-807, 810): the batch is innocent
             and fails UNAVAILABLE, so gateways retry it on another replica

Codes are the same number in the runtime API (cupy's CUDARuntimeError) and the driver API
(CUDADriverError); PyTorch raises a RuntimeError whose text names the fault. Out of memory is not
a fault (services/stage/app.py: OutOfMemory), and neither are MPS's client limits (808, 809),
which refuse a context at start.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from common.errors import DEVICE_FAULT_EXIT, DeviceFault


class FaultKind(enum.Enum):
    KERNEL = "kernel"
    SERVER = "server"


# code -> (runtime API name, kind)
FATAL_CUDA_CODES: dict[int, tuple[str, FaultKind]] = {
    214: ("cudaErrorECCUncorrectable", FaultKind.KERNEL),
    700: ("cudaErrorIllegalAddress", FaultKind.KERNEL),
    702: ("cudaErrorLaunchTimeout", FaultKind.KERNEL),
    710: ("cudaErrorAssert", FaultKind.KERNEL),
    714: ("cudaErrorHardwareStackError", FaultKind.KERNEL),
    715: ("cudaErrorIllegalInstruction", FaultKind.KERNEL),
    716: ("cudaErrorMisalignedAddress", FaultKind.KERNEL),
    717: ("cudaErrorInvalidAddressSpace", FaultKind.KERNEL),
    718: ("cudaErrorInvalidPc", FaultKind.KERNEL),
    719: ("cudaErrorLaunchFailure", FaultKind.KERNEL),
    805: ("cudaErrorMpsConnectionFailed", FaultKind.SERVER),
    806: ("cudaErrorMpsRpcFailure", FaultKind.SERVER),
    807: ("cudaErrorMpsServerNotReady", FaultKind.SERVER),
    810: ("cudaErrorMpsClientTerminated", FaultKind.SERVER),
}

# what the fault says where only text carries it (PyTorch's "CUDA error: ...", a driver name)
_FAULT_TEXT: tuple[tuple[str, str], ...] = (
    ("an illegal memory access was encountered", "cudaErrorIllegalAddress"),
    ("device-side assert triggered", "cudaErrorAssert"),
    ("unspecified launch failure", "cudaErrorLaunchFailure"),
    ("an illegal instruction was encountered", "cudaErrorIllegalInstruction"),
    ("misaligned address", "cudaErrorMisalignedAddress"),
    ("uncorrectable ecc error", "cudaErrorECCUncorrectable"),
    ("the launch timed out and was terminated", "cudaErrorLaunchTimeout"),
)
_NAMES = {name.lower(): (name, kind) for name, kind in FATAL_CUDA_CODES.values()}
# the driver API's spelling of the same faults: CUDA_ERROR_ILLEGAL_ADDRESS, ...
_DRIVER_NAMES = {
    "cuda_error_ecc_uncorrectable": 214,
    "cuda_error_illegal_address": 700,
    "cuda_error_launch_timeout": 702,
    "cuda_error_assert": 710,
    "cuda_error_hardware_stack_error": 714,
    "cuda_error_illegal_instruction": 715,
    "cuda_error_misaligned_address": 716,
    "cuda_error_invalid_address_space": 717,
    "cuda_error_invalid_pc": 718,
    "cuda_error_launch_failed": 719,
    "cuda_error_mps_connection_failed": 805,
    "cuda_error_mps_rpc_failure": 806,
    "cuda_error_mps_server_not_ready": 807,
    "cuda_error_mps_client_terminated": 810,
}


@dataclass(frozen=True)
class Fault:
    """A fatal fault found in an error: its CUDA name and what it says about the batch."""

    name: str
    kind: FaultKind


def _one(e: BaseException) -> Fault | None:
    if any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__):
        return None
    status = getattr(e, "status", None)
    if isinstance(status, int) and type(e).__name__ in ("CUDARuntimeError", "CUDADriverError"):
        known = FATAL_CUDA_CODES.get(status)
        return Fault(*known) if known is not None else None
    text = str(e).lower()
    for name, (spelled, kind) in _NAMES.items():
        if name in text:
            return Fault(spelled, kind)
    for driver, code in _DRIVER_NAMES.items():
        if driver in text:
            return Fault(*FATAL_CUDA_CODES[code])
    for phrase, spelled in _FAULT_TEXT:
        if phrase in text:
            return Fault(spelled, FaultKind.KERNEL)
    return None


def error_chain(e: BaseException) -> Iterator[BaseException]:
    """`e`, then each error it was raised from or during (`__cause__`, else `__context__`), each
    once: where a library's own error hides under a wrapper's."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def fatal_fault(e: BaseException) -> Fault | None:
    """The fatal GPU fault `e`, or an error it was raised from, reports; None for any other."""
    for cause in error_chain(e):
        if isinstance(cause, DeviceFault):
            kind = FaultKind.SERVER if cause.innocent else FaultKind.KERNEL
            return Fault(cause.fault or "DeviceFault", kind)
        found = _one(cause)
        if found is not None:
            return found
    return None


def device_fault(
    e: BaseException, replica_id: str, *, who: str = "", then: str = "the replica restarts"
) -> DeviceFault | None:
    """The DeviceFault for `e` where it is fatal, with the status text a caller is given: in
    replica `replica_id`, or in `who` (a gateway, the broker) where given."""
    fault = fatal_fault(e)
    if fault is None:
        return None
    who = who or f"replica {replica_id}"
    if fault.kind is FaultKind.SERVER:
        what = f"the MPS server of {who}'s GPU failed ({fault.name})"
    else:
        what = f"fatal GPU fault in {who} ({fault.name})"
    return DeviceFault(f"{what}; {then}", fault=fault.name, innocent=fault.kind is FaultKind.SERVER)


def exit_now(fault: DeviceFault, prog: str) -> NoReturn:
    """Ends the process at once with DEVICE_FAULT_EXIT: its CUDA context is lost, so nothing is
    released in order (a synchronize could hang), and under MPS the GPU's server takes no new
    client until every one of the old ones has exited. Its supervisor (the agent, a gateway's
    supervisor, Docker, Kubernetes) starts it again."""
    print(f"{prog}: {fault.code.name}: {fault.message}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(DEVICE_FAULT_EXIT)
