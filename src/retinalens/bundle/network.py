"""The one network of a bundle: uint8 pixels -> (logits, pooled backbone features).

    pixels (N, S, S, 3) uint8 -> Preprocessing.normalize -> backbone forward_features -> maps (N, C, H, W)
        -> pooled = mean over H, W;  head(channels-last maps or pooled, as the head config says) -> logits

Training on images trains this module, explanation puts Grad-CAM hooks on a copy of it, export traces
it, and prediction runs its two halves (the backbone through its traced, frozen graph, then `head_logits`).
There is no other definition of this forward pass.

An ensemble bundle is the same network several times over (`Ensemble`): each member sees each
test-time view (`tta_view`) of the pixels, its probabilities are softened by its own temperature,
and all are averaged in probability space, then the bundle's own temperature applies to the average:

    probabilities = calibrated(mean over views v, members m of softmax(logits_m(v(pixels)) / T_m), T)

The quality gate reads the first member's pooled features of the identity view: those are what it
was fitted on (the training features of that backbone), and they cost nothing extra.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..models.heads import HeadConfig

if TYPE_CHECKING:
    from .members import BundleMember
    from .store import Bundle

VIEWS = ("identity", "flip", "crop")
CROP_KEEP = 0.875  # the crop view keeps the central 87.5% of each side (timm's default crop_pct), resized back
_TINY = 1e-30  # log(0) guard in float32, as trust/calibration.py's in float64


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
        """The bundle's (first member's) network; see `from_member`."""
        return cls.from_member(bundle.members[0], private=private)

    @classmethod
    def from_member(cls, member: BundleMember, *, private: bool = False) -> Network:
        """A member's network. private=True: fp32 copies, so hooks, gradients and mode changes never
        reach the bundle's own modules (which may be serving predictions in other threads)."""
        features, head = member.backbone.model, member.head
        if private:
            features = copy.deepcopy(features).float().eval().requires_grad_(False)
            head = copy.deepcopy(head).float().eval().requires_grad_(False)
        return cls(features, head, member.preprocessing, member.head_config)

    def head_logits(self, spatial: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(head_input(self.head_config, spatial, pooled))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocessing.normalize(pixels).contiguous(memory_format=torch.channels_last)
        maps = self.features.forward_features(x)  # (N, C, H, W)
        pooled = maps.mean(dim=(2, 3))
        return self.head_logits(maps.permute(0, 2, 3, 1), pooled), pooled


def tta_view(view: str, pixels: torch.Tensor) -> torch.Tensor:
    """One test-time view of uint8 pixels (N, S, S, 3), still uint8 (N, S, S, 3): `identity`, `flip`
    (left-right: a left eye's scan as a right eye's) or `crop` (the central CROP_KEEP of each side,
    resized back to S bilinearly and rounded, so every path feeds the backbone whole grey levels)."""
    if view == "identity":
        return pixels
    if pixels.shape[1] != pixels.shape[2]:  # the two-view input: a flip or crop would mix its views
        raise ValueError(f"test-time view {view!r} takes a square input, got {tuple(pixels.shape)}")
    if view == "flip":
        return pixels.flip(2)
    if view == "crop":
        s = pixels.shape[1]
        m = int(round(s * (1 - CROP_KEEP) / 2))
        x = pixels[:, m:s - m, m:s - m].permute(0, 3, 1, 2).float()
        x = nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    raise ValueError(f"unknown test-time view {view!r}: use one of {', '.join(VIEWS)}")


class Ensemble(nn.Module):
    """Members x views -> (calibrated probabilities (N, K), the first member's pooled identity features
    (N, C)). One member and one view is exactly a single network: softmax(logits / T)."""

    def __init__(self, members: list[Network], temperatures: list[float], views: tuple[str, ...],
                 temperature: float = 1.0) -> None:
        super().__init__()
        if views[0] != "identity" or len(members) != len(temperatures):
            raise ValueError("an ensemble needs one temperature per member and the identity view first")
        self.members = nn.ModuleList(members)
        self.temperatures, self.views, self.temperature = list(temperatures), tuple(views), float(temperature)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, private: bool = False, temperature: float = 1.0) -> Ensemble:
        """The bundle's networks with their temperatures and views; `temperature`: the bundle's own."""
        members = bundle.members
        return cls([Network.from_member(m, private=private) for m in members],
                   [m.temperature or 1.0 for m in members], bundle.views, temperature)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.members) == 1 and len(self.views) == 1:  # the single network's graph, unchanged
            logits, pooled = self.members[0](pixels)
            return torch.softmax(logits.float() / (self.temperatures[0] * self.temperature), dim=1), pooled.float()
        probs, first = [], None
        for view in self.views:
            x = tta_view(view, pixels)
            for net, t in zip(self.members, self.temperatures):
                logits, pooled = net(x)
                first = pooled if first is None else first
                probs.append(torch.softmax(logits.float() / t, dim=1))
        mean = torch.stack(probs).mean(dim=0)
        if self.temperature != 1.0:
            mean = torch.softmax(torch.log(mean.clamp_min(_TINY)) / self.temperature, dim=1)
        return mean, first.float()
