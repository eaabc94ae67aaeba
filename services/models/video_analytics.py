"""video-analytics: detector -> crop/resize of its boxes from the original frame -> classifier.

frame uint8 (H, W, 3) -> detector (resizes to its work size) -> boxes int32 (K, 4)
                         [x0, y0, x1, y1) in FULL-frame pixels, scores (K,)
(frame, boxes) -> crop -> crops (K, 3, S, S)          <- a DAG: crop reads the query input
crops -> classifier -> classes int32 (K,), scores float32 (K,)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import InvalidArgument
from services.models import layers as L
from services.models.base import ReferenceModel, positive, spec
from services.models.base import channels as channel_list
from services.models.blocks import Conv, Dense, ImageStats, Norm, ResNet, image_to_float
from services.models.layers import Array
from services.stage.plugin import ModelContext


def _size(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise InvalidArgument(f"option {name}={value!r} must be [height, width]")
    return positive(name, value[0]), positive(name, value[1])


class Detector(ReferenceModel):
    """Backbone feature map -> objectness per cell -> top-K cells -> one box regressed per cell.

    The backbone runs on the frame resized (bilinear) to `work_size`; cell centres and box sizes
    are in full-frame pixels, so crop can cut the boxes out of the original frame. Graph-safe:
    the top-K is ranked on the device (`layers.top_k`), not sorted through Thrust."""

    graph_safe = True

    def __init__(
        self,
        ctx: ModelContext,
        frame_size: tuple[int, int],
        work_size: tuple[int, int],
        widths: list[int],
        blocks: int,
        stem_kernel: int,
        stem_stride: int,
        stem_pool: bool,
        proposals: int,
        min_box: int,
        max_box: int,
    ) -> None:
        super().__init__(ctx, "video-analytics/detector")
        self.stats = ImageStats(self.init)
        self.net = ResNet(self.init, 3, widths, blocks, stem_kernel, stem_stride, stem_pool)
        self.score = Conv(self.init, self.net.out_channels, 1, 1, gain=1.0)
        self.regress = Conv(self.init, self.net.out_channels, 4, 1, gain=1.0)
        self.h, self.w = frame_size
        self.work = work_size
        self.fh, self.fw = self.net.out_size(work_size[0]), self.net.out_size(work_size[1])
        if proposals > self.fh * self.fw:
            raise InvalidArgument(
                f"option proposals={proposals} exceeds the {self.fh}×{self.fw} feature cells"
            )
        self.k, self.min_box, self.max_box = proposals, float(min_box), float(max_box)
        self.inputs = [spec("frame", np.uint8, (self.h, self.w, 3))]
        self.outputs = [
            spec("boxes", np.int32, (proposals, 4)),
            spec("scores", np.float32, (proposals,)),
        ]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        xp = self.xp
        fmap = self.net(self._prepare(batch["frame"]))
        n = fmap.shape[0]
        logits = self.score(fmap).reshape(n, -1).astype(np.float32)
        order = L.top_k(logits, self.k)  # best first; ties: lower cell first
        top = xp.take_along_axis(logits, order, axis=1)
        reg = self.regress(fmap).reshape(n, 4, -1).astype(np.float32)
        reg = xp.take_along_axis(reg, order[:, None, :], axis=2)  # (n, 4, K)
        stride_y, stride_x = self.h / self.fh, self.w / self.fw
        cy = ((order // self.fw).astype(np.float32) + 0.5) * np.float32(stride_y)
        cx = ((order % self.fw).astype(np.float32) + 0.5) * np.float32(stride_x)
        cx = cx + xp.tanh(reg[:, 0]) * np.float32(stride_x / 2)
        cy = cy + xp.tanh(reg[:, 1]) * np.float32(stride_y / 2)
        span = np.float32(self.max_box - self.min_box)
        bw = np.float32(self.min_box) + _sigmoid(xp, reg[:, 2]) * span
        bh = np.float32(self.min_box) + _sigmoid(xp, reg[:, 3]) * span
        x0 = xp.clip(xp.floor(cx - bw / 2), 0, self.w - 1)
        y0 = xp.clip(xp.floor(cy - bh / 2), 0, self.h - 1)
        x1 = xp.minimum(xp.maximum(xp.ceil(cx + bw / 2), x0 + 1), self.w)
        y1 = xp.minimum(xp.maximum(xp.ceil(cy + bh / 2), y0 + 1), self.h)
        boxes = xp.stack([x0, y0, x1, y1], axis=-1).astype(np.int32)
        return {"boxes": boxes, "scores": _sigmoid(xp, top)}

    def _prepare(self, frames: Array) -> Array:
        """uint8 (n, H, W, 3) -> normalised (n, 3, work_h, work_w) in the compute dtype."""
        if self.work == (self.h, self.w):
            return image_to_float(frames, self.dtype, self.stats)
        small = L.resize_bilinear(frames.transpose(0, 3, 1, 2), *self.work, dtype=np.float32)
        return self.stats.normalise(small, self.dtype)


def _sigmoid(xp: Any, x: Array) -> Array:
    return np.float32(1) / (np.float32(1) + xp.exp(-x))


def crop_resize(frames: Array, boxes: Array, size: int) -> Array:
    """Bilinear crop-resize: frames (n, H, W, C) any dtype, boxes int (n, K, 4) as [x0, y0, x1, y1)
    -> (n, K, C, size, size) fp32, sampling each box at half-pixel centres, edges clamped."""
    xp = L.namespace(frames)
    n, h, w, _ = frames.shape
    b = boxes.astype(np.float32)
    steps = (xp.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size)
    ys = b[:, :, 1:2] + steps * (b[:, :, 3:4] - b[:, :, 1:2]) - np.float32(0.5)  # (n, K, size)
    xs = b[:, :, 0:1] + steps * (b[:, :, 2:3] - b[:, :, 0:1]) - np.float32(0.5)
    ys, xs = xp.clip(ys, 0, h - 1), xp.clip(xs, 0, w - 1)
    y0, x0 = xp.floor(ys).astype(np.int64), xp.floor(xs).astype(np.int64)
    y1, x1 = xp.minimum(y0 + 1, h - 1), xp.minimum(x0 + 1, w - 1)
    fy = (ys - y0)[:, :, :, None, None]
    fx = (xs - x0)[:, :, None, :, None]
    idx = xp.arange(n)[:, None, None, None]

    def at(yi: Array, xi: Array) -> Array:  # (n, K, size, size, C)
        return frames[idx, yi[:, :, :, None], xi[:, :, None, :]].astype(np.float32)

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return (top * (1 - fy) + bottom * fy).transpose(0, 1, 4, 2, 3)


class Crop(ReferenceModel):
    """The ORIGINAL frame's pixels inside each box, resized to crop_size², normalised.
    Graph-safe: the boxes are read on the device (a gather), never on the host."""

    graph_safe = True

    def __init__(
        self, ctx: ModelContext, frame_size: tuple[int, int], proposals: int, crop_size: int
    ) -> None:
        super().__init__(ctx, "video-analytics/crop")
        self.stats = ImageStats(self.init)
        self.size = crop_size
        self.inputs = [
            spec("frame", np.uint8, (*frame_size, 3)),
            spec("boxes", np.int32, (proposals, 4)),
        ]
        self.outputs = [spec("crops", self.dtype, (proposals, 3, crop_size, crop_size))]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        crops = crop_resize(batch["frame"], batch["boxes"], self.size)  # (n, K, 3, s, s) 0..255
        return {"crops": self.stats.normalise(crops, self.dtype)}


class Classifier(ReferenceModel):
    """Small ResNet over every crop -> global average pool -> class logits -> argmax, max prob."""

    graph_safe = True

    def __init__(
        self,
        ctx: ModelContext,
        proposals: int,
        crop_size: int,
        widths: list[int],
        blocks: int,
        stem_stride: int,
        classes: int,
    ) -> None:
        super().__init__(ctx, "video-analytics/classifier")
        self.net = ResNet(self.init, 3, widths, blocks, stem_kernel=3, stem_stride=stem_stride)
        # the norm removes the common mode random ReLU features share, so classes vary by crop
        self.norm = Norm(self.init, self.net.out_channels)
        self.head = Dense(self.init, self.net.out_channels, classes)
        self.k, self.s = proposals, crop_size
        self.inputs = [spec("crops", self.dtype, (proposals, 3, crop_size, crop_size))]
        self.outputs = [
            spec("classes", np.int32, (proposals,)),
            spec("scores", np.float32, (proposals,)),
        ]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        xp = self.xp
        crops = batch["crops"]
        n = crops.shape[0]
        x = self.net(crops.reshape(n * self.k, 3, self.s, self.s))
        pooled = L.global_avg_pool(x).astype(np.float32).reshape(n, self.k, -1)
        # centred over the frame's K crops: random ReLU features share a common mode that would
        # otherwise pick the same class for every crop
        pooled = (pooled - pooled.mean(axis=1, keepdims=True)).reshape(n * self.k, -1)
        probs = L.softmax(self.head(self.norm(pooled.astype(self.dtype))).astype(np.float32))
        classes = xp.argmax(probs, axis=-1).astype(np.int32).reshape(n, self.k)
        return {"classes": classes, "scores": probs.max(axis=-1).reshape(n, self.k)}


def detector(
    ctx: ModelContext,
    frame_size: Sequence[int] = (64, 64),
    work_size: Sequence[int] | None = None,
    channels: Sequence[int] = (8, 16),
    blocks: int = 1,
    stem_kernel: int = 3,
    stem_stride: int = 2,
    stem_pool: bool = False,
    proposals: int = 4,
    min_box: int = 8,
    max_box: int = 32,
) -> Detector:
    """`work_size` [height, width]: the backbone's input (default: the frame size, no resize)."""
    frame = _size("frame_size", frame_size)
    work = frame if work_size is None else _size("work_size", work_size)
    return Detector(
        ctx, frame, work, channel_list("channels", channels),
        positive("blocks", blocks), positive("stem_kernel", stem_kernel),
        positive("stem_stride", stem_stride), bool(stem_pool), positive("proposals", proposals),
        positive("min_box", min_box), positive("max_box", max_box),
    )  # fmt: skip


def crop(
    ctx: ModelContext, frame_size: Sequence[int] = (64, 64), proposals: int = 4, crop_size: int = 16
) -> Crop:
    return Crop(
        ctx, _size("frame_size", frame_size), positive("proposals", proposals),
        positive("crop_size", crop_size),
    )  # fmt: skip


def classifier(
    ctx: ModelContext,
    proposals: int = 4,
    crop_size: int = 16,
    channels: Sequence[int] = (8, 16),
    blocks: int = 1,
    stem_stride: int = 1,
    classes: int = 10,
) -> Classifier:
    return Classifier(
        ctx, positive("proposals", proposals), positive("crop_size", crop_size),
        channel_list("channels", channels), positive("blocks", blocks),
        positive("stem_stride", stem_stride), positive("classes", classes),
    )  # fmt: skip
