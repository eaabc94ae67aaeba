"""Fatal GPU faults (issue #21 item 1): which errors are fatal, what a replica does when its batch
meets one, and what its agent restarts for it under MPS and under green contexts.

The CUDA error classes are stood in for by classes of the same names (the classifier reads the
name and the code, as CuPy's carry them); the replica runs the real fault plug-in on the host
backend, whose fault is PyTorch's text for an illegal address; the agent is a real gRPC agent
with real replica processes (tests/agent_fake_stage.py: a query named "poison" makes it exit
DEVICE_FAULT_EXIT). MPS mode is the agent's setting: no daemon runs here, and none is needed to
decide what restarts. The real kernel through a real mesh under MPS: tests/gpu/test_gpu_faults.py.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types

import grpc
import numpy as np
import pytest

from common.backend import Backend
from common.devicefault import FaultKind, device_fault, fatal_fault
from common.errors import DEVICE_FAULT_EXIT, DeviceFault, OutOfMemory, Unavailable
from common.lifecycle import channel
from protos import plan_pb2, stage_pb2, stage_pb2_grpc
from services.agent import gpufaults
from services.agent.diff import GREEN, MPS, NONE, TIME_SLICED
from services.agent.gpufaults import Client, Reach
from services.agent.recovery import GpuFaults
from services.agent.xid import XidWatcher
from services.models.fault import HOST_FAULT_TEXT, fault, poison_input
from services.stage.plugin import ModelContext
from services.stage.replica import Replica, ReplicaIdentity
from services.stage.requests import Request
from tests.test_agent import (
    assignment,
    eventually,
    instance_pid,
    replica,
    running_agent,
    settings,
)


class CUDARuntimeError(RuntimeError):
    """CuPy's runtime error as the classifier sees it: this name and a `status` code."""

    def __init__(self, status: int) -> None:
        super().__init__(f"cuda error {status}")
        self.status = status


class CUDADriverError(CUDARuntimeError):
    pass


class OutOfMemoryError(RuntimeError):
    pass


# -- which errors are fatal ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    [(700, "cudaErrorIllegalAddress"), (702, "cudaErrorLaunchTimeout"), (710, "cudaErrorAssert"),
     (714, "cudaErrorHardwareStackError"), (715, "cudaErrorIllegalInstruction"),
     (716, "cudaErrorMisalignedAddress"), (717, "cudaErrorInvalidAddressSpace"),
     (718, "cudaErrorInvalidPc"), (719, "cudaErrorLaunchFailure"),
     (214, "cudaErrorECCUncorrectable")],
)  # fmt: skip
def test_a_kernel_fault_code_is_fatal_and_blames_the_batch(code: int, name: str) -> None:
    for cls in (CUDARuntimeError, CUDADriverError):
        found = fatal_fault(cls(code))
        assert found is not None and found.name == name and found.kind is FaultKind.KERNEL


@pytest.mark.parametrize("code", [805, 806, 807, 810])
def test_a_failed_mps_server_is_fatal_but_leaves_the_batch_innocent(code: int) -> None:
    found = fatal_fault(CUDARuntimeError(code))
    assert found is not None and found.kind is FaultKind.SERVER
    fault_ = device_fault(CUDARuntimeError(code), "p.a.0")
    assert fault_ is not None and fault_.innocent


@pytest.mark.parametrize(
    "text",
    ["CUDA error: an illegal memory access was encountered",
     "CUDA error: device-side assert triggered\nCUDA kernel errors might be reported later",
     "CUDA error: unspecified launch failure", "CUDA_ERROR_ILLEGAL_ADDRESS"],
)  # fmt: skip
def test_pytorchs_text_of_a_fault_is_fatal(text: str) -> None:
    assert fatal_fault(RuntimeError(text)) is not None


def test_a_fault_raised_from_another_error_is_found_through_its_cause() -> None:
    try:
        try:
            raise CUDARuntimeError(700)
        except CUDARuntimeError as inner:
            raise ValueError("batch failed") from inner
    except ValueError as outer:
        assert fatal_fault(outer) is not None


@pytest.mark.parametrize(
    "error",
    [CUDARuntimeError(2), CUDARuntimeError(808), CUDARuntimeError(1),
     OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     OutOfMemory("out of device memory"), RuntimeError("shape mismatch"), ValueError("bad")],
)  # fmt: skip
def test_out_of_memory_mps_limits_and_ordinary_errors_are_not_faults(error: Exception) -> None:
    assert fatal_fault(error) is None


