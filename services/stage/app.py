"""Builds a stage replica process: backend, model, broker client, reports, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from common import lifecycle
from common.backend import Backend, resolve, use_device, xp_for
from common.clock import mono_us
from common.devicefault import device_fault, error_chain, exit_now
from common.errors import DeviceFault, InvalidArgument, NotFound, OutOfMemory
from contract.pipeline_config import load_pipeline
from protos import stage_pb2_grpc
from services.stage.forward import Forwarder
from services.stage.plugin import ModelContext, build_model
from services.stage.replica import Replica, ReplicaIdentity
from services.stage.servicer import StageServicer
from services.stage.settings import StageSettings
from shmbroker.client import BrokerClient

log = logging.getLogger(__name__)

SERVICE_NAME = "camelot.v1.Stage"
# how long a replica stopping on a fatal GPU fault gives its streams to send the answers it
# settled (the fault's own status among them) before it exits; it never waits on the GPU
FAULT_FLUSH_S = 1.0
FLUSH_POLL_S = 0.01


@dataclass
class StageApp:
    settings: StageSettings
    server: grpc.aio.Server
    port: int
    replica: Replica
    servicer: StageServicer
    health: lifecycle.Health
    stack: contextlib.AsyncExitStack

    async def warm_up(self) -> None:
        await self.replica.warm_up()
        await self.health.set(True)

    async def drain(self) -> None:
        """On stop, before the server's: the replica finishes what it holds, then its open
        streams end (a previous replica's forward stream stays open while that replica lives)
        and its own forward streams close, so the server stops without waiting out its grace."""
        await self.replica.drain_and_report()
        ended = self.servicer.end_streams()
        if self.servicer.forwarder is not None:
            await self.servicer.forwarder.close()
        log.info("ended %d open stream(s)", ended)

    async def aclose(self) -> None:
        await self.stack.aclose()

    async def exit_on_fault(self, fault: DeviceFault) -> None:
        """A batch met a fatal GPU fault (the replica has failed what it held): NOT_SERVING,
        the settled answers sent (at most FAULT_FLUSH_S), then exit DEVICE_FAULT_EXIT at once.
        Nothing is released in order: the context is lost, a synchronize could hang, and the
        broker reclaims what the process held when it is gone."""
        try:
            await self.health.set(False)
            self.servicer.end_streams()
            deadline = time.monotonic() + FAULT_FLUSH_S
            for _ in range(int(FAULT_FLUSH_S / FLUSH_POLL_S)):
                if time.monotonic() > deadline or not any(c.unsent for c in self.servicer.streams):
                    break
                await asyncio.sleep(FLUSH_POLL_S)
            # a last turn for the writers (and unary calls) that took their answers
            await asyncio.sleep(0.05)
        finally:
            exit_now(fault, "stage")


# what a CUDA allocation failure says where its class is not CuPy's or PyTorch's
# OutOfMemoryError (a runtime error code, cuBLAS's workspace)
_OUT_OF_MEMORY_TEXT = ("out of memory", "cudaErrorMemoryAllocation", "CUBLAS_STATUS_ALLOC_FAILED")


def device_memory_ran_out(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from, says the device's memory ran out."""
    for cause in error_chain(e):
        if any(c.__name__ == "OutOfMemoryError" for c in type(cause).__mro__):
            return True
        text = str(cause).lower()
        if any(t.lower() in text for t in _OUT_OF_MEMORY_TEXT):
            return True
    return False


@contextlib.contextmanager
def out_of_memory_errors(what: str) -> Iterator[None]:
    """A device allocation failure while `what` runs becomes OutOfMemory: the process then
    exits with OUT_OF_MEMORY_EXIT and its agent reports the GPU as short of memory."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as e:
        if not device_memory_ran_out(e):
            raise
        raise OutOfMemory(f"out of device memory in {what}: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def device_fault_errors(replica_id: str) -> Iterator[None]:
    """A fatal GPU fault while the block runs (loading, warming up) becomes DeviceFault: the
    process then exits DEVICE_FAULT_EXIT and its agent restarts what shares the fault."""
    try:
        yield
    except DeviceFault:
        raise
    except Exception as e:
        fault = device_fault(e, replica_id)
        if fault is None:
            raise
        raise fault from e


def multiprocessors(backend: Backend, device: int) -> int:
    """SMs the process's context reports: under MPS this shows the active-thread limit."""
    if backend is not Backend.CUDA:
        return -1
    import cupy

    with cupy.cuda.Device(device):
        return int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


async def green_mode(replica: Replica, servicer: StageServicer, settings: StageSettings) -> int:
    """Runs the replica's batches on a green context over its SM groups; Resize switches it."""
    from services.green.context import GreenShare

    gpu = replica.gpu
    share = await gpu.run(GreenShare.create, settings.device, settings.sm_groups)
    gpu.switch = share.switch()

    async def resize(groups: tuple[int, ...]) -> tuple[int, int]:
        t0 = mono_us()
        pending = await gpu.run(share.prepare, groups)
        installed = await gpu.run(gpu.switch.request, pending)
        new = await asyncio.wrap_future(installed)
        return mono_us() - t0, int(new.multiprocessors)

    servicer.resizer = resize
    return int(share.multiprocessors)


async def create_server(settings: StageSettings) -> StageApp:
    """Loads the model, connects to the broker and Redis, binds; health stays NOT_SERVING."""
    stack = contextlib.AsyncExitStack()
    try:
        backend = resolve(settings.backend)
        xp = xp_for(backend)
        if backend is Backend.CUDA:
            use_device(settings.device)
        pipeline = load_pipeline(
            settings.pipeline, settings.size, directory=settings.pipelines_dir or None
        )
        stage = next((s for s in pipeline.stages if s.name == settings.stage), None)
        if stage is None:
            raise NotFound(
                f"pipeline {settings.pipeline!r} has no stage {settings.stage!r}; "
                f"it has {[s.name for s in pipeline.stages]}"
            )
        compute = np.dtype(np.float16 if backend is Backend.CUDA else np.float32)
        ctx = ModelContext(
            backend=backend,
            xp=xp,
            size=settings.size,
            seed=settings.seed,
            compute_dtype=compute,
            cuda_graphs=settings.cuda_graphs and not settings.sm_groups,
        )
        model = build_model(stage.model, ctx, stage.options)
        stream: Any = None
        if backend is Backend.CUDA:
            stream = xp.cuda.Stream(non_blocking=True)
        broker = await BrokerClient.connect(settings.broker)
        stack.push_async_callback(broker.close)
        reports = None
        if settings.redis_url:
            from common.reports import ReportWriter

            reports = ReportWriter(settings.redis_url, source=f"{settings.name}@{settings.node}")
            await reports.start()
            stack.push_async_callback(reports.aclose)
        replica = Replica(
            ReplicaIdentity(
                pipeline=settings.pipeline,
                stage=settings.stage,
                replica_id=settings.name,
                node=settings.node,
                device=settings.device,
                sm_percent=settings.sm_percent,
                sm_groups=settings.sm_groups,
            ),
            model=model,
            backend=backend,
            xp=xp,
            buffers=broker,
            reports=reports,
            max_batch=settings.max_batch or stage.max_batch,
            max_wait_us=settings.max_wait_us if settings.max_wait_us >= 0 else stage.max_wait_us,
            max_queue=settings.max_queue,
            stream=stream,
        )
        replica.start()
        stack.push_async_callback(replica.close)
        forwarder = Forwarder(settings.tls)
        stack.push_async_callback(forwarder.close)
        servicer = StageServicer(
            replica, stage.model, multiprocessors(backend, settings.device), forwarder
        )
        if settings.sm_groups:
            if backend is not Backend.CUDA:
                raise InvalidArgument("--sm-groups needs the cuda backend (green contexts)")
            servicer.multiprocessors = await green_mode(replica, servicer, settings)
        server = lifecycle.new_server()
        stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
        health = lifecycle.Health(server, [SERVICE_NAME])
        port = lifecycle.bind(
            server, settings.host, settings.port, settings.unix_path, tls=settings.tls
        )
        return StageApp(settings, server, port, replica, servicer, health, stack)
    except BaseException:
        await stack.aclose()
        raise
