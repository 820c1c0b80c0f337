"""EyeNet: the small CNN baseline of the original fundus work, trained from scratch.

Three 3x3 convolutions of 32 filters (ReLU), a max-pool, then (in the head) Dense 128 and softmax,
on 256 px photographs. The original pooled 2x2, which leaves a 125x125x32 map and a 64-million-weight
dense layer (a 256 MB model that trains at a crawl on a CPU); we pool 8x8, which keeps the three-conv
design and the dense 128 at 3.9 million weights. It is a registry backbone like any other, so bundles,
evaluation, prediction and export treat it the same way.
"""

from __future__ import annotations

import torch
from torch import nn

EYENET_SIZE = 256
EYENET_POOL = 8


class EyeNet(nn.Module):
    """forward_features: (N, 3, 256, 256) -> (N, 32, 31, 31). Its "head" (Dense 128) is a registry head."""

    # What timm.data.resolve_data_config reads: inputs scaled to [-1, 1], the whole photo resized.
    pretrained_cfg = {"input_size": (3, EYENET_SIZE, EYENET_SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                      "interpolation": "bilinear", "crop_pct": 1.0, "classifier": "classifier"}

    def __init__(self, filters: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, filters, 3), nn.ReLU(inplace=True),
            nn.Conv2d(filters, filters, 3), nn.ReLU(inplace=True),
            nn.Conv2d(filters, filters, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(EYENET_POOL),
        )
        self.num_features = filters
        self.classifier = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def reset_classifier(self, num_classes: int = 0) -> None:
        self.classifier = nn.Identity()  # the head lives in the bundle, as for every backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
