"""CUDA-graph plumbing that holds without a GPU: buckets, warm-up sizes, the setting, and that the
host backend never tries to capture. Capture and replay themselves: tests/gpu/test_graphs_cuda.py.
Padding rows to a bucket relies on every item's result being independent of its batch-mates:
tests/test_models.py::test_an_item_gives_the_same_result_alone_or_in_a_batch."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from contract.pipeline_config import load_pipeline
from services.models.graphs import bucket
from services.models.kernels import THREADS, plan
from services.stage.plugin import ModelContext, build_model
from services.stage.replica import warm_sizes
from services.stage.settings import parse


def test_buckets_are_the_next_power_of_two() -> None:
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 24, 32, 33)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        16,
        32,
        32,
        64,
    ]
    with pytest.raises(ValueError):
        bucket(0)


def test_warm_up_covers_every_bucket_a_batch_can_fall_in() -> None:
    for max_batch in (1, 2, 3, 7, 8, 24, 32):
        sizes = warm_sizes(max_batch)
        assert sizes[-1] == max_batch and sizes[0] == 1
        assert {bucket(n) for n in range(1, max_batch + 1)} == {bucket(n) for n in sizes}


def test_cuda_graphs_setting_defaults_on_and_follows_flag_and_env() -> None:
    base = ["--pipeline", "p", "--stage", "s"]
    assert parse(base, environ={}).cuda_graphs
    assert not parse([*base, "--cuda-graphs", "off"], environ={}).cuda_graphs
    assert not parse(base, environ={"CAMELOT_CUDA_GRAPHS": "off"}).cuda_graphs
    assert parse([*base, "--cuda-graphs", "on"], environ={"CAMELOT_CUDA_GRAPHS": "off"}).cuda_graphs
    with pytest.raises(SystemExit):
        parse([*base, "--cuda-graphs", "maybe"], environ={})


def test_host_backend_never_captures() -> None:
    pipeline = load_pipeline("img-to-text", "tiny")
    ctx = ModelContext(Backend.HOST, np, size="tiny", cuda_graphs=True)
    stage = pipeline.stages[2]
    model = build_model(stage.model, ctx, stage.options)
    assert model.graph_safe and not model.uses_graphs  # type: ignore[attr-defined]
    features = np.zeros((3, *model.inputs[0].shape), dtype=model.inputs[0].dtype)
    out = model.infer({"features": features})
    assert out["tokens"].shape == (3, *model.outputs[0].shape)
    assert model.graphed is None  # type: ignore[attr-defined]


def run_plan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What the kernel computes from a plan: every thread's reads, as the strides address them
    from each operand's first element (the pointer the kernel gets), summed in fp32."""
    p = plan(a.shape, a.strides, b.shape, b.strides, a.itemsize)
    b0 = p.grid[2] // p.b1
    size = a.itemsize
    av = np.lib.stride_tricks.as_strided(
        a, (b0, p.b1, p.m, p.k), [s * size for s in p.a_strides], writeable=False
    )
    bv = np.lib.stride_tricks.as_strided(
        b, (b0, p.b1, p.k, p.n), [s * size for s in p.b_strides], writeable=False
    )
    out = np.matmul(av.astype(np.float32), bv.astype(np.float32)).astype(a.dtype)
    assert p.grid[0] * THREADS >= p.n and p.grid[1] == p.m
    return out.reshape(p.out_shape)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (np.ones((5, 64)), np.ones((64, 300))),
        (np.ones((4, 1, 512)), np.ones((512, 96))),  # batch against shared weights
        (np.ones((3, 8, 1, 64)), np.ones((3, 8, 7, 64)).swapaxes(-1, -2)),  # transposed keys
        (np.ones((3, 8, 1, 7)), np.ones((3, 8, 7, 64))),
        (np.ones((2, 1, 3, 4)), np.ones((5, 4, 6))),  # broadcast on both sides
        (np.ones((6, 10))[::2, 1:9], np.ones((4, 8, 3))[1]),  # strided views
    ],
)
def test_kernel_plan_computes_matmul(a: np.ndarray, b: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    a = a * rng.standard_normal(a.shape)
    b = b * rng.standard_normal(b.shape)
    a, b = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_allclose(run_plan(a, b), np.matmul(a, b), rtol=1e-4, atol=1e-4)


def test_kernel_plan_refuses_what_it_cannot_run() -> None:
    f = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="align"):
        plan((2, 3), f.strides, (4, 5), (20, 4), 4)
    with pytest.raises(ValueError, match="two batch"):
        plan((2, 2, 2, 2, 3), (0, 0, 0, 12, 4), (3, 4), (16, 4), 4)
    with pytest.raises(ValueError, match="negative"):
        plan((2, 3), (12, -4), (3, 4), (16, 4), 4)
    with pytest.raises(ValueError, match="grid"):
        plan((70000, 3), (12, 4), (3, 4), (16, 4), 4)
