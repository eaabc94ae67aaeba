"""Each reference layer against a plain NumPy (loops, explicit formulas) implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.backend import Backend
from services.models import audio, blocks
from services.models import layers as L
from services.models.layers import Init
from services.models.speech_to_text import ctc_greedy
from services.models.video_analytics import crop_resize
from services.stage.plugin import ModelContext

RNG = np.random.default_rng(1234)


def naive_conv(x, w, b, stride, pad):
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))).astype(np.float64)
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, cout, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    return out + b.reshape(1, -1, 1, 1)


@pytest.mark.parametrize(
    ("k", "stride", "pad", "hw"),
    [
        (3, 1, 1, (7, 6)),
        (3, 2, 1, (9, 9)),
        (1, 1, 0, (5, 4)),
        (1, 2, 0, (6, 5)),
        (7, 2, 3, (11, 10)),
    ],
)
def test_conv2d_matches_naive_loop(k, stride, pad, hw):
    x = RNG.standard_normal((2, 3, *hw)).astype(np.float32)
    w = RNG.standard_normal((4, 3, k, k)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    got = L.conv2d(x, w, b, stride, pad)
    np.testing.assert_allclose(got, naive_conv(x, w, b, stride, pad), rtol=1e-4, atol=1e-4)


def test_conv2d_chunked_im2col_gives_the_same_result(monkeypatch):
    x = RNG.standard_normal((5, 3, 8, 8)).astype(np.float32)
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    whole = L.conv2d(x, w, None, 1, 1)
    monkeypatch.setattr(L, "MAX_COLS_BYTES", 3 * 9 * 64 * 4 * 2)  # two items per chunk
    np.testing.assert_array_equal(L.conv2d(x, w, None, 1, 1), whole)


def test_large_convolutions_multiply_image_by_image(monkeypatch):
    """Past PER_IMAGE_PIXELS a convolution's GEMM is one 2-D call per image (the batched call
    crashed cuBLAS at some MPS shares); the result is the batched one's."""
    x = RNG.standard_normal((3, 2, 8, 8)).astype(np.float32)
    w = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    batched = L.conv2d(x, w, None, 1, 1)
    shapes = []

    def recording(a, b):
        shapes.append(b.shape)
        return a @ b

    monkeypatch.setattr(L, "PER_IMAGE_PIXELS", 64)
    with L.matmul_with(recording):
        per_image = L.conv2d(x, w, None, 1, 1)
    assert shapes == [(18, 64)] * 3
    np.testing.assert_allclose(per_image, batched, rtol=1e-5, atol=1e-5)


def test_linear_and_embedding():
    x = RNG.standard_normal((2, 3, 5)).astype(np.float32)
    w = RNG.standard_normal((5, 4)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    want = np.einsum("nld,do->nlo", x, w) + b
    np.testing.assert_allclose(L.linear(x, w, b), want, rtol=1e-5, atol=1e-5)
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([[0, 3], [2, 9]], dtype=np.int32)  # 9 is out of range: clipped to 3
    np.testing.assert_array_equal(L.embedding(ids, table), table[[[0, 3], [2, 3]]])


def test_layer_norm_matches_formula():
    x = RNG.standard_normal((3, 8)).astype(np.float32) * 5 + 2
    g = RNG.standard_normal(8).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(
        L.layer_norm(x, g, b), (x - mu) / np.sqrt(var + 1e-5) * g + b, atol=1e-5
    )
    assert L.layer_norm(x.astype(np.float16), g, b).dtype == np.float16


def naive_attention(q, k, v, heads, causal):
    n, lq, d = q.shape
    lk, dh = k.shape[1], d // heads
    out = np.zeros((n, lq, d))
    for b in range(n):
        for h in range(heads):
            s = slice(h * dh, (h + 1) * dh)
            for i in range(lq):
                scores = np.array([q[b, i, s] @ k[b, j, s] / math.sqrt(dh) for j in range(lk)])
                if causal:
                    scores[np.arange(lk) > i + (lk - lq)] = -np.inf
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, i, s] = p @ v[b, :, s]
    return out


