"""PyTorch stages on the host backend, small models: JPEG decoding, crops, the classifier and
the decoders against their torch modules run directly, log-mel against Whisper's formula in
NumPy, weights files, the bring-your-own-model factory and its spec checks, and the torch
pipelines through the in-process runner. Skipped where torch is not installed (CI)."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from common import jpeg  # noqa: E402
from common.backend import Backend  # noqa: E402
from common.errors import InvalidArgument, NotFound  # noqa: E402
from contract.pipeline_config import load_pipeline, pipelines_dir  # noqa: E402
from services.pipelines import runner  # noqa: E402
from services.stage.plugin import ModelContext, build_model  # noqa: E402
from services.torchmodels import audio, byom, decoding, detection, vision  # noqa: E402

CTX = ModelContext(Backend.HOST, np, "tiny", seed=0)
TORCH_DIR = pipelines_dir() / "torch"
EXAMPLE = "examples/byom/my-classifier.yaml"
SPEC_IMAGE = [{"name": "image", "dtype": "uint8", "shape": [3, 32, 32]}]


def framed(images: list[np.ndarray], max_bytes: int = 16384) -> np.ndarray:
    return np.stack([jpeg.encoded_frame(img, max_bytes) for img in images])


# -- JPEG decoding -----------------------------------------------------------------------------


def test_jpeg_decode_gives_what_a_reference_decoder_gives_in_chw():
    rng = np.random.default_rng(0)
    images = [jpeg.synthetic_image(rng, 48, 80) for _ in range(3)]
    batch = framed(images)
    stage = vision.jpeg_decode(CTX, out_size=(48, 80), max_bytes=16384)
    got = stage.infer({"jpeg": batch})["image"]
    assert got.dtype == np.uint8 and got.shape == (3, 3, 48, 80)
    for row, vector in zip(got, batch, strict=True):
        want = np.asarray(Image.open(io.BytesIO(jpeg.unpack(vector))).convert("RGB"))
        assert np.array_equal(row.transpose(1, 2, 0), want)


def test_jpeg_decode_resizes_other_sizes_and_decodes_an_empty_row_to_black():
    rng = np.random.default_rng(1)
    batch = framed([jpeg.synthetic_image(rng, 96, 64)])
    batch = np.concatenate([batch, np.zeros_like(batch)])
    got = vision.jpeg_decode(CTX, out_size=(32, 32), max_bytes=16384).infer({"jpeg": batch})
    assert got["image"].shape == (2, 3, 32, 32)
    assert got["image"][0].any() and not got["image"][1].any()


def test_jpeg_decode_of_bytes_that_are_no_jpeg_is_invalid_argument():
    batch = np.stack([jpeg.pack(b"\xff\xd8 this is not a jpeg", 256)])
    stage = vision.jpeg_decode(CTX, out_size=(8, 8), max_bytes=256)
    with pytest.raises(InvalidArgument) as e:
        stage.infer({"jpeg": batch})
    assert e.value.code.name == "INVALID_ARGUMENT"


# -- detection, crops, classification ----------------------------------------------------------


def test_the_detector_returns_k_boxes_inside_the_image_and_the_same_weights_per_seed():
    image = np.random.default_rng(2).integers(0, 256, (2, 3, 64, 96), dtype=np.uint8)
    a = vision.detector(CTX, image_size=(64, 96), max_boxes=5, work_size=128, num_classes=5)
    b = vision.detector(CTX, image_size=(64, 96), max_boxes=5, work_size=128, num_classes=5)
    out = a.infer({"image": image})
    assert out["boxes"].shape == (2, 5, 4) and out["labels"].dtype == np.int32
    boxes = out["boxes"]
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 2] <= 96).all()
    assert (boxes[..., 1] >= 0).all() and (boxes[..., 3] <= 64).all()
    assert (out["scores"] > 0).any()
    # calibrated BatchNorm: the backbone's features reach the head, so boxes score differently
    assert len(np.unique(out["scores"][0])) > 1
    for k, v in b.infer({"image": image}).items():
        assert np.array_equal(v, out[k]), k


def ssd(k: int, score_thresh: float = 0.2):
    """torchvision's SSDlite (3 foreground classes, random weights): the reference
    post-processing, and the settings the fast one reads from it."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(0)
    return ssdlite320_mobilenet_v3_large(
        weights=None,
        weights_backbone=None,
        num_classes=4,
        score_thresh=score_thresh,
        detections_per_img=k,
    ).eval()