def test_the_fault_names_the_replica_and_the_cuda_error_and_is_internal() -> None:
    fault_ = device_fault(CUDARuntimeError(700), "p.b.1")
    assert isinstance(fault_, DeviceFault) and fault_.code == grpc.StatusCode.INTERNAL
    assert fault_.message == (
        "fatal GPU fault in replica p.b.1 (cudaErrorIllegalAddress); the replica restarts"
    )


# -- a replica whose batch faults ------------------------------------------------------------


def make_replica(max_batch: int = 1) -> Replica:
    model = fault(ModelContext(backend=Backend.HOST, xp=np))
    return Replica(
        ReplicaIdentity("fault2", "b", "fault2.b.0", "n1"), model, Backend.HOST, np,
        buffers=None, reports=None, max_batch=max_batch, max_wait_us=0, max_queue=64,
    )  # fmt: skip


def request(i: int, poisoned: bool = False) -> Request:
    item = np.full(4096, i % 200, dtype=np.uint8)
    if poisoned:
        item = poison_input(item)
    return Request(f"q{i}", "fault2", "", {"x": item}, wire_out=True)


async def test_a_poisoned_query_fails_internal_and_the_queued_ones_unavailable() -> None:
    r = make_replica(max_batch=1)
    faults: list[DeviceFault] = []
    r.on_fault = faults.append
    r.start()
    try:
        ok = await r.infer(request(0))
        assert ok.outputs[0].wire.data == bytes(4096)
        # the poisoned query first, three queued behind it (batches of one)
        futures = [r.submit(request(1, poisoned=True))] + [r.submit(request(i)) for i in (2, 3, 4)]
        done = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(done[0], DeviceFault) and done[0].code == grpc.StatusCode.INTERNAL
        assert "fatal GPU fault in replica fault2.b.0 (cudaErrorIllegalAddress)" in done[0].message
        assert all(isinstance(e, Unavailable) for e in done[1:]), done
        assert faults == [done[0]] and r.fault is done[0]
        # the replica takes nothing more: a new request is refused UNAVAILABLE at once
        with pytest.raises(Unavailable):
            r.submit(request(5))
    finally:
        await r.close()


async def test_the_host_fault_is_the_text_the_stage_classifies() -> None:
    model = fault(ModelContext(backend=Backend.HOST, xp=np))
    with pytest.raises(RuntimeError, match="illegal memory access") as e:
        model.infer({"x": np.stack([poison_input(np.zeros(4096, np.uint8))])})
    assert str(e.value) == HOST_FAULT_TEXT and fatal_fault(e.value) is not None
    clean = model.infer({"x": np.zeros((2, 4096), np.uint8)})
    assert clean["x"].shape == (2, 4096)


# -- what the agent restarts -----------------------------------------------------------------


def client(iid: str, gpu: int = 0, shared: bool = True, started_at: float = 1.0) -> Client:
    return Client(iid, gpu, shared, started_at, True)


def test_every_replica_that_finds_the_mps_daemon_is_a_client_of_its_server() -> None:
    assert gpufaults.shares_server(MPS, mps_daemon=False)
    assert gpufaults.shares_server(NONE, mps_daemon=True)
    assert gpufaults.shares_server(GREEN, mps_daemon=True)
    assert not gpufaults.shares_server(TIME_SLICED, mps_daemon=True)
    assert not gpufaults.shares_server(GREEN, mps_daemon=False)
    assert not gpufaults.shares_server(NONE, mps_daemon=False)


def test_under_mps_a_fault_takes_down_every_mps_client_of_its_gpu_only() -> None:
    clients = [client("a"), client("b"), client("c", gpu=1), client("d", shared=False)]
    assert gpufaults.to_restart(Reach.SHARED, 0, clients, exclude="a") == ["b"]
    assert gpufaults.to_restart(Reach.GPU, 0, clients, exclude="a") == ["b", "d"]
    assert gpufaults.to_restart(Reach.NONE, 0, clients) == []


def test_a_green_or_plain_replicas_fault_is_its_own() -> None:
    faulted = client("a", shared=False, started_at=5.0)
    assert gpufaults.exit_reach(faulted, served=True, round_at=None) is Reach.NONE
    assert gpufaults.exit_reach(client("a"), served=True, round_at=None) is Reach.SHARED


