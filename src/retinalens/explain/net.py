"""The bundle as one differentiable fp32 eager network, and the layer Grad-CAM looks at.

Prediction runs a traced, frozen, often bf16 graph that has no gradients. Grad-CAM needs the
eager modules, so the bundle's backbone and head are copied (the copies are what hooks are put
on: a shared Model serving predictions in other threads never sees them) and chained:

    pixels -> Preprocessing.normalize -> backbone forward_features -> NHWC maps or pooled -> head -> logits
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..models.heads import ConvHead


class ExplainNet(nn.Module):
    """float pixels (N, 3, S, S) in 0-255 -> logits (N, K), fp32, eager, differentiable.

    Channels-first input because that is where pytorch-grad-cam reads the map's output size.
    """

    def __init__(self, features: nn.Module, head: nn.Module, preprocessing: Preprocessing, input_kind: str) -> None:
        super().__init__()
        self.features, self.head, self.pp, self.input_kind = features, head, preprocessing, input_kind

    @classmethod
    def from_bundle(cls, bundle) -> ExplainNet:
        # Copies: the bundle's own modules stay untouched (no hooks, no grads, no mode changes).
        features = copy.deepcopy(bundle.backbone.model).float().eval().requires_grad_(False)
        head = copy.deepcopy(bundle.head).float().eval().requires_grad_(False)
        return cls(features, head, bundle.preprocessing, bundle.head_config.input_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features.forward_features(self.pp.normalize(x.permute(0, 2, 3, 1)))  # (N, C, H, W)
        if self.input_kind == "spatial":
            return self.head(maps.permute(0, 2, 3, 1))  # heads read channels-last maps, as cached
        return self.head(maps.mean(dim=(2, 3)))


def nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    """The conv head's 1x1 conv is a Linear over channels-last maps; Grad-CAM wants (N, C, H, W)."""
    return t.permute(0, 3, 1, 2)


def target_layer(net: ExplainNet) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(layer, reshape_transform) for Grad-CAM: the conv head's 1x1 conv, as in the original work,
    else the last module of forward_features whose output is a 4-D map (found on a dry run, so it
    works for any timm or registry backbone without a per-architecture table)."""
    if isinstance(net.head, ConvHead):
        return net.head.conv, nhwc_to_nchw
    return last_map_module(net.features, net.pp.size), None


def last_map_module(model: nn.Module, size: int) -> nn.Module:
    finished: list[nn.Module] = []

    def record(module: nn.Module, _args: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            finished.append(module)

    handles = [m.register_forward_hook(record) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model.forward_features(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise ValueError(f"{type(model).__name__}.forward_features has no module with a 4-D output")
    return finished[-1]  # hooks fire when a module returns: the last one holds the final map


def enable_grad_on_output(layer: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the layer's output a leaf that requires grad. The backbone is frozen, so without this no
    gradient reaches the activations; it also stops backward from going below the layer (cheaper).
    Prepended, so pytorch-grad-cam's own hooks (registered later) see the leaf."""

    def hook(_module: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_(True)

    return layer.register_forward_hook(hook, prepend=True)
