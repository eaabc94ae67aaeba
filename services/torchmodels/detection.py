"""SSD post-processing as one batched computation of fixed shapes, so that it replays inside the
detector's CUDA graph with the backbone and head.

torchvision's `SSD.postprocess_detections` loops in Python over the images and over every
foreground class, filtering by score and running NMS on tensors whose sizes depend on the
values: a host synchronisation per class, tens of milliseconds per image on a GPU. Here every
step has a shape fixed by (batch, anchors, classes, C, K) and nothing is read on the host:

1. class probabilities by softmax, background (class 0) dropped; every anchor's box decoded
   with SSD's box coder and clipped to the work size;
2. the C best (anchor, class) pairs of each image by `topk` (sorted, best first);
3. class-aware Fast NMS among them (below);
4. the K best survivors by `topk`; a slot without one is zeros (box, score and label 0).

A pair scoring at or below the threshold, or suppressed, is masked rather than filtered out.

Fast NMS (Bolya et al., "YOLACT: Real-time Instance Segmentation", ICCV 2019, section 3.4)
decides every suppression at once from the candidates' IoU matrix: a candidate goes if a
higher-scored candidate of its class overlaps it by more than the threshold, whether or not that
one was suppressed itself. Greedy NMS lets only kept boxes suppress, so Fast NMS removes a little
more: of a chain a > b > c where only neighbours overlap, greedy keeps a and c, Fast NMS keeps a.
Where no suppressed candidate overlaps a lower one of its class beyond the threshold, the two
keep the same boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.torchmodels.core import require_torch


class FastPostprocess:
    """`(regression [n, A, 4], logits [n, A, classes]) -> (boxes [n, K, 4] float32 in work-size
    pixels, x1 y1 x2 y2; scores [n, K] float32; labels [n, K] int64)` for fixed anchors
    `[A, 4]` (x1 y1 x2 y2); see the module docstring. Graph-safe: no host reads, no shapes that
    depend on values, the same code on CPU and CUDA."""

    def __init__(
        self,
        anchors: Any,
        work_size: tuple[int, int],
        box_weights: Sequence[float],
        xform_clip: float,
        score_thresh: float,
        nms_thresh: float,
        candidates: int,
        k: int,
    ) -> None:
        torch = self.torch = require_torch()
        anchors = anchors.float()
        device = anchors.device
        self.anchors = int(anchors.shape[0])
        # the box coder's anchor terms, made once (torchvision's decode_single, per anchor)
        self.size = anchors[:, 2:] - anchors[:, :2]
        self.centre = anchors[:, :2] + 0.5 * self.size
        self.weights = tuple(float(w) for w in box_weights)
        self.xform_clip = float(xform_clip)
        h, w = work_size
        self.limit = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.candidates = candidates
        self.k = k
        # pair (i, j) with i ranked above j: who may suppress whom, once the ranks are sorted
        self.above = torch.ones((candidates, candidates), dtype=torch.bool, device=device).triu(1)

    def __call__(self, regression: Any, logits: Any) -> tuple[Any, Any, Any]:
        torch = self.torch
        scores = torch.softmax(logits.float(), dim=-1)[..., 1:]
        classes = int(scores.shape[-1])
        boxes = self.decode(regression.float())
        c = min(self.candidates, self.anchors * classes)
        top, pair = scores.flatten(1).topk(c, dim=1)
        anchor = torch.div(pair, classes, rounding_mode="floor")
        labels = pair - anchor * classes + 1
        boxes = boxes.gather(1, anchor[..., None].expand(-1, -1, 4))
        live = top > self.score_thresh
        alive = live & self.survivors(boxes, labels, live)
        # dead pairs rank below every live one (scores are probabilities, never negative)
        best, pick = torch.where(alive, top, -1.0).topk(min(self.k, c), dim=1)
        found = best >= 0
        boxes = torch.where(found[..., None], boxes.gather(1, pick[..., None].expand(-1, -1, 4)), 0)
        scores = torch.where(found, best, 0)
        labels = torch.where(found, labels.gather(1, pick), 0)
        short = self.k - int(best.shape[1])  # fewer pairs than K: the rest is padding
        if short > 0:
            pad = torch.nn.functional.pad
            boxes, scores, labels = (
                pad(boxes, (0, 0, 0, short)),
                pad(scores, (0, short)),
                pad(labels, (0, short)),
            )
        return boxes, scores, labels

    def decode(self, codes: Any) -> Any:
        """Boxes [n, A, 4] from the head's codes [n, A, 4], clipped to the work size."""
        torch = self.torch
        wx, wy, ww, wh = self.weights
        dx = codes[..., 0] / wx
        dy = codes[..., 1] / wy
        dw = torch.clamp(codes[..., 2] / ww, max=self.xform_clip)
        dh = torch.clamp(codes[..., 3] / wh, max=self.xform_clip)
        cx = dx * self.size[:, 0] + self.centre[:, 0]
        cy = dy * self.size[:, 1] + self.centre[:, 1]
        half_w = 0.5 * (torch.exp(dw) * self.size[:, 0])
        half_h = 0.5 * (torch.exp(dh) * self.size[:, 1])
        boxes = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
        return torch.minimum(boxes.clamp(min=0), self.limit)

    def survivors(self, boxes: Any, labels: Any, live: Any) -> Any:
        """[n, C] whether each candidate (ranked best first) escapes Fast NMS: no live,
        higher-ranked candidate of its class overlaps it by more than the threshold."""
        torch = self.torch
        c = int(boxes.shape[1])
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        corner_lo = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
        corner_hi = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
        side = (corner_hi - corner_lo).clamp(min=0)
        inter = side[..., 0] * side[..., 1]
        union = area[:, :, None] + area[:, None, :] - inter
        iou = torch.where(union > 0, inter / union, 0)
        rivals = (labels[:, :, None] == labels[:, None, :]) & live[:, :, None] & self.above[:c, :c]
        worst = torch.where(rivals, iou, 0).amax(dim=1)
        return worst <= self.nms_thresh


def from_ssd(net: Any, anchors: Any, work_size: int, candidates: int, k: int) -> FastPostprocess:
    """The post-processing of torchvision SSD `net` (its box coder, score and NMS thresholds)
    for `anchors` at a square work size."""
    return FastPostprocess(
        anchors,
        (work_size, work_size),
        net.box_coder.weights,
        net.box_coder.bbox_xform_clip,
        net.score_thresh,
        net.nms_thresh,
        candidates,
        k,
    )