def both_postprocessings(net, anchors, regression, logits, k):
    """(torchvision's detections of image 0, the fast post-processing's) on the same head
    outputs, at a 128 x 128 work size."""
    fast = detection.from_ssd(net, anchors, 128, candidates=300, k=k)
    with torch.inference_mode():
        want = net.postprocess_detections(
            {"bbox_regression": regression, "cls_logits": logits}, [anchors], [(128, 128)]
        )[0]
        got = fast(regression, logits)
    return want, got


def test_the_detector_keeps_what_torchvisions_ssd_keeps_where_suppressions_do_not_chain():
    # four clusters of near-identical boxes (one crossing each edge: clipping), far apart:
    # within a cluster every pair overlaps beyond the threshold, across clusters none does, so
    # greedy NMS and Fast NMS keep the best box of each class in each cluster
    origins = torch.tensor([[-6.0, 10.0], [40.0, 40.0], [96.0, 70.0], [60.0, 114.0]])
    k = 8
    net = ssd(k)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        corner = origins.repeat_interleave(3, 0) + torch.rand((12, 2), generator=gen) * 2 - 1
        anchors = torch.cat([corner, corner + 20 + torch.rand((12, 2), generator=gen)], 1)
        regression = torch.randn((1, 12, 4), generator=gen) * 0.3
        logits = torch.randn((1, 12, 4), generator=gen) * 2
        boxes = net.box_coder.decode_single(regression[0], anchors).clamp(0, 128)
        iou = box_iou(boxes, boxes)
        same = torch.arange(12)[:, None] // 3 == torch.arange(12)[None, :] // 3
        assert (iou[same] > net.nms_thresh).all() and (iou[~same] == 0).all()  # the premise

        want, (got_boxes, got_scores, got_labels) = both_postprocessings(
            net, anchors, regression, logits, k
        )
        m = len(want["scores"])
        assert m >= 4, seed
        assert torch.equal(got_labels[0, :m], want["labels"]), seed
        torch.testing.assert_close(got_scores[0, :m], want["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got_boxes[0, :m], want["boxes"], rtol=0, atol=1e-4)
        assert not got_scores[0, m:].any() and not got_boxes[0, m:].any()
        assert not got_labels[0, m:].any()


def test_fast_nms_lets_a_suppressed_box_suppress_where_greedy_nms_would_keep_the_third():
    # a > b > c of one class: a overlaps b, b overlaps c, a and c overlap less than 0.55
    anchors = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10]])
    logits = torch.tensor([[[0.0, 6, 0, 0], [0, 5, 0, 0], [0, 4, 0, 0]]])
    net = ssd(k=4)
    want, (boxes, scores, labels) = both_postprocessings(
        net, anchors, torch.zeros((1, 3, 4)), logits, k=4
    )
    assert want["boxes"].tolist() == [anchors[0].tolist(), anchors[2].tolist()]
    assert boxes[0].tolist() == [anchors[0].tolist(), [0.0] * 4, [0.0] * 4, [0.0] * 4]
    assert labels[0].tolist() == [1, 0, 0, 0] and scores[0, 0] > 0.9 and not scores[0, 1:].any()


def test_a_box_suppresses_its_own_class_only_and_the_unused_slots_are_zeros():
    anchors = torch.tensor([[10.0, 10, 40, 40], [10, 10, 40, 40], [11, 11, 41, 41]])
    net = ssd(k=5)
    # the same place twice, another class each time: both kept; a third box of the first
    # class overlapping the first: suppressed
    logits = torch.tensor([[[0.0, 6, 0, 0], [0, 0, 6, 0], [0, 5, 0, 0]]])
    _, (boxes, scores, labels) = both_postprocessings(
        net, anchors, torch.zeros((1, 3, 4)), logits, k=5
    )
    assert labels[0].tolist() == [1, 2, 0, 0, 0]
    assert boxes[0, :2].tolist() == [anchors[0].tolist()] * 2
    assert (scores[0, :2] > 0.9).all()
    assert not boxes[0, 2:].any() and not scores[0, 2:].any()


def test_each_image_of_a_batch_gets_what_it_gets_alone():
    stage = vision.detector(CTX, image_size=(64, 96), max_boxes=6, work_size=128, num_classes=5)
    anchors = int(stage.anchor.shape[0])
    gen = torch.Generator().manual_seed(7)
    regression = torch.randn((3, anchors, 4), generator=gen)
    logits = torch.randn((3, anchors, 5), generator=gen) * 3
    with torch.inference_mode():
        batch = stage.postprocess(regression, logits)
        for i in range(3):
            alone = stage.postprocess(regression[i : i + 1], logits[i : i + 1])
            for b, a in zip(batch, alone, strict=True):
                assert torch.equal(b[i : i + 1], a), i
    assert (batch[1] > 0).all()  # every slot filled: rows differ by content, not by padding


