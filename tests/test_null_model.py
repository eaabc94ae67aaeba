"""The null model plug-in and the null pipelines (services/pipelines/null): inputs reach the
outputs unchanged or byte for byte, on the host backend; the pipelines are wired right and are
not in the default set."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from common.errors import InvalidArgument
from contract.pipeline_config import list_pipelines, load_pipeline, pipelines_dir
from services.models.null import null
from services.pipelines import runner
from services.stage.plugin import ModelContext

NULL_DIR = pipelines_dir() / "null"
CTX = ModelContext(Backend.HOST, np)


def test_by_default_one_4kib_input_is_forwarded_as_the_same_array():
    model = null(CTX)
    batch = np.arange(2 * 4096, dtype=np.uint8).reshape(2, 4096)
    out = model.infer({"x": batch})
    assert [s.name for s in model.inputs] == ["x"] and [s.name for s in model.outputs] == ["x"]
    assert out["x"] is batch


def test_copy_gives_an_equal_array_that_is_not_the_input():
    batch = np.ones((3, 16), dtype=np.float32)
    model = null(CTX, inputs=[{"name": "t", "dtype": "float32", "shape": [16]}], copy=True)
    out = model.infer({"t": batch})["t"]
    assert out is not batch and np.array_equal(out, batch)


def test_an_output_of_another_spec_holds_the_inputs_leading_bytes_zero_padded():
    model = null(
        CTX,
        inputs=[{"name": "a", "dtype": "uint8", "shape": [8]}],
        outputs=[
            {"name": "short", "dtype": "int32", "shape": [1]},
            {"name": "long", "dtype": "uint8", "shape": [3, 4]},
        ],
    )
    batch = np.arange(16, dtype=np.uint8).reshape(2, 8)
    out = model.infer({"a": batch})
    assert out["short"].shape == (2, 1) and out["short"].dtype == np.int32
    assert out["short"].view(np.uint8).tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert out["long"].shape == (2, 3, 4)
    assert out["long"].reshape(2, -1).tolist() == [
        [*range(8), 0, 0, 0, 0],
        [*range(8, 16), 0, 0, 0, 0],
    ]


def test_outputs_read_the_inputs_in_turn():
    model = null(
        CTX,
        inputs=[{"name": "a", "dtype": "uint8", "shape": [4]},
                {"name": "b", "dtype": "uint8", "shape": [4]}],
        outputs=[{"name": n, "dtype": "uint8", "shape": [4]} for n in ("p", "q", "r")],
    )  # fmt: skip
    a, b = np.zeros((1, 4), np.uint8), np.ones((1, 4), np.uint8)
    out = model.infer({"a": a, "b": b})
    assert out["p"] is a and out["q"] is b and out["r"] is a


@pytest.mark.parametrize(
    "options",
    [
        {"inputs": []},
        {"inputs": "x"},
        {"inputs": [{"name": "x", "dtype": "complex64", "shape": [4]}]},
        {"inputs": [{"name": "x", "dtype": "uint8", "shape": [0]}]},
        {"inputs": [{"name": "x", "dtype": "uint8"}]},
        {"outputs": [{"name": "y", "dtype": "uint8", "shape": [1]}] * 2},
        {"copy": "yes"},
    ],
)
def test_bad_options_are_invalid_argument(options):
    with pytest.raises(InvalidArgument):
        null(CTX, **options)


def test_the_null_pipelines_are_not_in_the_default_set():
    assert list_pipelines(NULL_DIR) == ["null-dag", "null1", "null3"]
    assert not set(list_pipelines()) & set(list_pipelines(NULL_DIR))


@pytest.mark.parametrize("name", ["null1", "null3", "null-dag"])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_each_null_pipeline_is_wired_and_runs_with_4kib_tensors(name, size):
    pipeline = load_pipeline(name, size, NULL_DIR)
    models = runner.build_models(pipeline, CTX)
    for model in models.values():
        for spec in [*model.inputs, *model.outputs]:
            assert spec.dtype.itemsize * int(np.prod(spec.shape)) == 4096
    item = runner.make_input(pipeline, seed=3)
    out = runner.run_direct(pipeline, CTX, item)
    # no arithmetic anywhere: the answer is the query's bytes
    assert out.tobytes() == item.tobytes()
