"""A stage replica's domain: validated requests in, batched model runs, outputs into broker buffers.

The replica queues checked requests (`requests.py`) in its batcher; for each batch it makes sure
the refs' broker leases are still open, allocates the output buffers no caller gave (one broker
call beside the compute), hands the batch to its GPU thread (`gputhread.py`: one hand-off when
every output buffer is known), settles each request's future and reports its timings.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import metrics
from common.backend import Backend
from common.clock import mono_us, wall_us
from common.devicefault import device_fault
from common.errors import CamelotError, DeviceFault, Unavailable
from common.reports import ReportSink
from protos import report_pb2, tensor_pb2
from services.stage.batcher import Batcher, Item
from services.stage.gputhread import GpuThread
from services.stage.plugin import Model
from services.stage.requests import BufferSource, Request, Result, check_inputs

log = logging.getLogger(__name__)


@dataclass
class ReplicaIdentity:
    pipeline: str
    stage: str
    replica_id: str
    node: str
    device: int = 0
    sm_percent: float = 100.0
    sm_groups: tuple[int, ...] = field(default_factory=tuple)


def warm_sizes(max_batch: int) -> list[int]:
    """The batch sizes a warm-up runs: 1, 2, 4, ... below max_batch, then max_batch."""
    return sorted(
        {1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch} | {max_batch}
    )


def _code_of(future: asyncio.Future[Any]) -> str:
    if future.cancelled():
        return "CANCELLED"
    e = future.exception()
    if e is None:
        return "OK"
    return e.code.name if isinstance(e, CamelotError) else "INTERNAL"


class Replica:
    def __init__(
        self,
        identity: ReplicaIdentity,
        model: Model,
        backend: Backend,
        xp: Any,
        buffers: BufferSource | None,
        reports: ReportSink | None,
        max_batch: int,
        max_wait_us: int,
        max_queue: int,
        stream: Any = None,
    ) -> None:
        self.identity = identity
        self.model = model
        self.backend = backend
        self.xp = xp
        self.buffers = buffers
        self.reports = reports
        self.gpu = GpuThread(model, backend, xp, stream)
        self.batcher = Batcher(self._run_batch, max_batch, max_wait_us, max_queue)
        self._labels = (identity.pipeline, identity.stage, identity.replica_id)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(*self._labels)
        self._latency = metrics.LATENCY.labels("stage", *self._labels[:2])
        self._requests: dict[str, Any] = {}
        # the model's inputs as (name, dtype, shape): what every request is checked against
        self._in_specs = [(sp.name, sp.dtype, tuple(sp.shape)) for sp in model.inputs]
        # set once a batch meets a fatal GPU fault: the replica runs nothing more, and
        # `on_fault` (the process's) stops it with DEVICE_FAULT_EXIT
        self.fault: DeviceFault | None = None
        self.on_fault: Callable[[DeviceFault], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()

    async def warm_up(self, rounds: int = 2) -> None:
        """Opens the pipeline's slabs and runs the model at every power-of-two batch size up to
        max batch (and max batch), so no query pays a slab open (0.1-0.2 s on CUDA), a kernel
        compile or a CUDA graph capture (one per power-of-two bucket)."""
        if self.buffers is not None:  # best effort: a full broker does not stop the replica
            await self.buffers.warm_pool(self.identity.pipeline, self.identity.device)
        for n in warm_sizes(self.batcher.max_batch):
            batch = {s.name: self.xp.zeros((n, *s.shape), dtype=s.dtype) for s in self.model.inputs}
            for _ in range(rounds):
                await self.gpu.run(self.gpu.begin_batch)
                try:
                    await self.gpu.run(self.gpu.infer_sync, batch)
                finally:
                    await self.gpu.run(self.gpu.end_batch)

    async def drain(self) -> int:
        return await self.batcher.drain()

    async def drain_and_report(self) -> None:
        done = await self.drain()
        log.info("drained: %d requests finished", done)

    async def close(self) -> None:
        await self.batcher.stop()
        self.gpu.shutdown()

    # -- requests ----------------------------------------------------------------------------

    async def infer(self, request: Request) -> Result:
        result: Result = await self.submit(request)
        return result

    def submit(
        self, request: Request, on_done: Callable[[asyncio.Future[Result]], None] | None = None
    ) -> asyncio.Future[Result]:
        """Checks and queues one request without waiting: its future settles with the Result,
        and then `on_done(future)` runs (one callback per request for both: each costs the
        event loop a turn). Cancelling the future drops the request while it is still queued."""
        start = mono_us()
        try:
            inputs = request.inputs
            if len(inputs) != len(self._in_specs) or not all(
                (v := inputs.get(name)) is not None and v.dtype == dtype and v.shape == shape
                for name, dtype, shape in self._in_specs
            ):
                # something is off: the full check names it
                check_inputs(
                    self.model.inputs, {k: (v.dtype, tuple(v.shape)) for k, v in inputs.items()}
                )
            self._queue_depth.set(self.batcher.depth)
            future: asyncio.Future[Result] = self.batcher.submit_nowait(
                request, request.deadline_us
            )
        except CamelotError as e:
            self._count(e.code.name, mono_us() - start)
            raise
        future.add_done_callback(functools.partial(self._done, start, on_done))
        return future

    def _done(
        self,
        start: int,
        on_done: Callable[[asyncio.Future[Result]], None] | None,
        future: asyncio.Future[Result],
    ) -> None:
        self._count(_code_of(future), mono_us() - start)
        if on_done is not None:
            on_done(future)

    def _count(self, code: str, total_us: int) -> None:
        counter = self._requests.get(code)
        if counter is None:
            counter = self._requests[code] = metrics.REQUESTS.labels(
                "stage", *self._labels[:2], code
            )
        counter.inc()
        self._latency.observe(total_us / 1e6)

    async def _allocate_outputs(
        self, requests: list[Request]
    ) -> list[list[tensor_pb2.TensorRef] | Exception]:
        """Output buffers for every ref-transport request, one RPC for the batch.

        The broker allocates all-or-nothing; if one query's lease has ended (its query was
        abandoned) the batch falls back to one call per request so only that query fails.
        """
        assert self.buffers is not None
        specs = self.model.outputs
        dev = self.identity.device
        items = [(r.lease_id, s.dtype, tuple(s.shape)) for r in requests for s in specs]
        try:
            refs = await self.buffers.allocate(items, dev)
            k = len(specs)
            return [refs[i * k : (i + 1) * k] for i in range(len(requests))]
        except CamelotError:
            if len(requests) == 1:
                raise
        outs: list[list[tensor_pb2.TensorRef] | Exception] = []
        for r in requests:
            try:
                outs.append(
                    await self.buffers.allocate(
                        [(r.lease_id, s.dtype, tuple(s.shape)) for s in specs], dev
                    )
                )
            except CamelotError as e:
                outs.append(e)
        return outs

    async def _open_leases_only(self, items: list[Item]) -> list[Item]:
        """The items whose refs' leases are all still open; the others fail with their lease's
        status (FAILED_PRECONDITION once it has ended). A view cannot tell a released buffer
        (its memory may already hold another query's), so the broker is asked, once for the
        batch, before anything reads or writes them. An arena's local leases are not the
        broker's to answer for: their holder quarantines what it aborts."""
        wanted: list[frozenset[str]] = [i.payload.ref_leases for i in items]
        if not any(wanted) or self.buffers is None:
            return items
        try:
            closed = await self.buffers.closed_leases(sorted(set().union(*wanted)))
        except CamelotError as e:
            closed = {lease: e for leases in wanted for lease in leases}
        if not closed:
            return items
        live = []
        for item, leases in zip(items, wanted, strict=True):
            ended = next((closed[lease] for lease in sorted(leases) if lease in closed), None)
            if ended is None:
                live.append(item)
            elif not item.future.done():
                item.future.set_exception(ended)
        return live

    async def _run_batch(self, items: list[Item]) -> None:
        try:
            await self._run_live_batch(items)
        except Exception as e:
            fault = device_fault(e, self.identity.replica_id)
            if fault is None:
                raise
            self._faulted(fault, items, e)

    def _faulted(self, fault: DeviceFault, items: list[Item], cause: BaseException) -> None:
        """The batch's queries fail with the fault (INTERNAL: one of them may be its cause and
        must not take another replica down), or UNAVAILABLE where the fault came from outside
        (a failed MPS server); every queued one fails UNAVAILABLE, so gateways retry it on
        another replica; the replica takes nothing more."""
        self.fault = fault
        for item in items:
            if not item.future.done():
                item.future.set_exception(Unavailable(fault.message) if fault.innocent else fault)
        queued = self.batcher.refuse(
            Unavailable(
                f"replica {self.identity.replica_id} stopped on a fatal GPU fault "
                f"({fault.fault}); retry on another replica"
            )  # fmt: skip
        )
        log.error("%s: %d request(s) of the batch failed, %d queued refused (%s: %s)",
                  fault.message, len(items), queued, type(cause).__name__, cause)  # fmt: skip
        if self.on_fault is not None:
            self.on_fault(fault)

    async def _run_live_batch(self, items: list[Item]) -> None:
        items = await self._open_leases_only(items)
        if not items:
            return
        requests: list[Request] = [i.payload for i in items]
        if any(r.allocates for r in requests):
            # some outputs need buffers from the broker: allocate beside the compute
            await self.gpu.run(self.gpu.begin_batch)
            try:
                await self._run_batch_on_slice(items)
            finally:
                await self.gpu.run(self.gpu.end_batch)
            return
        # every output buffer is known: the whole batch is one hand-off to the GPU thread (or
        # none, where a hand-off costs more than the batch)
        t0 = mono_us()
        outputs, gpu_us = await self.gpu.run_whole_batch(requests)
        self._settle(items, requests, outputs, mono_us() - t0, gpu_us)

    def _settle(
        self,
        items: list[Item],
        requests: list[Request],
        outputs: dict[int, list[tensor_pb2.Tensor]],
        compute_us: int,
        gpu_us: int = 0,
    ) -> None:
        for n, item in enumerate(items):
            if item.future.done() or n not in outputs:
                continue
            result = Result(
                outputs=outputs[n],
                queue_us=item.queue_us,
                batch_wait_us=item.batch_started_us - item.taken_us,
                compute_us=compute_us,
                batch_size=len(items),
                gpu_us=gpu_us,
            )
            item.future.set_result(result)
            self._report(requests[n], result, item)

    async def _run_batch_on_slice(self, items: list[Item]) -> None:
        requests: list[Request] = [i.payload for i in items]
        # rows that need output buffers from the broker (ref transport, none given by the caller)
        need = [n for n, r in enumerate(requests) if r.allocates]
        alloc: asyncio.Task[Any] | None = None
        if need:
            alloc = asyncio.create_task(self._allocate_outputs([requests[n] for n in need]))
        t0 = mono_us()
        try:
            out = await self.gpu.run(self.gpu.compute_sync, requests)
        except BaseException:
            if alloc is not None:
                alloc.cancel()
            raise
        if alloc is not None:
            for n, refs in zip(need, await alloc, strict=True):
                if isinstance(refs, Exception):
                    items[n].future.set_exception(refs)
                    continue
                requests[n].out_refs = refs
                requests[n].out_views = [await self.buffers.view(ref) for ref in refs]  # type: ignore[union-attr]
        outputs: dict[int, list[tensor_pb2.Tensor]] = {}
        ref_rows = [
            n
            for n, r in enumerate(requests)
            if not r.wire_out and r.out_views is not None and not items[n].future.done()
        ]
        if ref_rows:
            views = [requests[n].out_views for n in ref_rows]
            await self.gpu.run(self.gpu.scatter_sync, out, views, ref_rows)
            for n in ref_rows:
                refs = requests[n].out_refs or []
                outputs[n] = [
                    tensor_pb2.Tensor(name=s.name, ref=ref)
                    for s, ref in zip(self.model.outputs, refs, strict=True)
                ]
        wire_rows = [n for n, r in enumerate(requests) if r.wire_out]
        if wire_rows:
            for n, tensors in zip(
                wire_rows, await self.gpu.run(self.gpu.wire_sync, out, wire_rows), strict=True
            ):
                outputs[n] = tensors
        self._settle(items, requests, outputs, mono_us() - t0)

    def _report(self, request: Request, result: Result, item: Item) -> None:
        if self.reports is None:
            return
        ident = self.identity
        self.reports.add(
            report_pb2.LatencyReport(
                kind=report_pb2.REPORT_KIND_STAGE,
                pipeline=ident.pipeline,
                stage=ident.stage,
                replica_id=ident.replica_id,
                node=ident.node,
                query_id=request.query_id,
                end_unix_us=wall_us(),
                queue_us=result.queue_us,
                batch_wait_us=result.batch_wait_us,
                compute_us=result.compute_us,
                total_us=mono_us() - item.arrived_us,
                batch_size=result.batch_size,
                gpu_us=0 if request.by_value else result.gpu_us,
            )
        )