def test_a_fault_exit_of_a_round_under_way_or_of_a_start_begins_no_round() -> None:
    # ran when the round began: that round's
    assert gpufaults.exit_reach(client("b", started_at=1.0), True, round_at=2.0) is Reach.NONE
    # started after the round and served: a new fault
    assert gpufaults.exit_reach(client("b", started_at=3.0), True, round_at=2.0) is Reach.SHARED
    # never served (a start refused while the server recovers)
    assert gpufaults.exit_reach(client("b", started_at=3.0), False, round_at=2.0) is Reach.NONE


def test_critical_xids_reach_as_far_as_the_fault_does() -> None:
    assert [gpufaults.xid_reach(x) for x in (13, 31, 43, 94)] == [Reach.SHARED] * 4
    assert [gpufaults.xid_reach(x) for x in (48, 79, 95)] == [Reach.GPU] * 3
    assert [gpufaults.xid_reach(x) for x in (45, 63, 64, 74, 92, 999)] == [Reach.NONE] * 6
    assert gpufaults.xid_starts_round(Reach.GPU, now=100.0, round_at=None, coalesce_s=10)
    assert not gpufaults.xid_starts_round(Reach.GPU, now=100.0, round_at=95.0, coalesce_s=10)
    assert gpufaults.xid_starts_round(Reach.SHARED, now=100.0, round_at=80.0, coalesce_s=10)
    assert not gpufaults.xid_starts_round(Reach.NONE, now=100.0, round_at=None, coalesce_s=10)


def test_the_mps_servers_state_is_read_from_get_server_status() -> None:
    assert gpufaults.parse_server_status("FAULT\n") == "FAULT"
    assert gpufaults.parse_server_status("Server 1234: ACTIVE") == "ACTIVE"
    assert gpufaults.parse_server_status("unknown command") == ""