@pytest.mark.parametrize(
    ("lq", "lk", "causal"), [(4, 4, False), (4, 4, True), (2, 5, True), (3, 6, False)]
)
def test_attention_matches_explicit_softmax(lq, lk, causal):
    q = RNG.standard_normal((2, lq, 8)).astype(np.float32)
    k = RNG.standard_normal((2, lk, 8)).astype(np.float32)
    v = RNG.standard_normal((2, lk, 8)).astype(np.float32)
    got = L.attention(q, k, v, heads=2, causal=causal)
    np.testing.assert_allclose(got, naive_attention(q, k, v, 2, causal), rtol=1e-4, atol=1e-5)


def test_causal_attention_ignores_the_future():
    q = RNG.standard_normal((1, 5, 8)).astype(np.float32)
    kv = RNG.standard_normal((1, 5, 8)).astype(np.float32)
    changed = kv.copy()
    changed[:, 3:] += 10
    a = L.attention(q, kv, kv, 2, causal=True)
    b = L.attention(q, changed, changed, 2, causal=True)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])


def naive_pool(x, k, stride, pad, op):
    fill = -np.inf if op == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    ho = (x.shape[2] + 2 * pad - k) // stride + 1
    wo = (x.shape[3] + 2 * pad - k) // stride + 1
    out = np.zeros((*x.shape[:2], ho, wo), dtype=np.float64)
    for i in range(ho):
        for j in range(wo):
            win = xp[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, :, i, j] = win.max(axis=(2, 3)) if op == "max" else win.mean(axis=(2, 3))
    return out