def test_the_post_processing_reads_nothing_on_the_host_and_has_fixed_shapes():
    # meta tensors have shapes and no values: .item(), nonzero, masks and `if tensor` all raise
    meta = torch.device("meta")
    for anchors, classes, k in ((50, 5, 8), (2, 2, 4)):  # the second: fewer pairs than K
        fast = detection.FastPostprocess(
            torch.zeros((anchors, 4), device=meta),
            (128, 128),
            (10, 10, 5, 5),
            4.0,
            0.01,
            0.5,
            300,
            k,
        )
        regression = torch.zeros((3, anchors, 4), device=meta, dtype=torch.float16)
        boxes, scores, labels = fast(regression, torch.zeros((3, anchors, classes), device=meta))
        assert boxes.shape == (3, k, 4) and boxes.dtype == torch.float32
        assert scores.shape == (3, k) and scores.dtype == torch.float32
        assert labels.shape == (3, k)


@pytest.mark.parametrize("options", [{"candidates": 4}, {"num_classes": 1}])
def test_fewer_detector_candidates_than_boxes_or_no_class_is_invalid_argument(options):
    with pytest.raises(InvalidArgument) as e:
        vision.detector(CTX, image_size=(64, 64), max_boxes=8, work_size=128, **options)
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_a_crop_of_the_whole_image_at_its_size_is_the_normalised_image():
    # one sample per output pixel, at its centre: the pixel itself
    image = np.random.default_rng(3).integers(0, 256, (1, 3, 16, 16), dtype=np.uint8)
    boxes = np.array([[[0, 0, 16, 16], [0, 0, 8, 8]]], dtype=np.float32)
    crops = vision.crop(
        CTX, image_size=(16, 16), max_boxes=2, crop_size=16, sampling_ratio=1
    ).infer({"image": image, "boxes": boxes})["crops"]
    mean = np.array(vision.IMAGENET_MEAN).reshape(3, 1, 1)
    std = np.array(vision.IMAGENET_STD).reshape(3, 1, 1)
    want = (image[0] / 255 - mean) / std
    assert crops.shape == (1, 2, 3, 16, 16)
    np.testing.assert_allclose(crops[0, 0], want, atol=1e-5)
    assert not np.allclose(crops[0, 1], want, atol=1e-2)  # the second box is a quarter


def test_the_classifier_answers_the_argmax_of_its_resnet_for_every_crop():
    crops = np.random.default_rng(4).normal(size=(2, 3, 3, 32, 32)).astype(np.float32)
    stage = vision.classifier(CTX, arch="resnet18", max_boxes=3, crop_size=32, num_classes=7)
    got = stage.infer({"crops": crops})["classes"]
    with torch.inference_mode():
        want = stage.net(torch.from_numpy(crops.reshape(6, 3, 32, 32))).argmax(1).reshape(2, 3)
    assert got.dtype == np.int32 and np.array_equal(got, want.numpy())


def test_vit_features_are_the_encoder_tokens_class_token_first():
    image = np.random.default_rng(5).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    stage = vision.vit_encoder(
        CTX, image_size=32, patch_size=8, layers=1, heads=2, hidden=32, mlp=64
    )
    got = stage.infer({"image": image})["features"]
    assert got.shape == (2, 17, 32)
    with torch.inference_mode():
        x = stage.normalise(torch.from_numpy(image).float())
        tokens = stage.net._process_input(x)
        cls = stage.net.class_token.expand(2, -1, -1)
        want = stage.net.encoder(torch.cat([cls, tokens], 1))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


# -- decoders and audio ------------------------------------------------------------------------


def recomputed(logits_of, first: int, tokens: np.ndarray) -> np.ndarray:
    """Greedy choices by running the whole prefix again at every step (no cache)."""
    n, length = tokens.shape
    prefix = torch.cat([torch.full((n, 1), first), torch.from_numpy(tokens[:, :-1]).long()], 1)
    with torch.inference_mode():
        return logits_of(prefix).argmax(-1).numpy()[:, :length]


