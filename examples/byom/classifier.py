"""An image classifier of your own, served by Camelot as a stage (docs/MODELS.md).

A factory is any function returning a `torch.nn.Module`; the pipeline YAML names it as
`examples.byom.classifier:build` and passes `kwargs` to it. `forward` takes one batch tensor per
declared input, in order, and returns the outputs (here a dict keyed by the declared names).
Rows must not interact: Camelot batches queries and pads batches.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """Three strided convolutions, global average pooling, a linear head."""

    def __init__(self, classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, classes)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        # image: uint8 [n, 3, H, W] as the JPEG decoder gives it; normalise here
        x = image.to(self.head.weight.dtype) / 255.0 - 0.5
        probs = self.head(self.features(x)).float().softmax(dim=1)
        return {"top": probs.topk(3, dim=1).indices.to(torch.int32), "probs": probs}


def build(classes: int = 10, width: int = 16) -> nn.Module:
    return SmallNet(classes, width)
