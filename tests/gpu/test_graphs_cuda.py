"""CUDA graphs for graph-safe models: a replay computes what an eager run computes, row for row;
inputs are really re-read on every replay; outputs survive the next call; a model that cannot be
captured falls back to eager and still answers right."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from contract.pipeline_config import list_pipelines, load_pipeline
from services.models.base import ReferenceModel, spec
from services.models.cublas import gemm
from services.models.graphs import bucket, capturable_matmul
from services.models.kernels import bmm
from services.pipelines.runner import make_input, stage_feeds
from services.stage.plugin import ModelContext, build_model

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")


def ctx(graphs: bool) -> ModelContext:
    return ModelContext(
        Backend.CUDA, cupy, size="full", compute_dtype=np.dtype(np.float16), cuda_graphs=graphs
    )


def decoders() -> tuple[ReferenceModel, ReferenceModel]:
    """The full-size decoder with graphs on, and the same weights with graphs off (cuBLAS)."""
    pipeline = load_pipeline("img-to-text", "full")
    s = pipeline.stages[2]
    on = build_model(s.model, ctx(True), s.options)
    off = build_model(s.model, ctx(False), s.options)
    return on, off  # type: ignore[return-value]


def features(n: int, seed: int) -> object:
    """Encoder outputs for n real images (the decoder's inputs)."""
    pipeline = load_pipeline("img-to-text", "full")
    pre = build_model(pipeline.stages[0].model, ctx(False), pipeline.stages[0].options)
    enc = build_model(pipeline.stages[1].model, ctx(False), pipeline.stages[1].options)
    images = cupy.asarray(np.stack([make_input(pipeline, seed + i) for i in range(n)]))
    return enc.infer(pre.infer({"image": images}))["features"]


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "transpose_b"),
    [
        ((5, 64), (64, 300), False),  # 2-D
        ((4, 1, 512), (512, 1536), False),  # a batch against shared weights (broadcast)
        ((3, 8, 1, 64), (3, 8, 7, 64), True),  # per-head scores against transposed keys
        ((3, 8, 1, 7), (3, 8, 7, 64), False),  # per-head weights against values
    ],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("mm", [bmm, gemm], ids=["kernel", "cublas-direct"])
def test_capturable_matmuls_agree_with_cupy(mm, a_shape, b_shape, transpose_b, dtype) -> None:
    rng = np.random.default_rng(0)
    a = cupy.asarray(rng.standard_normal(a_shape).astype(dtype))
    b = cupy.asarray(rng.standard_normal(b_shape).astype(dtype))
    if transpose_b:
        b = b.swapaxes(-1, -2)  # a strided view, as attention passes it
    got = mm(a, b)
    want = (a.astype(np.float32) @ b.astype(np.float32)).astype(dtype)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 2e-2 if dtype == np.float16 else 1e-4
    np.testing.assert_allclose(cupy.asnumpy(got), cupy.asnumpy(want), rtol=tol, atol=tol)


def test_direct_cublas_is_captured_and_replayed() -> None:
    assert capturable_matmul() is gemm  # the library CuPy loaded can be called directly
    a = cupy.asarray(np.random.default_rng(1).standard_normal((8, 64)).astype(np.float16))
    w = cupy.asarray(np.random.default_rng(2).standard_normal((64, 32)).astype(np.float16))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        gemm(a, w)  # warm: handle, workspace
        stream.synchronize()
        stream.begin_capture()
        out = gemm(a, w)
        graph = stream.end_capture()
        a[...] = a * 2
        graph.launch(stream)
        stream.synchronize()
    want = (a.astype(np.float32) @ w.astype(np.float32)).astype(np.float16)
    np.testing.assert_allclose(cupy.asnumpy(out), cupy.asnumpy(want), rtol=2e-2, atol=2e-2)