def test_the_caption_decoders_kv_cache_chooses_what_recomputing_every_prefix_chooses():
    stage = decoding.caption_decoder(
        CTX, context_tokens=5, hidden=32, layers=2, heads=2, vocab=50, max_len=7, start_token=3
    )
    features = np.random.default_rng(6).normal(0, 3, (3, 5, 32)).astype(np.float32)
    got = stage.infer({"features": features})["tokens"]
    assert got.shape == (3, 7) and got.dtype == np.int32
    enc = torch.from_numpy(features)
    want = recomputed(
        lambda ids: stage.net(input_ids=ids, encoder_hidden_states=enc, use_cache=False).logits,
        3,
        got,
    )
    assert np.array_equal(got, want)


def test_the_speech_decoders_kv_cache_chooses_what_recomputing_every_prefix_chooses():
    stage = decoding.speech_decoder(
        CTX, states=6, hidden=32, layers=2, heads=2, vocab=40, max_len=6, start_token=2
    )
    states = np.random.default_rng(7).normal(0, 3, (2, 6, 32)).astype(np.float32)
    got = stage.infer({"states": states})["tokens"]
    enc = torch.from_numpy(states)

    def logits(ids):
        out = stage.decoder(input_ids=ids, encoder_hidden_states=enc, use_cache=False)
        return stage.proj_out(out.last_hidden_state)

    assert np.array_equal(got, recomputed(logits, 2, got))


def test_the_speech_encoder_halves_the_frames():
    stage = decoding.speech_encoder(CTX, mels=8, frames=20, hidden=16, layers=1, heads=2)
    mel = np.random.default_rng(8).normal(size=(2, 8, 20)).astype(np.float32)
    assert stage.infer({"mel": mel})["states"].shape == (2, 10, 16)


def whisper_log_mel(audio_row: np.ndarray, mels: int) -> np.ndarray:
    """Whisper's front end in NumPy: reflect-padded frames, Hann window, |rfft|^2, mel, log."""
    pad = audio.N_FFT // 2
    x = np.pad(audio_row.astype(np.float64), pad, mode="reflect")
    frames = len(audio_row) // audio.HOP
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(audio.N_FFT) / audio.N_FFT)
    idx = np.arange(frames)[:, None] * audio.HOP + np.arange(audio.N_FFT)[None, :]
    power = np.abs(np.fft.rfft(x[idx] * window, axis=1)) ** 2  # [frames, bins]
    mel = audio.mel_filters(mels).T.astype(np.float64) @ power.T
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


def test_log_mel_is_whispers_front_end():
    wave = np.random.default_rng(9).normal(0, 0.1, (2, 3200)).astype(np.float32)
    got = audio.log_mel(CTX, samples=3200, mels=20).infer({"audio": wave})["mel"]
    assert got.shape == (2, 20, 20)
    for row, w in zip(got, wave, strict=True):
        np.testing.assert_allclose(row, whisper_log_mel(w, 20), atol=2e-4)


def test_the_mel_filters_are_torchaudios_slaney_filters():
    taf = pytest.importorskip("torchaudio.functional")
    want = taf.melscale_fbanks(201, 0.0, 8000.0, 80, 16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(audio.mel_filters(80), want.numpy(), rtol=1e-4, atol=1e-7)


def test_the_mel_filters_sum_like_slaney_triangles():
    fb = audio.mel_filters(80)
    assert fb.shape == (201, 80) and (fb >= 0).all()
    # every band is a triangle: one run of non-zero weights
    for band in fb.T:
        nz = np.flatnonzero(band)
        assert nz.size and np.all(np.diff(nz) == 1)


# -- weights -----------------------------------------------------------------------------------


def test_a_weights_file_replaces_the_random_weights(tmp_path):
    stage = vision.classifier(CTX, arch="resnet18", max_boxes=1, crop_size=32, num_classes=4)
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in stage.net.state_dict().items()
    }
    path = tmp_path / "resnet.pt"
    torch.save(state, path)
    loaded = vision.classifier(
        CTX, arch="resnet18", max_boxes=1, crop_size=32, num_classes=4, weights=str(path)
    )
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_missing_weights_file_is_not_found_and_a_mismatched_one_invalid_argument(tmp_path):
    with pytest.raises(NotFound):
        vision.classifier(CTX, arch="resnet18", num_classes=4, weights=str(tmp_path / "no.pt"))
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(4, 512)}, path)
    with pytest.raises(InvalidArgument, match="cannot load weights"):
        vision.classifier(CTX, arch="resnet18", num_classes=4, weights=str(path))


# -- bring your own model ----------------------------------------------------------------------


