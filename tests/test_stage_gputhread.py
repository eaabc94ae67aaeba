"""Where a replica's batch runs: on the host backend a batch shorter than a hand-off runs on the
event loop's thread, a longer one (a real model's) on the replica's GPU thread; either way the
outputs land in their buffers."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.backend import Backend
from protos import tensor_pb2
from services.models.null import null
from services.stage import gputhread
from services.stage.gputhread import GpuThread
from services.stage.plugin import ModelContext
from services.stage.requests import Request


class Recording:
    """The null model, noting the thread each batch ran on; `delay_s` makes it a slow model."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.model = null(ModelContext(Backend.HOST, np))
        self.inputs, self.outputs = self.model.inputs, self.model.outputs
        self.delay_s = delay_s
        self.threads: list[int] = []

    def infer(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        self.threads.append(threading.get_ident())
        time.sleep(self.delay_s)
        return self.model.infer(batch)


def requests(n: int) -> tuple[list[Request], np.ndarray]:
    slab = np.zeros((2 * n, 4096), dtype=np.uint8)
    ref = tensor_pb2.TensorRef(slab_id="s", nbytes=4096, dtype=tensor_pb2.DTYPE_UINT8)
    out = []
    for i in range(n):
        slab[2 * i] = i + 1
        out.append(
            Request(
                query_id=f"q{i}",
                pipeline="null1",
                lease_id="l.1",
                inputs={"x": slab[2 * i]},
                wire_out=False,
                out_refs=[ref],
                out_views=[slab[2 * i + 1]],
            )  # fmt: skip
        )
    return out, slab


async def run_batches(model: Recording, rounds: int) -> GpuThread:
    gpu = GpuThread(model, Backend.HOST, np)
    try:
        for _ in range(rounds):
            batch, slab = requests(3)
            outputs, gpu_us = await gpu.run_whole_batch(batch)
            assert sorted(outputs) == [0, 1, 2] and gpu_us == 0  # no GPU time on the host
            assert all(slab[2 * i + 1][0] == i + 1 for i in range(3))
    finally:
        gpu.shutdown()
    return gpu


async def test_short_host_batches_come_to_run_on_the_event_loop(monkeypatch):
    # a busy machine's short batch is still far shorter than this
    monkeypatch.setattr(gputhread, "INLINE_BATCH_US", 50_000)
    model = Recording()
    await run_batches(model, 20)
    here = threading.get_ident()
    # the first batch is measured on the thread (a cold one may take a few to average down);
    # the short ones after it run here
    assert model.threads[0] != here and model.threads[-5:] == [here] * 5


async def test_a_batch_longer_than_a_hand_off_stays_on_the_gpu_thread():
    model = Recording(delay_s=2 * gputhread.INLINE_BATCH_US / 1e6)
    await run_batches(model, 3)
    assert threading.get_ident() not in model.threads


def test_a_batchs_gpu_part_reaches_its_answer():
    """StageTimings.gpu_us carries the replica's measured GPU time of the batch to the gateway
    (the host backend measures none: 0)."""
    from services.stage.calls import response_of
    from services.stage.requests import Result

    r = Result(outputs=[], queue_us=1, batch_wait_us=2, compute_us=900, batch_size=1, gpu_us=400)
    t = response_of(r, "x.0").timings
    assert (t.compute_us, t.gpu_us) == (900, 400)
