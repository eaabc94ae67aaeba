"""Running one query through a pipeline's stage DAG.

Transport `ref`: the input goes once into a broker buffer under a new lease (the only host→device
copy); each stage gets refs and answers with refs; the final output is copied out once; the lease
is always released (DONE on success, ABORTED otherwise, so a stage still writing cannot corrupt a
reused buffer). Transport `wire`: bytes go to and from every stage, the baseline.

A stage call that fails with UNAVAILABLE (replica died or is draining) or RESOURCE_EXHAUSTED (its
queue is full) is retried on another replica while the deadline allows.

With a `forward` sender (`--stage-calls forward`, `forwarding.py`) a chain's query is sent to its
first stage only and the stages pass it on; everything else here is the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.backend import Backend, to_host, wait_for
from common.clock import mono_us
from common.devicefault import device_fault
from common.dtypes import to_numpy, wire_from_array
from common.errors import (
    CamelotError,
    DeadlineExceeded,
    DeviceFault,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from protos import gateway_pb2, stage_pb2, tensor_pb2
from services.gateway.forwarding import Forwarding, drive_chain, is_chain, step_requests
from services.gateway.pipelineroute import PipelineRoute, StageStep
from services.gateway.routes import RouteTable

log = logging.getLogger(__name__)

# Attempts per stage call: the first, plus retries on other replicas.
STAGE_ATTEMPTS = 3
# Copies below this size run on the event loop: a thread hand-off costs more than copying them
# (about 0.1 ms of host time against ~10 us for 64 KiB; measured in docs/DATAPLANE.md).
INLINE_COPY_BYTES = 256 * 1024


# a stage's output specs: (name, dtype, shape) each; a buffer a query needs: (dtype, shape)
Specs = list[tuple[str, np.dtype[Any], tuple[int, ...]]]
Buffer = tuple[Any, tuple[int, ...]]


class StageCaller(Protocol):
    async def __call__(
        self, address: str, request: stage_pb2.InferRequest, timeout_s: float
    ) -> stage_pb2.InferResponse: ...


class Describer(Protocol):
    async def __call__(self, address: str) -> stage_pb2.DescribeStageResponse: ...


class Buffers(Protocol):
    """What the gateway needs of the broker client."""

    async def open_and_allocate(
        self,
        items: Sequence[tuple[Any, tuple[int, ...]]],
        *,
        pool: str = "default",
        ttl_s: float = 0.0,
        label: str = "",
        device: int = 0,
    ) -> tuple[str, list[tensor_pb2.TensorRef]]: ...

    async def view(self, ref: tensor_pb2.TensorRef) -> Any: ...

    def pool_of(self, slab_id: str) -> str: ...

    async def release(self, lease_ids: list[str], *, aborted: bool = False) -> Any: ...


@dataclass
class QueryResult:
    output: tensor_pb2.WireTensor
    stages: list[gateway_pb2.StageTime] = field(default_factory=list)
    # where the answer lies when the client gave its own buffer for it
    output_ref: tensor_pb2.TensorRef | None = None


class QueryRunner:
    def __init__(
        self,
        routes: RouteTable,
        call: StageCaller,
        buffers: Buffers | None,
        backend: Backend,
        device: int = 0,
        describe: Describer | None = None,
        forward: Forwarding | None = None,
        on_fault: Callable[[DeviceFault], None] | None = None,
    ) -> None:
        self.routes = routes
        # a fatal GPU fault in this process's own copies: its context is lost (app.py exits)
        self.on_fault = on_fault
        self.call = call
        # forward mode: how a chain's query is sent along its route; per pipeline name, whether
        # it is a chain (for the route object it was worked out from)
        self.forward = forward
        self._chains: dict[str, tuple[PipelineRoute, bool]] = {}
        self.describe = describe
        self._releases: set[asyncio.Future[Any]] = set()
        # (pipeline, stage) -> output specs (name, dtype, shape), learned from a replica
        self.output_specs: dict[
            tuple[str, str], list[tuple[str, np.dtype[Any], tuple[int, ...]]]
        ] = {}
        # pipeline name -> (its route, every stage's output specs, the buffers they need), once
        # every stage's specs are known: what each query of it would otherwise work out again
        self._known: dict[str, tuple[PipelineRoute, dict[str, Specs], list[Buffer]]] = {}
        self.buffers = buffers
        self.backend = backend
        self.device = device
        # host<->device copies off the event loop, in order
        self.copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy")

    def close(self) -> None:
        self.copier.shutdown(wait=False)

    async def _copy(
        self, ref: tensor_pb2.TensorRef, nbytes: int, fn: Callable[..., Any], *args: Any
    ) -> Any:
        """`fn(view, *args)`, a copy in or out of `ref`'s buffer (its view opens the slab's CUDA
        IPC handle the first time): on the copy thread when it is large enough to be worth a
        hand-off (a hand-off costs more host time than a small copy), else here. A fatal GPU
        fault fails the query (UNAVAILABLE where the MPS server failed, so a client may retry it
        elsewhere) and is told to `on_fault`: every later copy of this process would fail too."""
        assert self.buffers is not None
        try:
            view = await self.buffers.view(ref)
            if nbytes < INLINE_COPY_BYTES:
                return fn(view, *args)
            return await asyncio.get_running_loop().run_in_executor(self.copier, fn, view, *args)
        except Exception as e:
            fault = device_fault(e, "", who="the gateway", then="the gateway restarts")
            if fault is None:
                raise
            if self.on_fault is not None:
                self.on_fault(fault)
            raise (Unavailable(fault.message) if fault.innocent else fault) from e

    async def _specs(
        self, pipeline: PipelineRoute
    ) -> dict[str, list[tuple[str, np.dtype[Any], tuple[int, ...]]]] | None:
        """Every stage's output specs, asked once of a replica; None if some stage has none up."""
        out = {}
        for step in pipeline.steps:
            key = (pipeline.name, step.name)
            if key not in self.output_specs:
                if self.describe is None:
                    return None
                try:
                    replica = self.routes.pick(pipeline.name, step.name)
                    d = await self.describe(replica.address)
                except CamelotError:
                    return None
                self.output_specs[key] = [
                    (o.name, to_numpy(o.dtype), tuple(o.shape)) for o in d.outputs
                ]
            out[step.name] = self.output_specs[key]
        return out

    async def run(
        self,
        pipeline: PipelineRoute,
        item: np.ndarray | tensor_pb2.TensorRef,
        transport: tensor_pb2.Transport.ValueType,
        query_id: str,
        deadline_us: int,
        output_ref: tensor_pb2.TensorRef | None = None,
    ) -> QueryResult:
        """Runs one query. `item` is the input: an array (its bytes came with the query), or a
        ref to a node-local client's buffer, which stage one reads in place; `output_ref`, a
        buffer of that client's lease the last stage writes the answer into (no bytes back)."""
        by_ref = isinstance(item, tensor_pb2.TensorRef)
        if transport == tensor_pb2.TRANSPORT_WIRE:
            if by_ref or output_ref is not None:
                raise InvalidArgument("an input or output by reference needs transport ref")
            assert isinstance(item, np.ndarray)
            return await self._drive(
                pipeline, wire_from_array(item), None, transport, query_id, deadline_us
            )
        if self.buffers is None:
            raise InvalidArgument("transport ref needs a broker; this gateway has none")
        ttl_s = max(1.0, (deadline_us - mono_us()) / 1e6 + 5.0)
        specs: dict[str, Specs] | None
        known = self._known.get(pipeline.name)
        if known is not None and known[0] is pipeline:
            _, specs, buffers = known
        else:
            specs = await self._specs(pipeline)
            buffers = []
            if specs is not None:
                buffers = [
                    (dt, shape) for step in pipeline.steps for _, dt, shape in specs[step.name]
                ]
                self._known[pipeline.name] = (pipeline, specs, buffers)
        if specs is None and output_ref is not None:
            raise Unavailable(f"pipeline {pipeline.name}'s output spec is not known yet")
        wanted: list[tuple[Any, tuple[int, ...]]] = []
        if not by_ref:
            assert isinstance(item, np.ndarray)
            wanted.append((item.dtype, item.shape))
        wanted += buffers
        # the lease and every buffer of the query at once: from an arena, with no broker call,
        # when every stage's outputs are known; else a broker lease the stages allocate under
        open_ = self.buffers.open_and_allocate
        if specs is None:
            open_ = getattr(self.buffers, "open_broker_lease", open_)
        lease, refs = await open_(
            wanted, pool=pipeline.name, ttl_s=ttl_s, label=query_id, device=self.device
        )
        ok = False
        try:
            it = iter(refs)
            first = item if isinstance(item, tensor_pb2.TensorRef) else next(it)
            outputs: dict[str, list[tensor_pb2.Tensor]] = {}
            if specs is not None:
                for step in pipeline.steps:
                    outputs[step.name] = [
                        tensor_pb2.Tensor(name=name, ref=next(it))
                        for name, _, _ in specs[step.name]
                    ]
            if output_ref is not None:
                assert specs is not None
                _answer_into(pipeline, specs, outputs, output_ref)
            if isinstance(item, np.ndarray):
                await self._copy(first, item.nbytes, _fill, item)
            client_lease = first.lease_id if by_ref else (output_ref.lease_id if output_ref else "")
            if self.forward is not None and specs is not None and self._is_chain(pipeline):
                result = await self._drive_forward(
                    pipeline, first, lease, query_id, deadline_us, outputs, client_lease,
                    by_value=output_ref is None,
                )  # fmt: skip
                ok = True
                return result
            result = await self._drive(
                pipeline, first, lease, transport, query_id, deadline_us, outputs, client_lease,
                by_value=output_ref is None,
            )  # fmt: skip
            ok = True
            return result
        finally:
            # Off the query's path, but never skipped: a failed or cancelled query gives its
            # buffers back too (ABORTED: they are quarantined while a stage may still write).
            self._release_later(lease, aborted=not ok)

    def _is_chain(self, pipeline: PipelineRoute) -> bool:
        known = self._chains.get(pipeline.name)
        if known is None or known[0] is not pipeline:
            known = self._chains[pipeline.name] = (pipeline, is_chain(pipeline.steps))
        return known[1]

    async def _drive_forward(
        self,
        pipeline: PipelineRoute,
        first: tensor_pb2.TensorRef,
        lease: str,
        query_id: str,
        deadline_us: int,
        outputs: dict[str, list[tensor_pb2.Tensor]],
        client_lease: str,
        by_value: bool,
    ) -> QueryResult:
        """A chain's query by forwarding: every step's request built here from the refs already
        allocated, sent along the route by the stages themselves."""
        assert self.forward is not None
        values = {"input": first}
        for step in pipeline.steps:
            for t in outputs[step.name]:
                values[f"{step.name}.{t.name}"] = t.ref
        requests = step_requests(
            pipeline.steps, values, outputs, pipeline.name, lease, query_id, client_lease
        )
        stages = await drive_chain(
            self.routes,
            self.forward,
            pipeline.name,
            [s.name for s in pipeline.steps],
            requests,
            query_id,
            deadline_us,
            STAGE_ATTEMPTS,
        )
        final = values.get(pipeline.output)
        if final is None:
            raise Unavailable(f"pipeline {pipeline.name} produced no {pipeline.output}")
        return await self._answer(final, stages, by_value)

    def _release_later(self, lease: str, aborted: bool) -> None:
        assert self.buffers is not None
        release_local = getattr(self.buffers, "release_local", None)
        if release_local is not None and release_local(lease, aborted=aborted):
            return  # an arena's lease: ended here, no broker call
        task = asyncio.ensure_future(self.buffers.release([lease], aborted=aborted))
        self._releases.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[Any]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # the broker's TTL ends the lease anyway; say why it lived longer
            log.warning("lease release failed: %s", task.exception())

    async def flush_releases(self) -> None:
        """Waits for releases still in flight (at shutdown)."""
        while self._releases:
            await asyncio.gather(*list(self._releases), return_exceptions=True)

    async def _drive(
        self,
        pipeline: PipelineRoute,
        first: tensor_pb2.TensorRef | tensor_pb2.WireTensor,
        lease: str | None,
        transport: tensor_pb2.Transport.ValueType,
        query_id: str,
        deadline_us: int,
        outputs: dict[str, list[tensor_pb2.Tensor]] | None = None,
        client_lease: str = "",
        by_value: bool = True,
    ) -> QueryResult:
        values: dict[str, tensor_pb2.TensorRef | tensor_pb2.WireTensor] = {"input": first}
        outputs = outputs or {}
        times: dict[str, gateway_pb2.StageTime] = {}
        pending = list(pipeline.steps)
        while pending:
            ready = [s for s in pending if all(src in values for _, src in s.inputs)]
            if not ready:
                raise InvalidArgument(
                    f"pipeline {pipeline.name} has a stage whose inputs never come"
                )
            calls = [
                self._stage(
                    pipeline.name,
                    s,
                    values,
                    lease,
                    transport,
                    query_id,
                    deadline_us,
                    outputs.get(s.name, ()),
                    client_lease,
                )  # fmt: skip
                for s in ready
            ]
            # a lone stage (every step of a chain) is awaited here: gather would wrap it in a
            # task of its own and wake this one through a second future
            results = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
            for step, (response, stage_time) in zip(ready, results, strict=True):
                times[step.name] = stage_time
                for t in response.outputs:
                    values[f"{step.name}.{t.name}"] = (
                        t.ref if t.WhichOneof("body") == "ref" else t.wire
                    )
            pending = [s for s in pending if s not in ready]
        final = values.get(pipeline.output)
        if final is None:
            raise Unavailable(f"pipeline {pipeline.name} produced no {pipeline.output}")
        stages = [times[s.name] for s in pipeline.steps]
        if isinstance(final, tensor_pb2.WireTensor):
            return QueryResult(output=final, stages=stages)
        return await self._answer(final, stages, by_value)

    async def _answer(
        self, final: tensor_pb2.TensorRef, stages: list[gateway_pb2.StageTime], by_value: bool
    ) -> QueryResult:
        """The query's result from the ref of its output: its bytes, or the ref alone."""
        if not by_value:
            # the answer is in the client's own buffer: only its ref goes back
            return QueryResult(output=tensor_pb2.WireTensor(), stages=stages, output_ref=final)
        out = await self._copy(final, final.nbytes, lambda v: wire_from_array(to_host(v)))
        return QueryResult(output=out, stages=stages)

    async def _stage(
        self,
        pipeline: str,
        step: StageStep,
        values: dict[str, Any],
        lease: str | None,
        transport: tensor_pb2.Transport.ValueType,
        query_id: str,
        deadline_us: int,
        outputs: Sequence[tensor_pb2.Tensor] = (),
        client_lease: str = "",
    ) -> tuple[stage_pb2.InferResponse, gateway_pb2.StageTime]:
        request = stage_pb2.InferRequest(
            query_id=query_id,
            pipeline=pipeline,
            lease_id=lease or "",
            transport=transport,
            outputs=outputs,
            client_lease_id=client_lease,
        )
        for name, src in step.inputs:
            v = values[src]
            # built in place: a Tensor built apart would be copied in once more
            if isinstance(v, tensor_pb2.TensorRef):
                request.inputs.add(name=name).ref.CopyFrom(v)
            else:
                request.inputs.add(name=name).wire.CopyFrom(v)
        tried: set[str] = set()
        last: CamelotError | None = None
        for _ in range(STAGE_ATTEMPTS):
            remaining_s = (deadline_us - mono_us()) / 1e6
            if remaining_s <= 0:
                raise DeadlineExceeded(f"deadline passed before stage {step.name}")
            try:
                replica = self.routes.pick(pipeline, step.name, tried)
            except Unavailable:
                if last is not None:
                    raise last from None
                raise
            tried.add(replica.address)
            replica.outstanding += 1
            t0 = mono_us()
            try:
                response = await self.call(replica.address, request, remaining_s)
            except (Unavailable, ResourceExhausted) as e:
                self.routes.suspect(replica)
                log.warning(
                    "stage %s on %s failed (%s); retrying elsewhere",
                    step.name,
                    replica.replica_id,
                    e.code.name,
                    extra={"request_id": query_id},
                )
                last = e
                continue
            finally:
                replica.outstanding -= 1
            t = response.timings
            return response, gateway_pb2.StageTime(
                stage=step.name,
                rpc_us=mono_us() - t0,
                queue_us=t.queue_us,
                batch_wait_us=t.batch_wait_us,
                compute_us=t.compute_us,
                replica_id=response.replica_id,
                batch_size=t.batch_size,
                gpu_us=t.gpu_us,
            )
        assert last is not None
        raise last


