"""A batch's inputs gathered on the GPU: one cudaMemcpyAsync a row where every row is a contiguous
device array (a broker view), else CuPy's stack; either way the batch `stack` would give."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from services.stage.gputhread import _gatherer

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")


def _rows_as_views(n: int, shape: tuple[int, ...], dtype: str) -> list[object]:
    # rows at offsets inside one allocation, as broker views of a slab lie
    item = int(np.prod(shape))
    slab = cupy.arange(n * item + 7, dtype=dtype)[7:]
    return [slab[i * item : (i + 1) * item].reshape(shape) for i in range(n)]


@pytest.mark.parametrize("n", [1, 3, 8])
def test_device_rows_are_gathered_into_the_batch_stack_would_make(n: int) -> None:
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        rows = _rows_as_views(n, (4, 5), "float32")
        got = _gatherer(Backend.CUDA, cupy)(rows)
        want = cupy.stack(rows)
    stream.synchronize()
    assert got.shape == (n, 4, 5) and got.dtype == cupy.float32
    assert cupy.array_equal(got, want)
    # a fresh batch, not a view of any row: a model writing to it leaves the inputs alone
    got[0, 0, 0] = -1
    assert float(rows[0][0, 0]) != -1


def test_host_and_strided_rows_take_stack() -> None:
    gather = _gatherer(Backend.CUDA, cupy)
    host = [np.full((3,), i, dtype=np.int32) for i in range(4)]
    assert cupy.array_equal(gather(host), cupy.asarray(np.stack(host)))
    strided = [cupy.arange(12, dtype=cupy.int32).reshape(3, 4)[:, ::2] + i for i in range(2)]
    assert cupy.array_equal(gather(strided), cupy.stack(strided))
    cupy.cuda.get_current_stream().synchronize()
