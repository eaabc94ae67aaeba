"""CUDA-graph plumbing that holds without a GPU: buckets, warm-up sizes, the setting, and that the
host backend never tries to capture. Capture and replay themselves: tests/gpu/test_graphs_cuda.py.
Padding rows to a bucket relies on every item's result being independent of its batch-mates:
tests/test_models.py::test_an_item_gives_the_same_result_alone_or_in_a_batch."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from common.pipeline_config import load_pipeline
from services.models.graphs import bucket
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


def test_cuda_graphs_setting_defaults_off_and_follows_flag_and_env() -> None:
    base = ["--pipeline", "p", "--stage", "s"]
    assert not parse(base, environ={}).cuda_graphs
    assert parse([*base, "--cuda-graphs", "on"], environ={}).cuda_graphs
    assert parse(base, environ={"CAMELOT_CUDA_GRAPHS": "on"}).cuda_graphs
    assert not parse(
        [*base, "--cuda-graphs", "off"], environ={"CAMELOT_CUDA_GRAPHS": "on"}
    ).cuda_graphs
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
