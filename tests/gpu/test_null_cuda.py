"""The null model on CuPy: each null pipeline hands the query's bytes through unchanged (forwarded,
copied, or reinterpreted for another spec), on the device, as on the host."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from contract.pipeline_config import load_pipeline, pipelines_dir
from services.models.null import null
from services.pipelines.runner import make_input, run_batch
from services.stage.plugin import ModelContext

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

CTX = ModelContext(Backend.CUDA, cupy, compute_dtype=np.dtype(np.float16))


@pytest.mark.parametrize("name", ["null1", "null3", "null-dag"])
def test_a_null_pipeline_returns_the_querys_bytes_on_the_device(name):
    pipeline = load_pipeline(name, "full", pipelines_dir() / "null")
    items = np.stack([make_input(pipeline, s) for s in range(5)])
    out = run_batch(pipeline, CTX, cupy.asarray(items))
    assert isinstance(out, cupy.ndarray) and out.shape[0] == 5
    assert cupy.asnumpy(out).tobytes() == items.tobytes()


def test_copy_makes_a_new_device_array():
    batch = cupy.arange(8 * 4096, dtype=cupy.uint8).reshape(8, 4096)
    out = null(CTX, copy=True).infer({"x": batch})["x"]
    assert isinstance(out, cupy.ndarray) and out.data.ptr != batch.data.ptr
    assert bool((out == batch).all())
