"""A stage replica's GPU thread: every piece of GPU work runs here, on the replica's stream.

Gathering inputs, `infer`, scattering outputs into broker buffers or copying them out as bytes,
and synchronizing all run on one executor thread, so the event loop never blocks on the GPU and
a batch's kernels are ordered. Outputs are synchronized before the answer leaves, so the next
stage (another process) reads finished bytes. In green-context mode each batch runs whole on
one slice of the SMs (`switch`), fixed from `begin_batch` to `end_batch`. On the host backend,
where there is no GPU to wait for, a batch that takes less than a hand-off runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.backend import Backend, to_host, wait_for
from common.clock import mono_us
from common.dtypes import wire_from_array
from protos import tensor_pb2
from services.stage.plugin import Model
from services.stage.requests import Request

# On the host backend a batch whose work took less than this (recently, on average) runs on the
# event loop: handing it to the thread and back costs more host CPU than such a batch (two
# wake-ups, and the GIL passed to and fro around every NumPy copy that releases it; 0.2-0.3 ms
# per batch of one on `null3`, docs/notes/stage-cost.md), and the loop is held no longer than
# it is by the thread's own Python. Longer work (a real model) stays on the thread.
INLINE_BATCH_US = 500
# weight of the newest batch in the running average of a batch's time
BATCH_US_WEIGHT = 0.2


def _gatherer(backend: Backend, xp: Any) -> Any:
    """gather(rows) -> one batch array whose row i is rows[i] (all of one shape and dtype, as
    the replica checked them). On CUDA, where every row is already a contiguous device array
    (inputs sent by reference: broker views), the batch is an empty array and one
    cudaMemcpyAsync a row on the current stream: CuPy's `stack` (an expand_dims a row, then a
    concatenate kernel) took 6-11 of a GPU thread's 26-40 py-spy samples at 900 qps on the H100,
    more than the graph replay (docs/results/stage-host-fit-h100-1731d70.md). Rows sent by value
    (host arrays) go to the device through `asarray` and `stack`, as before."""
    if backend is not Backend.CUDA:
        return lambda rows: xp.stack([xp.asarray(r) for r in rows])
    runtime = xp.cuda.runtime
    stream = xp.cuda.get_current_stream().ptr

    def gather_cuda(rows: list[Any]) -> Any:
        first = rows[0]
        if not all(
            isinstance(r, xp.ndarray)
            and r.flags.c_contiguous
            and r.dtype == first.dtype
            and r.shape == first.shape
            for r in rows
        ):
            return xp.stack([xp.asarray(r) for r in rows])
        out = xp.empty((len(rows), *first.shape), dtype=first.dtype)
        nbytes, base = first.nbytes, out.data.ptr
        for i, r in enumerate(rows):
            if nbytes:
                # Default: the pointers say where each side is (a row on another GPU too)
                runtime.memcpyAsync(
                    base + i * nbytes, r.data.ptr, nbytes, runtime.memcpyDefault, stream
                )
        return out

    return gather_cuda


def _row_copier(backend: Backend, xp: Any) -> Any:
    """copy(dst, batch, row): dst[...] = batch[row], by raw memcpy where both are contiguous."""
    if backend is not Backend.CUDA:

        def copy_host(dst: Any, batch: Any, row: int) -> None:
            dst[...] = batch[row]

        return copy_host
    runtime = xp.cuda.runtime
    stream = xp.cuda.get_current_stream().ptr

    def copy_cuda(dst: Any, batch: Any, row: int) -> None:
        nbytes = dst.nbytes
        if (
            batch.flags.c_contiguous
            and dst.flags.c_contiguous
            and batch.dtype == dst.dtype
            and batch.strides[0] == nbytes
        ):
            src = batch.data.ptr + row * nbytes
            runtime.memcpyAsync(dst.data.ptr, src, nbytes, runtime.memcpyDeviceToDevice, stream)
        else:
            dst[...] = batch[row]

    return copy_cuda


class GpuThread:
    """The one thread a replica's GPU work runs on; `*_sync` methods run on it (via `run`)."""

    def __init__(self, model: Model, backend: Backend, xp: Any, stream: Any = None) -> None:
        self.model = model
        self.backend = backend
        self.xp = xp
        self.stream = stream
        # green-context mode: a ShareSwitch of slices; each batch runs whole on one slice
        self.switch: Any = None
        self._batch_stream: Any = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        # the running average of a whole batch's time (None: none measured yet)
        self.batch_us: float | None = None
        # CUDA: two timing events around the last `infer` on the batch's stream (`infer_gpu_us`)
        self._infer_events: tuple[Any, Any] | None = None

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)

    async def run(self, fn: Any, *args: Any) -> Any:
        """fn(*args) on the GPU thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_whole_batch(
        self, requests: list[Request]
    ) -> tuple[dict[int, list[tensor_pb2.Tensor]], int]:
        """`whole_batch_sync`, on the event loop where that costs less than a hand-off (the
        host backend, short batches), else on the thread; with the GPU's part of it in
        microseconds (`infer_gpu_us`)."""
        if (
            self.backend is Backend.HOST
            and self.batch_us is not None
            and self.batch_us < INLINE_BATCH_US
        ):
            return self._timed_whole_batch(requests)
        out: tuple[dict[int, list[tensor_pb2.Tensor]], int] = await self.run(
            self._timed_whole_batch, requests
        )
        return out

    def _timed_whole_batch(
        self, requests: list[Request]
    ) -> tuple[dict[int, list[tensor_pb2.Tensor]], int]:
        t0 = mono_us()
        try:
            outputs = self.whole_batch_sync(requests)
            return outputs, self.infer_gpu_us()
        finally:
            took = mono_us() - t0
            last = self.batch_us
            self.batch_us = took if last is None else last + BATCH_US_WEIGHT * (took - last)

    def _stream_ctx(self) -> Any:
        stream = self._batch_stream if self._batch_stream is not None else self.stream
        return stream if stream is not None else contextlib.nullcontext()

    def _sync(self) -> None:
        """Waits for this thread's current stream, sleeping rather than spinning: outputs are
        final before the answer leaves."""
        if self.backend is Backend.CUDA:
            wait_for()

    def begin_batch(self) -> None:
        """On the GPU thread: the slice this batch runs on (green mode), fixed until it ends."""
        if self.switch is not None:
            self._batch_stream = self.switch.begin_batch().stream

    def end_batch(self) -> None:
        if self.switch is not None:
            self._batch_stream = None
            self.switch.end_batch()

    def infer_sync(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        with self._stream_ctx():
            out = self.model.infer(batch)
            self._sync()
        return out

    def compute_sync(self, requests: list[Request]) -> dict[str, Any]:
        with self._stream_ctx():
            # inputs sent by value arrive as host arrays; they go to the device here, on the
            # batch's stream, so the copy is ordered before the kernels that read it
            gather = _gatherer(self.backend, self.xp)
            batch = {
                s.name: gather([r.inputs[s.name] for r in requests]) for s in self.model.inputs
            }
            events = self._timing_events()
            if events is not None:
                events[0].record()
            out = self.model.infer(batch)
            if events is not None:
                events[1].record()
            for spec in self.model.outputs:
                arr = out.get(spec.name)
                if arr is None:
                    raise RuntimeError(f"model returned no output {spec.name!r}")
                if tuple(arr.shape) != (len(requests), *spec.shape):
                    raise RuntimeError(
                        f"model output {spec.name!r} has shape {list(arr.shape)}, "
                        f"expected {[len(requests), *spec.shape]}"
                    )
                if arr.dtype != spec.dtype:
                    out[spec.name] = arr.astype(spec.dtype)
        return out

    def _timing_events(self) -> tuple[Any, Any] | None:
        """The two events `compute_sync` records around `infer` (CUDA only), made once."""
        if self.backend is not Backend.CUDA:
            return None
        if self._infer_events is None:
            self._infer_events = (self.xp.cuda.Event(), self.xp.cuda.Event())
        return self._infer_events

    def infer_gpu_us(self) -> int:
        """On the GPU thread, after the batch's wait: the GPU time of its `infer` (what the
        profiler times), in microseconds; 0 where not measured (the host backend)."""
        if self._infer_events is None:
            return 0
        start, stop = self._infer_events
        try:
            return int(self.xp.cuda.get_elapsed_time(start, stop) * 1000)
        except Exception:  # an event not recorded or not done: no figure, not a failed batch
            return 0

    def scatter_sync(self, out: Mapping[str, Any], views: list[list[Any]], rows: list[int]) -> None:
        """Copies row i of every output into its broker view (device to device), then syncs.
        On CUDA a contiguous row is one cudaMemcpyAsync on the batch's stream (a few us of host
        time, where an elementwise copy kernel costs CuPy ~15 us to launch)."""
        with self._stream_ctx():
            copy = _row_copier(self.backend, self.xp)
            for row, row_views in zip(rows, views, strict=True):
                for spec, view in zip(self.model.outputs, row_views, strict=True):
                    copy(view, out[spec.name], row)
            self._sync()

    def wire_sync(self, out: Mapping[str, Any], rows: list[int]) -> list[list[tensor_pb2.Tensor]]:
        # On the batch's stream: a copy on this thread's default stream would not wait for a
        # non-blocking stream's kernels and could read an output (or a graph's static output)
        # before it is written.
        with self._stream_ctx():
            host = {spec.name: to_host(out[spec.name]) for spec in self.model.outputs}
        result = []
        for row in rows:
            tensors = []
            for spec in self.model.outputs:
                wire = wire_from_array(host[spec.name][row])
                tensors.append(tensor_pb2.Tensor(name=spec.name, wire=wire))
            result.append(tensors)
        return result

    def whole_batch_sync(self, requests: list[Request]) -> dict[int, list[tensor_pb2.Tensor]]:
        """On the GPU thread: slice, compute, outputs into their buffers or bytes, one wait."""
        self.begin_batch()
        try:
            out = self.compute_sync(requests)
            ref_rows = [n for n, r in enumerate(requests) if not r.wire_out]
            outputs: dict[int, list[tensor_pb2.Tensor]] = {}
            if ref_rows:
                views = [requests[n].out_views or [] for n in ref_rows]
                self.scatter_sync(out, views, ref_rows)
                for n in ref_rows:
                    outputs[n] = [
                        tensor_pb2.Tensor(name=s.name, ref=ref)
                        for s, ref in zip(
                            self.model.outputs, requests[n].out_refs or [], strict=True
                        )
                    ]
            wire_rows = [n for n, r in enumerate(requests) if r.wire_out]
            if wire_rows:
                for n, tensors in zip(wire_rows, self.wire_sync(out, wire_rows), strict=True):
                    outputs[n] = tensors
            return outputs
        finally:
            self.end_batch()