async def poison(address: str) -> grpc.StatusCode:
    async with channel(address) as ch:
        try:
            await stage_pb2_grpc.StageStub(ch).Infer(
                stage_pb2.InferRequest(query_id="poison"), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def pids(app, *rids: str) -> dict[str, int]:
    return {rid: instance_pid(app, rid) for rid in rids}


def ready(app, rid: str, restarts: int) -> bool:
    inst = app.agent.primary[rid]
    return inst.restarts == restarts and inst.state.name == "READY"


async def test_under_mps_a_faulted_replica_restarts_with_every_replica_of_its_gpu(tmp_path):
    rids = ("p.a.0", "p.a.1", "p.b.0")
    async with running_agent(settings(tmp_path, share_mode="mps")) as (app, stub):
        await stub.Apply(assignment(1, *(replica(r, 30) for r in rids)), timeout=60)
        before = pids(app, *rids)
        assert await poison(app.agent.primary["p.a.0"].address) == grpc.StatusCode.INTERNAL
        await eventually(lambda: all(ready(app, r, 1) for r in rids), 60, "every restart")
        after = pids(app, *rids)
        assert all(after[r] != before[r] for r in rids), (before, after)
        # one round for the fault, whatever the other replicas' exits said
        assert app.agent.faults.rounds == {-1: 1} and app.agent.faults.faults == {-1: 1}


async def test_under_green_contexts_a_faulted_replica_restarts_alone(tmp_path):
    async with running_agent(settings(tmp_path, share_mode="green")) as (app, stub):
        targets = [replica("p.a.0", groups=(0, 1)), replica("p.b.0", groups=(2, 3))]
        await stub.Apply(assignment(1, *targets), timeout=60)
        before = pids(app, "p.a.0", "p.b.0")
        assert await poison(app.agent.primary["p.a.0"].address) == grpc.StatusCode.INTERNAL
        await eventually(lambda: ready(app, "p.a.0", 1), 60, "the faulted replica's restart")
        assert instance_pid(app, "p.a.0") != before["p.a.0"]
        assert instance_pid(app, "p.b.0") == before["p.b.0"] and ready(app, "p.b.0", 0)
        assert app.agent.faults.rounds == {} and app.agent.faults.faults == {-1: 1}


async def test_an_xid_that_loses_the_gpu_restarts_every_replica_on_it_even_green(tmp_path):
    async with running_agent(settings(tmp_path, share_mode="green")) as (app, stub):
        targets = [replica("p.a.0", groups=(0, 1)), replica("p.b.0", groups=(2, 3))]
        await stub.Apply(assignment(1, *targets), timeout=60)
        before = pids(app, "p.a.0", "p.b.0")
        app.agent.faults.on_xid(-1, 31)  # an application's page fault: green keeps it
        app.agent.faults.on_xid(-1, 79)  # fallen off the bus: nothing on the GPU goes on
        await eventually(lambda: all(ready(app, r, 1) for r in before), 60, "both restarts")
        assert all(instance_pid(app, r) != pid for r, pid in before.items())
        assert app.agent.faults.rounds == {-1: 1}


def test_the_exit_status_of_a_fault_is_its_own() -> None:
    from common.errors import OUT_OF_MEMORY_EXIT

    assert DEVICE_FAULT_EXIT not in (0, 1, 2, OUT_OF_MEMORY_EXIT)
    assert plan_pb2.SHARE_MODE_MPS == MPS


# -- the Xid watcher, with NVML as the seam --------------------------------------------------


class FakeNvml(types.ModuleType):
    """pynvml for one GPU that reports `xids` once each, then times out (NVML is the seam)."""

    class NVMLError(Exception):
        pass

    class NVMLError_Timeout(NVMLError):  # noqa: N801 (pynvml's name)
        pass

    nvmlEventTypeXidCriticalError = 8

    def __init__(self, xids: list[int]) -> None:
        super().__init__("pynvml")
        self.xids = list(xids)
        self.registered: list[int] = []
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlEventSetFree(self, events: str) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetIndex(self, handle: str) -> int:
        return int(handle.removeprefix("gpu"))

    def nvmlDeviceRegisterEvents(self, handle: str, kind: int, events: str) -> None:
        self.registered.append(kind)

    def nvmlEventSetWait_v2(self, events: str, timeout_ms: int) -> types.SimpleNamespace:
        if not self.xids:
            time.sleep(timeout_ms / 1000 / 10)
            raise self.NVMLError_Timeout()
        return types.SimpleNamespace(device="gpu0", eventData=self.xids.pop(0))


async def test_the_xid_watcher_hands_each_critical_xid_to_the_event_loop(monkeypatch) -> None:
    nvml = FakeNvml([31, 79])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    heard: list[tuple[int, int]] = []
    watcher = XidWatcher(lambda gpu, xid: heard.append((gpu, xid)), asyncio.get_running_loop())
    assert watcher.start()
    try:
        await eventually(lambda: len(heard) == 2, 10, "both Xids")
    finally:
        await asyncio.to_thread(watcher.stop)
    assert heard == [(0, 31), (0, 79)] and watcher.counts == {0: 2}
    assert nvml.registered == [FakeNvml.nvmlEventTypeXidCriticalError] and nvml.shut


async def test_without_nvml_the_xid_watcher_is_off_and_says_so(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails
    watcher = XidWatcher(lambda gpu, xid: None, asyncio.get_running_loop())
    assert not watcher.start()
    watcher.stop()  # stopping a watcher that never started is harmless


class RoundReplica:
    """What a round reads of a supervised replica: its plan's GPU and mode, and the exit of the
    process it runs now (`start_again` replaces it, as a supervisor's restart does)."""

    def __init__(self, iid: str, gpu: int = 0) -> None:
        self.instance_id = iid
        self.target = types.SimpleNamespace(replica=plan_pb2.ReplicaPlan(gpu=gpu, mode=MPS))
        self.started_at = 0.0
        self.served = True
        self.start_again()

    def start_again(self) -> None:
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def alive(self) -> bool:
        return not self.exited.done()

    async def terminate(self, kill_grace_s: float) -> None:
        pass  # the test ends the processes itself


class NoDaemon:
    enabled = False
    owned = False


async def test_a_restart_waits_only_for_the_processes_the_round_began_with() -> None:
    """The H100 fault run at 9b918cc recovered in 33.8 s: the replica that faulted restarted at
    once, and the three others then waited the round's whole 30 s for it, its new process taken
    for the one the round stopped. A round waits on the exits of the processes it began with."""
    a, b, c = RoundReplica("p.a.0"), RoundReplica("p.b.0"), RoundReplica("p.c.0")
    faults = GpuFaults(NoDaemon(), lambda: [a, b, c], MPS, kill_grace_s=1.0)  # type: ignore[arg-type]
    assert sorted(faults.begin_round(0, Reach.SHARED, "test")) == ["p.a.0", "p.b.0", "p.c.0"]
    assert len(faults.waits_for(b)) == 2  # a's and c's processes are still up
    a.exited.set_result(DEVICE_FAULT_EXIT)
    a.start_again()  # the faulted replica is back first, a new process
    b.exited.set_result(0)
    assert faults.waits_for(b) == [c.exited]  # not a's new process
    c.exited.set_result(0)
    assert faults.waits_for(b) == [] and faults.waits_for(c) == []
    await asyncio.wait_for(faults.before_restart(b), 10)  # nothing left to wait for
    await faults.aclose()