@pytest.mark.parametrize(("k", "stride", "pad"), [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_pooling_matches_naive(k, stride, pad):
    x = RNG.standard_normal((2, 3, 7, 8)).astype(np.float32)
    np.testing.assert_allclose(
        L.max_pool2d(x, k, stride, pad), naive_pool(x, k, stride, pad, "max")
    )
    np.testing.assert_allclose(
        L.avg_pool2d(x, k, stride, pad), naive_pool(x, k, stride, pad, "avg"), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(L.global_avg_pool(x), x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def naive_resize(x, oh, ow):
    n, c, h, w = x.shape
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            sy = min(max((i + 0.5) * h / oh - 0.5, 0), h - 1)
            sx = min(max((j + 0.5) * w / ow - 0.5, 0), w - 1)
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            out[:, :, i, j] = (
                x[:, :, y0, x0] * (1 - fy) * (1 - fx)
                + x[:, :, y0, x1] * (1 - fy) * fx
                + x[:, :, y1, x0] * fy * (1 - fx)
                + x[:, :, y1, x1] * fy * fx
            )
    return out


def test_upsampling_nearest_and_bilinear():
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(L.upsample_nearest2x(x), x.repeat(2, axis=2).repeat(2, axis=3))
    np.testing.assert_allclose(L.upsample_bilinear2x(x), naive_resize(x, 8, 10), atol=1e-5)
    np.testing.assert_allclose(L.resize_bilinear(x, 3, 7), naive_resize(x, 3, 7), atol=1e-5)
    np.testing.assert_allclose(L.resize_bilinear(x, 4, 5), x, atol=1e-6)  # same size: identity


def test_activations():
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    exact_gelu = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(L.gelu(x), exact_gelu, atol=2e-3)  # tanh approximation
    np.testing.assert_array_equal(L.relu(x), np.where(x > 0, x, 0))
    s = L.softmax(np.stack([x, x * 2]), axis=-1)
    np.testing.assert_allclose(s.sum(-1), 1, rtol=1e-6)
    np.testing.assert_allclose(s[0], np.exp(x - x.max()) / np.exp(x - x.max()).sum(), rtol=1e-5)


def test_log_mel_matches_direct_dft():
    sr, n_fft, hop, mels = 8000, 64, 32, 10
    wave = RNG.standard_normal((2, 300)).astype(np.float32)
    window, filters = audio.hann(n_fft), audio.mel_filterbank(n_fft, mels, sr)
    got = audio.log_mel(wave, n_fft, hop, audio.stft_basis(window), filters)
    t = audio.num_frames(300, n_fft, hop)
    assert got.shape == (2, t, mels) and t == 1 + (300 - 64) // 32
    k = np.arange(n_fft // 2 + 1)[:, None]
    dft = np.exp(-2j * np.pi * k * np.arange(n_fft)[None, :] / n_fft)
    want = np.zeros((2, t, mels))
    for b in range(2):
        for f in range(t):
            seg = wave[b, f * hop : f * hop + n_fft].astype(np.float64) * window
            power = np.abs(dft @ seg) ** 2
            want[b, f] = np.log(filters.astype(np.float64) @ power + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mel_filterbank_shape_and_coverage():
    f = audio.mel_filterbank(256, 20, 16000)
    assert f.shape == (20, 129) and (f >= 0).all() and f.max() <= 1.0 + 1e-6
    peaks = f.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()  # filters ordered by frequency
    assert (f.sum(axis=1) > 0).all()


def test_ctc_greedy_matches_python_reference():
    logits = RNG.standard_normal((6, 12, 5)).astype(np.float32)
    logits[0, :, 0] += 10  # all blanks
    logits[1, :, 3] += 10  # one long repeat
    got = ctc_greedy(logits)
    assert got.dtype == np.int32 and got.shape == (6, 12)
    for row, ids in zip(got, logits.argmax(-1), strict=True):
        want, prev = [], -1
        for i in ids:
            if i != 0 and i != prev:
                want.append(int(i))
            prev = i
        assert row.tolist() == want + [-1] * (12 - len(want))
    assert got[0].tolist() == [-1] * 12 and got[1].tolist() == [3] + [-1] * 11


def test_crop_resize_matches_per_box_loop():
    frames = RNG.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    boxes = np.array(
        [[[0, 0, 24, 20], [3, 5, 10, 9]], [[10, 2, 11, 3], [20, 15, 24, 20]]], np.int32
    )
    got = crop_resize(frames, boxes, 6)
    assert got.shape == (2, 2, 3, 6, 6)
    for n in range(2):
        for k in range(2):
            x0, y0, x1, y1 = boxes[n, k]
            img = frames[n].transpose(2, 0, 1).astype(np.float64)
            for i in range(6):
                for j in range(6):
                    sy = min(max(y0 + (i + 0.5) * (y1 - y0) / 6 - 0.5, 0), 19)
                    sx = min(max(x0 + (j + 0.5) * (x1 - x0) / 6 - 0.5, 0), 23)
                    a, b = int(sy), int(sx)
                    c, d = min(a + 1, 19), min(b + 1, 23)
                    fy, fx = sy - a, sx - b
                    want = (img[:, a, b] * (1 - fy) * (1 - fx) + img[:, a, d] * (1 - fy) * fx
                            + img[:, c, b] * fy * (1 - fx) + img[:, c, d] * fy * fx)  # fmt: skip
                    np.testing.assert_allclose(got[n, k, :, i, j], want, rtol=1e-4, atol=1e-3)
    # a whole-frame box at the frame's own size reproduces the frame
    whole = crop_resize(frames, np.array([[[0, 0, 24, 20]]] * 2, np.int32), 20)
    assert whole.shape == (2, 1, 3, 20, 20)


def test_init_is_seeded_by_seed_and_name():
    def draw(seed, name):
        return Init(ModelContext(Backend.HOST, np, seed=seed), name).normal((4, 4), 1.0)

    np.testing.assert_array_equal(draw(0, "a"), draw(0, "a"))
    assert not np.array_equal(draw(0, "a"), draw(1, "a"))
    assert not np.array_equal(draw(0, "a"), draw(0, "b"))
    half = Init(ModelContext(Backend.HOST, np, compute_dtype=np.dtype(np.float16)), "a")
    w = half.normal((4, 4), 1.0)
    assert w.dtype == np.float16
    np.testing.assert_array_equal(w, draw(0, "a").astype(np.float16))


def test_resnet_out_size_matches_a_forward_pass():
    ctx = ModelContext(Backend.HOST, np)
    for stem_kernel, stem_stride, pool, side in [
        (3, 2, False, 33),
        (7, 2, True, 40),
        (3, 1, False, 9),
    ]:
        net = blocks.ResNet(Init(ctx, "r"), 3, [4, 8, 8], 1, stem_kernel, stem_stride, pool)
        out = net(RNG.standard_normal((1, 3, side, side)).astype(np.float32))
        assert out.shape == (1, 8, net.out_size(side), net.out_size(side))


@pytest.mark.parametrize("seed", range(5))
def test_top_k_is_the_stable_argsort_prefix(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=(7, 40)).astype(np.float32)  # many ties
    x[0] = 1.0  # a row of equal scores
    for k in (1, 5, 40):
        want = np.argsort(-x, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(L.top_k(x, k), want)
    with pytest.raises(ValueError):
        L.top_k(x, 0)
    with pytest.raises(ValueError):
        L.top_k(x, 41)
