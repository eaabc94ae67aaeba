"""CUDA graphs for graph-safe models: a replay computes what an eager run computes, row for row;
inputs are really re-read on every replay; outputs survive the next call; a model that cannot be
captured falls back to eager and still answers right."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from common.pipeline_config import load_pipeline
from services.models.base import ReferenceModel, spec
from services.models.graphs import bucket
from services.pipelines.runner import make_input
from services.stage.plugin import ModelContext, build_model

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")


def ctx(graphs: bool) -> ModelContext:
    return ModelContext(
        Backend.CUDA, cupy, size="full", compute_dtype=np.dtype(np.float16), cuda_graphs=graphs
    )


def models(stage: str) -> tuple[ReferenceModel, ReferenceModel]:
    pipeline = load_pipeline("img-to-text", "full")
    s = next(s for s in pipeline.stages if s.name == stage)
    return build_model(s.model, ctx(True), s.options), build_model(s.model, ctx(False), s.options)  # type: ignore[return-value]


def features(n: int, seed: int) -> object:
    """Encoder outputs for n real images (the decoder's inputs)."""
    pipeline = load_pipeline("img-to-text", "full")
    pre = build_model(pipeline.stages[0].model, ctx(False), pipeline.stages[0].options)
    enc = build_model(pipeline.stages[1].model, ctx(False), pipeline.stages[1].options)
    images = cupy.asarray(np.stack([make_input(pipeline, seed + i) for i in range(n)]))
    return enc.infer(pre.infer({"image": images}))["features"]


@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_replay_matches_eager_row_for_row(stage: str) -> None:
    graphed, eager = models(stage)
    assert graphed.uses_graphs and not eager.uses_graphs
    stream = cupy.cuda.Stream(non_blocking=True)
    name = graphed.inputs[0].name
    with stream:
        if stage == "decode":
            a, b = features(4, 0), features(4, 100)
        else:
            pipeline = load_pipeline("img-to-text", "full")
            pre = build_model(pipeline.stages[0].model, ctx(False), pipeline.stages[0].options)
            a = pre.infer(
                {"image": cupy.asarray(np.stack([make_input(pipeline, i) for i in range(4)]))}
            )["image"]
            b = pre.infer(
                {"image": cupy.asarray(np.stack([make_input(pipeline, 100 + i) for i in range(4)]))}
            )["image"]
        # 3 rows run in the bucket of 4: the same kernels as an eager batch of 4 with those rows
        out_a = graphed.infer({name: a[:3]})
        out_b = graphed.infer({name: b[:3]})  # the replay re-reads its inputs
        ref_a = eager.infer({name: a})
        ref_b = eager.infer({name: b})
        stream.synchronize()
    assert graphed.graphed is not None and graphed.graphed.disabled is None
    assert graphed.graphed.launches == 2 and list(graphed.graphed.graphs)[0][1] == bucket(3) == 4
    for key in out_a:
        assert out_a[key].shape == (3, *ref_a[key].shape[1:])
        # out_a was returned before the second replay and must not have been overwritten by it
        np.testing.assert_array_equal(cupy.asnumpy(out_a[key]), cupy.asnumpy(ref_a[key][:3]))
        np.testing.assert_array_equal(cupy.asnumpy(out_b[key]), cupy.asnumpy(ref_b[key][:3]))
        assert not np.array_equal(cupy.asnumpy(out_a[key]), cupy.asnumpy(out_b[key]))


class HostSyncing(ReferenceModel):
    """Reads a value back to the host mid-forward: cannot be captured."""

    graph_safe = True

    def __init__(self, c: ModelContext) -> None:
        super().__init__(c, "test/host-syncing")
        self.inputs = [spec("x", np.float16, (8,))]
        self.outputs = [spec("y", np.float16, (8,))]

    def forward(self, batch):
        x = batch["x"]
        scale = float(x.max().get()) or 1.0
        return {"y": x / x.dtype.type(scale)}


def test_uncapturable_model_falls_back_to_eager_and_answers() -> None:
    model = HostSyncing(ctx(True))
    x = cupy.arange(16, dtype=cupy.float16).reshape(2, 8) + 1
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        first = model.infer({"x": x})
        second = model.infer({"x": x * 2})
        # the stream is usable after the failed capture
        check = (x + 1).sum()
        stream.synchronize()
    assert model.graphed is not None and model.graphed.disabled
    expected = cupy.asnumpy(x) / 16
    np.testing.assert_allclose(cupy.asnumpy(first["y"]), expected, rtol=1e-3)
    np.testing.assert_allclose(cupy.asnumpy(second["y"]), expected, rtol=1e-3)
    assert float(check) == float(cupy.asnumpy(x).sum() + 16)


def test_legacy_stream_runs_eagerly() -> None:
    graphed, _ = models("decode")
    out = graphed.infer({"features": features(2, 7)})
    cupy.cuda.Device().synchronize()
    assert out["tokens"].shape == (2, 12)
    assert (
        graphed.graphed is not None
        and not graphed.graphed.graphs
        and graphed.graphed.disabled is None
    )
