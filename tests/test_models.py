"""The reference model plug-ins: specs honoured, deterministic weights and outputs, bad options."""

from __future__ import annotations

import numpy as np
import pytest

from common.backend import Backend
from common.errors import InvalidArgument
from contract.pipeline_config import list_pipelines, load_pipeline
from services.pipelines.runner import make_input
from services.stage.plugin import ModelContext, build_model

FP32 = ModelContext(Backend.HOST, np)
FP16 = ModelContext(Backend.HOST, np, compute_dtype=np.dtype(np.float16))


def stage_inputs(pipeline, models, item, n=1):
    """Runs the pipeline stage by stage, yielding (stage, model, feeds, outputs)."""
    values = {"input": np.stack([item] * n)}
    for stage in pipeline.stages:
        model = models[stage.name]
        feeds = {k: values[src] for k, src in stage.inputs.items()}
        out = model.infer(feeds)
        for k, v in out.items():
            values[f"{stage.name}.{k}"] = v
        yield stage, model, feeds, out


def build_all(pipeline, ctx):
    return {s.name: build_model(s.model, ctx, s.options) for s in pipeline.stages}


@pytest.mark.parametrize("ctx", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list_pipelines())
def test_every_stage_returns_exactly_its_output_specs(name, ctx):
    pipeline = load_pipeline(name, "tiny")
    models = build_all(pipeline, ctx)
    for stage, model, feeds, out in stage_inputs(pipeline, models, make_input(pipeline, 3), n=2):
        assert set(out) == {s.name for s in model.outputs}, stage.name
        for spec in model.outputs:
            arr = out[spec.name]
            assert isinstance(arr, np.ndarray), (stage.name, spec.name)
            assert arr.dtype == spec.dtype, (stage.name, spec.name, arr.dtype)
            assert arr.shape == (2, *spec.shape), (stage.name, spec.name, arr.shape)
            assert arr.flags.c_contiguous, (stage.name, spec.name)  # copied as-is into buffers
            if arr.dtype.kind == "f":
                assert np.isfinite(arr).all(), (stage.name, spec.name)
        for spec in model.inputs:
            assert feeds[spec.name].shape[1:] == spec.shape
        if ctx is FP16:
            float_outputs = [s for s in model.outputs if s.dtype.kind == "f" and s.name != "scores"]
            assert all(s.dtype == np.float16 for s in float_outputs), stage.name


@pytest.mark.parametrize("name", list_pipelines())
def test_same_seed_same_outputs_different_seed_different(name):
    pipeline = load_pipeline(name, "tiny")
    item = make_input(pipeline, 5)
    a = list(stage_inputs(pipeline, build_all(pipeline, FP32), item))
    b = list(stage_inputs(pipeline, build_all(pipeline, FP32), item))
    other = ModelContext(Backend.HOST, np, seed=1)
    c = list(stage_inputs(pipeline, build_all(pipeline, other), item))
    for (stage, _, _, oa), (_, _, _, ob) in zip(a, b, strict=True):
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key], err_msg=f"{stage.name}.{key}")
    # every model with weights changes with the seed (the first, weightless stages may not)
    changed = [
        any(not np.array_equal(oa[k], oc[k]) for k in oa)
        for (_, _, _, oa), (_, _, _, oc) in zip(a, c, strict=True)
    ]
    assert changed[-1] or changed[-2], changed


@pytest.mark.parametrize("name", list_pipelines())
def test_an_item_gives_the_same_result_alone_or_in_a_batch(name):
    """Batch composition changes GEMM shapes, so only closeness is promised across batch sizes;
    alone, the result is bit-for-bit repeatable."""
    pipeline = load_pipeline(name, "tiny")
    models = build_all(pipeline, FP32)
    items = [make_input(pipeline, s) for s in range(3)]
    alone = [list(stage_inputs(pipeline, models, x))[-1][3] for x in items]
    again = [list(stage_inputs(pipeline, models, x))[-1][3] for x in items]
    for a, b in zip(alone, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    values = {"input": np.stack(items)}
    for stage in pipeline.stages:
        out = models[stage.name].infer({k: values[s] for k, s in stage.inputs.items()})
        values.update({f"{stage.name}.{k}": v for k, v in out.items()})
    last = pipeline.stages[-1].name
    for k in alone[0]:
        batched = values[f"{last}.{k}"]
        for i, a in enumerate(alone):
            if a[k].dtype.kind == "f":
                np.testing.assert_allclose(batched[i], a[k][0], rtol=1e-4, atol=1e-4)
            else:
                # discrete outputs may flip only where rounding decides a near-tie
                assert (batched[i] == a[k][0]).mean() >= 0.75


def test_outputs_depend_on_the_input():
    for name in list_pipelines():
        pipeline = load_pipeline(name, "tiny")
        models = build_all(pipeline, FP32)
        outs = {
            list(stage_inputs(pipeline, models, make_input(pipeline, s)))[-1][3][
                pipeline.output_ref[1]
            ].tobytes()
            for s in range(6)
        }
        assert len(outs) >= 3, name


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("services.models.img_to_text:decoder", {"d_model": 30, "heads": 4}),
        ("services.models.img_to_text:encoder", {"channels": []}),
        ("services.models.img_to_text:preprocess", {"out_size": 0}),
        ("services.models.speech_to_text:features", {"samples": 100, "n_fft": 256}),
        ("services.models.video_analytics:detector", {"proposals": 1000}),
        ("services.models.video_analytics:crop", {"frame_size": [64]}),
        ("services.models.text_to_img:text_encoder", {"layers": True}),
    ],
)
def test_bad_options_are_invalid_argument(path, options):
    with pytest.raises(InvalidArgument):
        build_model(path, FP32, options)


