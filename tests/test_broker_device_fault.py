"""The broker checks the CUDA context that holds its slabs on each sweep: a fatal fault there
(under MPS, any client's fault reaches every client of the GPU's server, and the server takes no
new client until all of them have gone) ends the process with DEVICE_FAULT_EXIT, so that the
GPU's server can recover and the broker start clean; any other failure of the check is logged
and the broker goes on. The slabs come from the broker's memory seam (a CUDA slab's stand-in:
this machine has no GPU), the fault as CuPy raises it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from common.backend import Backend
from common.errors import DeviceFault
from protos import broker_pb2
from shmbroker.broker import Broker, BrokerConfig
from shmbroker.slabs import HOST_DEVICE, HostMemory, Memory
from tests.test_gpu_faults import CUDARuntimeError

MiB = 1 << 20


class CudaSlabMemory:
    """A CUDA slab's stand-in at the broker's memory seam."""

    backend = broker_pb2.SLAB_BACKEND_CUDA
    shm_name = ""
    ipc_handle = b"\x01" * 64

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def close(self) -> None:
        pass


def memory(device: int, nbytes: int) -> Memory:
    return HostMemory(nbytes) if device == HOST_DEVICE else CudaSlabMemory(nbytes)


def broker_with(check, sweep_interval_s: float = 60.0) -> tuple[Broker, list[DeviceFault]]:
    faults: list[DeviceFault] = []
    config = BrokerConfig("n0", Backend.HOST, MiB, 8 * MiB, 30.0, 1.0, sweep_interval_s)
    broker = Broker(config, memory=memory, context_check=check, on_fault=faults.append)
    broker.slabs.devices = 1  # one CUDA device, whose slabs come from the seam
    return broker, faults


def test_a_fatal_fault_in_the_context_that_holds_the_slabs_ends_the_broker():
    checked: list[list[int]] = []

    def check(devices: Iterable[int]) -> None:
        checked.append(list(devices))
        raise CUDARuntimeError(700)

    broker, faults = broker_with(check)
    try:
        broker.check_context()
        assert checked == [] and faults == []  # no CUDA slab yet: nothing to check
        broker.slabs.create("default", 0, MiB)
        broker.slabs.create("other", HOST_DEVICE, MiB)
        broker.check_context()
        assert checked == [[0]]
        assert len(faults) == 1 and faults[0].fault == "cudaErrorIllegalAddress"
        assert "the broker" in faults[0].message
    finally:
        broker.slabs.close()


@pytest.mark.parametrize("error", [RuntimeError("driver busy"), CUDARuntimeError(2)])
def test_any_other_failure_of_the_check_leaves_the_broker_serving(error):
    def check(devices: Iterable[int]) -> None:
        raise error

    broker, faults = broker_with(check)
    try:
        broker.slabs.create("default", 0, MiB)
        broker.check_context()
        assert faults == []
    finally:
        broker.slabs.close()


async def test_the_sweeper_checks_the_context_and_a_fault_stops_the_process():
    # the MPS server itself failed: the broker's context is gone with it
    broker, faults = broker_with(
        lambda devices: (_ for _ in ()).throw(CUDARuntimeError(805)), sweep_interval_s=0.01
    )
    broker.slabs.create("default", 0, MiB)
    broker.start()
    try:
        for _ in range(1000):
            if faults:
                break
            await asyncio.sleep(0.01)
        assert faults and faults[0].innocent
    finally:
        await broker.close()