def _fill(view: Any, item: np.ndarray) -> None:
    """The one host→device copy of a query (a plain memcpy into shared memory on host)."""
    if hasattr(view, "set"):
        view.set(np.ascontiguousarray(item))
        wait_for()  # sleeps on an event: never spins a core
    else:
        view[...] = item


def _answer_into(
    pipeline: PipelineRoute,
    specs: dict[str, list[tuple[str, np.dtype[Any], tuple[int, ...]]]],
    outputs: dict[str, list[tensor_pb2.Tensor]],
    output_ref: tensor_pb2.TensorRef,
) -> None:
    """Makes the client's buffer the last stage's output buffer, after checking it fits."""
    stage, _, name = pipeline.output.partition(".")
    for i, (out_name, dtype, shape) in enumerate(specs[stage]):
        if out_name != name:
            continue
        if to_numpy(output_ref.dtype) != dtype or tuple(output_ref.shape) != shape:
            raise InvalidArgument(
                f"output_ref is {to_numpy(output_ref.dtype)} {list(output_ref.shape)}; the "
                f"pipeline answers {dtype} {list(shape)}"
            )
        outputs[stage][i] = tensor_pb2.Tensor(name=name, ref=output_ref)
        return
    raise Unavailable(f"pipeline {pipeline.name} has no output {pipeline.output}")