def test_ctc_output_is_left_aligned_and_padded():
    pipeline = load_pipeline("speech-to-text", "tiny")
    models = build_all(pipeline, FP32)
    for s in range(4):
        tokens = list(stage_inputs(pipeline, models, make_input(pipeline, s)))[-1][3]["tokens"][0]
        pads = tokens == -1
        first_pad = int(pads.argmax()) if pads.any() else len(tokens)
        assert pads[first_pad:].all() and not pads[:first_pad].any()
        assert ((tokens[:first_pad] > 0) & (tokens[:first_pad] < 16)).all()  # no blanks kept


def test_detector_boxes_are_inside_the_frame_and_non_empty():
    pipeline = load_pipeline("video-analytics", "tiny")
    models = build_all(pipeline, FP32)
    frames = np.stack([make_input(pipeline, s) for s in range(4)])
    out = models["detect"].infer({"frame": frames})
    boxes, scores = out["boxes"], out["scores"]
    assert boxes.dtype == np.int32 and boxes.shape == (4, 4, 4)
    x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all()
    assert (x1 > x0).all() and (y1 > y0).all()
    assert (np.diff(scores, axis=1) <= 0).all()  # proposals come best first


def test_torch_adapter_on_cpu_matches_the_module():
    torch = pytest.importorskip("torch")
    model = build_model(
        "services.models.torch_adapter:torch_module",
        FP32,
        {"module": "torch.nn:Linear", "input_shape": [6], "in_features": 6, "out_features": 3},
    )
    assert model.inputs[0].shape == (6,) and model.outputs[0].shape == (3,)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    got = model.infer({"input": x})["output"]
    with torch.no_grad():
        want = model.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cached_decoder_matches_recomputing_the_prefix():
    """The KV-cached greedy loop gives the tokens that re-running every block on the whole
    prefix (causal self-attention, no cache) gives: the old, obviously correct algorithm."""
    from services.models import layers as L

    opts = {"context_tokens": 6, "d_model": 32, "heads": 2, "layers": 2, "vocab": 50, "max_len": 7}
    model = build_model("services.models.img_to_text:decoder", FP32, opts)
    features = np.random.default_rng(3).standard_normal((3, 6, 32), dtype=np.float32)
    got = model.infer({"features": features})["tokens"]
    contexts = [b.context(features) for b in model.blocks]
    seq = np.full((3, 8), 1, dtype=np.int64)
    for t in range(7):
        x = L.embedding(seq[:, : t + 1], model.embed) + model.pos[: t + 1]
        for block, context in zip(model.blocks, contexts, strict=True):
            x = block(x, causal=True, context=context)
        seq[:, t + 1] = model.head(model.norm(x[:, -1])).argmax(axis=-1)
    np.testing.assert_array_equal(got, seq[:, 1:].astype(np.int32))
    assert len({tuple(r) for r in got}) > 1  # the features matter


def test_attention_step_is_the_last_row_of_causal_attention():
    from services.models.blocks import Attention
    from services.models.layers import Init

    attn = Attention(Init(FP32, "t"), 32, 4)
    x = np.random.default_rng(0).standard_normal((2, 5, 32), dtype=np.float32)
    cache = attn.cache(2, 5, np.dtype(np.float32))
    steps = [attn.step(x[:, t : t + 1], cache, t) for t in range(5)]
    np.testing.assert_allclose(
        np.concatenate(steps, axis=1), attn(x, causal=True), rtol=1e-5, atol=1e-6
    )


def test_detector_works_at_its_work_size_and_boxes_are_in_frame_pixels():
    frames = np.zeros((2, 90, 200, 3), dtype=np.uint8)
    frames[0, 10:40, 150:190] = 255  # a bright object on the far right of the wide frame
    frames[1, 50:85, 5:40] = 255
    opts = {"frame_size": [90, 200], "work_size": [32, 32], "proposals": 4, "min_box": 20,
            "max_box": 60}  # fmt: skip
    model = build_model("services.models.video_analytics:detector", FP32, opts)
    assert model.inputs[0].shape == (90, 200, 3)
    boxes = model.infer({"frame": frames})["boxes"]
    x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 200).all() and (y1 <= 90).all()
    assert (x1 > x0).all() and (y1 > y0).all()
    assert x1.max() > 32 and y1.max() > 32  # not the 32×32 work coordinates
    # the default work size is the frame itself: no resize
    same = {"frame_size": [64, 64], "proposals": 4}
    small = np.stack([make_input(load_pipeline("video-analytics", "tiny"), 0)])
    a = build_model("services.models.video_analytics:detector", FP32, same)
    b = build_model(
        "services.models.video_analytics:detector", FP32, {**same, "work_size": [64, 64]}
    )
    np.testing.assert_array_equal(
        a.infer({"frame": small})["boxes"], b.infer({"frame": small})["boxes"]
    )