def test_the_example_factory_is_a_stage_that_answers_what_its_module_computes():
    from examples.byom.classifier import build

    stage = byom.module(
        CTX,
        factory="examples.byom.classifier:build",
        kwargs={"classes": 6, "width": 8},
        inputs=SPEC_IMAGE,
        outputs=[
            {"name": "top", "dtype": "int32", "shape": [3]},
            {"name": "probs", "dtype": "float32", "shape": [6]},
        ],
    )
    image = np.random.default_rng(10).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    got = stage.infer({"image": image})
    torch.manual_seed(0)
    direct = build(classes=6, width=8)
    direct.load_state_dict(stage.net.state_dict())
    with torch.inference_mode():
        want = direct.eval()(torch.from_numpy(image))
    assert np.array_equal(got["top"], want["top"].numpy())
    np.testing.assert_allclose(got["probs"], want["probs"].numpy(), rtol=1e-6)


def test_the_example_pipeline_runs_as_written():
    for size in ("tiny", "full"):
        pipe = load_pipeline(EXAMPLE, size)
        out = runner.run_direct(pipe, CTX, runner.make_input(pipe, 0))
        assert out.shape == (3,) and out.dtype == np.int32


def spec_error(**options) -> InvalidArgument:
    base = {
        "factory": "examples.byom.classifier:build",
        "inputs": SPEC_IMAGE,
        "outputs": [
            {"name": "top", "dtype": "int32", "shape": [3]},
            {"name": "probs", "dtype": "float32", "shape": [10]},
        ],
    }
    with pytest.raises(InvalidArgument) as e:
        byom.module(CTX, **{**base, **options})
    assert e.value.code.name == "INVALID_ARGUMENT"
    return e.value


def test_a_declared_output_shape_the_module_does_not_give_fails_at_load_naming_it():
    err = spec_error(
        outputs=[
            {"name": "top", "dtype": "int32", "shape": [3]},
            {"name": "probs", "dtype": "float32", "shape": [1000]},
        ]
    )
    assert "'probs'" in err.message and "1000" in err.message


def test_an_output_missing_from_the_modules_result_fails_at_load():
    err = spec_error(outputs=[{"name": "labels", "dtype": "int32", "shape": [3]}])
    assert "labels" in err.message


def test_a_float_output_declared_as_integers_fails_at_load():
    err = spec_error(
        outputs=[
            {"name": "top", "dtype": "int32", "shape": [3]},
            {"name": "probs", "dtype": "int32", "shape": [10]},
        ]
    )
    assert "probs" in err.message


def test_inputs_the_module_cannot_take_fail_at_load():
    spec_error(inputs=[{"name": "image", "dtype": "uint8", "shape": [5, 32, 32]}])


def test_bad_factories_and_specs_are_invalid_argument():
    spec_error(factory="examples.byom.nowhere:build")
    spec_error(factory="examples.byom.classifier:nothing")
    spec_error(factory="numpy:zeros", kwargs={"shape": 3})  # not a torch.nn.Module
    spec_error(kwargs={"colours": 3})
    spec_error(inputs=[{"name": "image", "dtype": "complex64", "shape": [3]}])
    spec_error(inputs=[{"name": "image", "shape": [3]}])
    spec_error(outputs=[])


def test_a_byom_stage_is_built_through_the_plugin_path_like_any_stage():
    model = build_model(
        "services.torchmodels.byom:module",
        CTX,
        {
            "factory": "examples.byom.classifier:build",
            "inputs": SPEC_IMAGE,
            "outputs": [
                {"name": "top", "dtype": "int32", "shape": [3]},
                {"name": "probs", "dtype": "float32", "shape": [10]},
            ],
        },
    )
    assert [s.name for s in model.inputs] == ["image"]
    assert [s.name for s in model.outputs] == ["top", "probs"]


# -- pipelines ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["torch-video-analytics", "torch-captioning", "torch-speech-to-text"]
)
def test_each_torch_pipeline_runs_tiny_on_the_host_and_answers_per_input(name):
    pipe = load_pipeline(str(TORCH_DIR / f"{name}.yaml"), "tiny")
    items = np.stack([runner.make_input(pipe, seed) for seed in (1, 2)])
    batch = runner.run_batch(pipe, CTX, items)
    for i, item in enumerate(items):
        # a batch answers each row as that row alone does
        assert np.array_equal(batch[i], runner.run_direct(pipe, CTX, item)), (name, i)
    runner.clear_cache()