def test_replay_matches_eager_row_for_row() -> None:
    graphed, cublas = decoders()
    assert graphed.uses_graphs and not cublas.uses_graphs
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        a, b = features(4, 0), features(4, 100)
        # 3 rows run in the bucket of 4: the same kernels as an eager batch of 4 with those rows
        out_a = graphed.infer({"features": a[:3]})
        out_b = graphed.infer({"features": b[:3]})  # the replay re-reads its inputs
        # the same model eagerly, with the kernels its graph recorded
        ref_a = graphed.forward_capturable({"features": a})
        ref_b = graphed.forward_capturable({"features": b})
        base_a = cublas.infer({"features": a})
        stream.synchronize()
    assert graphed.graphed is not None and graphed.graphed.disabled is None
    assert graphed.graphed.launches == 2 and list(graphed.graphed.graphs)[0][1] == bucket(3) == 4
    got_a, got_b = cupy.asnumpy(out_a["tokens"]), cupy.asnumpy(out_b["tokens"])
    assert got_a.shape == (3, 12)
    # out_a was returned before the second replay and must not have been overwritten by it
    np.testing.assert_array_equal(got_a, cupy.asnumpy(ref_a["tokens"][:3]))
    np.testing.assert_array_equal(got_b, cupy.asnumpy(ref_b["tokens"][:3]))
    assert not np.array_equal(got_a, got_b)
    # the kernel matmul and cuBLAS sum in different orders, and one flipped near-tie changes
    # every later greedy token of its row; the first token of each row must agree
    np.testing.assert_array_equal(got_a[:, 0], cupy.asnumpy(base_a["tokens"][:3, 0]))


def test_encoder_replay_matches_its_eager_run() -> None:
    pipeline = load_pipeline("img-to-text", "full")
    pre = build_model(pipeline.stages[0].model, ctx(False), pipeline.stages[0].options)
    s = pipeline.stages[1]
    graphed = build_model(s.model, ctx(True), s.options)
    eager = build_model(s.model, ctx(False), s.options)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        images = cupy.asarray(np.stack([make_input(pipeline, i) for i in range(2)]))
        x = pre.infer({"image": images})["image"]
        got = graphed.infer({"image": x})["features"]
        same = graphed.forward_capturable({"image": x})["features"]
        cublas_eager = eager.infer({"image": x})["features"]
        stream.synchronize()
    assert graphed.graphed is not None and graphed.graphed.disabled is None
    np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(same))
    np.testing.assert_allclose(
        cupy.asnumpy(got).astype(np.float32),
        cupy.asnumpy(cublas_eager).astype(np.float32),
        rtol=5e-2,
        atol=5e-2,
    )


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
    graphed, _ = decoders()
    out = graphed.infer({"features": features(2, 7)})
    cupy.cuda.Device().synchronize()
    assert out["tokens"].shape == (2, 12)
    assert (
        graphed.graphed is not None
        and not graphed.graphed.graphs
        and graphed.graphed.disabled is None
    )


def graph_safe_stages() -> list[tuple[str, str]]:
    out = []
    for name in list_pipelines():
        pipeline = load_pipeline(name, "full")
        for s in pipeline.stages:
            model = build_model(s.model, ModelContext(Backend.HOST, np, size="tiny"), {})
            if getattr(model, "graph_safe", False):
                out.append((name, s.name))
    return out


@pytest.mark.parametrize(("pipeline_name", "stage_name"), graph_safe_stages())
def test_every_graph_safe_stage_captures_and_replays_exactly(pipeline_name, stage_name) -> None:
    """A stage marked graph-safe must capture (no fallback) and its replay must equal its
    capturable forward run eagerly, row for row, at a batch padded into its bucket."""
    pipeline = load_pipeline(pipeline_name, "full")
    s = next(s for s in pipeline.stages if s.name == stage_name)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        batch = cupy.asarray(np.stack([make_input(pipeline, i) for i in range(4)]))
        feeds = stage_feeds(pipeline, ctx(False), batch, stage_name)
        graphed = build_model(s.model, ctx(True), s.options)
        got = graphed.infer({k: v[:3] for k, v in feeds.items()})
        same = graphed.forward_capturable(feeds)
        stream.synchronize()
    assert graphed is not None and graphed.graphed is not None
    assert graphed.graphed.disabled is None, graphed.graphed.disabled
    for key, arr in got.items():
        np.testing.assert_array_equal(cupy.asnumpy(arr), cupy.asnumpy(same[key][:3]))
