"""The one network of a bundle: uint8 pixels -> (logits, pooled backbone features).

    pixels (N, S, S, 3) uint8 -> Preprocessing.normalize -> backbone forward_features -> maps (N, C, H, W)
        -> pooled = mean over H, W;  head(channels-last maps or pooled, as the head config says) -> logits

Training on images trains this module, explanation puts Grad-CAM hooks on a copy of it, export traces
it, and prediction runs its two halves (the backbone through its traced, frozen graph, then `head_logits`).
There is no other definition of this forward pass.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..models.heads import HeadConfig

if TYPE_CHECKING:
    from .store import Bundle


def head_input(config: HeadConfig, spatial: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """What the head eats: channels-last maps (N, H, W, C) for spatial heads, pooled (N, C) otherwise.
    Heads read channels-last maps because that is how the feature cache stores them."""
    return spatial if config.input_kind == "spatial" else pooled


class Network(nn.Module):
    """Backbone + head: uint8 (or float 0-255) pixels (N, S, S, 3) -> (logits (N, K), pooled (N, C))."""

    def __init__(self, features: nn.Module, head: nn.Module, preprocessing: Preprocessing,
                 head_config: HeadConfig) -> None:
        super().__init__()
        self.features, self.head = features, head
        self.preprocessing, self.head_config = preprocessing, head_config

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, private: bool = False) -> Network:
        """The bundle's network. private=True: fp32 copies, so hooks, gradients and mode changes never
        reach the bundle's own modules (which may be serving predictions in other threads)."""
        features, head = bundle.backbone.model, bundle.head
        if private:
            features = copy.deepcopy(features).float().eval().requires_grad_(False)
            head = copy.deepcopy(head).float().eval().requires_grad_(False)
        return cls(features, head, bundle.preprocessing, bundle.head_config)

    def head_logits(self, spatial: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(head_input(self.head_config, spatial, pooled))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocessing.normalize(pixels).contiguous(memory_format=torch.channels_last)
        maps = self.features.forward_features(x)  # (N, C, H, W)
        pooled = maps.mean(dim=(2, 3))
        return self.head_logits(maps.permute(0, 2, 3, 1), pooled), pooled
