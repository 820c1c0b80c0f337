"""The layer Grad-CAM looks at, on the bundle's one network (`bundle.network.Network`).

Prediction runs a traced, frozen, often bf16 graph that has no gradients. Grad-CAM needs the eager
modules, so it runs on a private fp32 copy of the bundle's network (the copy is what hooks are put
on: a shared Model serving predictions in other threads never sees them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..bundle.network import Network
from ..models.heads import ConvHead


class ExplainNet(nn.Module):
    """float pixels (N, 3, S, S) in 0-255 -> logits (N, K): the bundle's Network, channels-first in,
    because that is where pytorch-grad-cam reads the map's output size."""

    def __init__(self, net: Network) -> None:
        super().__init__()
        # The explainer hands each network only its view's columns of the input (a view of the two-view
        # input; all of it otherwise), because pytorch-grad-cam sizes its map to the tensor it is given;
        # so this (private) network reads the whole of what it gets.
        self.columns = net.preprocessing.columns
        net = Network(net.features, net.head, replace(net.preprocessing, view="whole"), net.head_config)
        self.net = net
        self.features, self.head, self.pp = net.features, net.head, net.preprocessing

    @classmethod
    def members(cls, bundle) -> list[ExplainNet]:
        """One per network of the bundle (an ensemble's maps are averaged over its members)."""
        return [cls(Network.from_member(m, private=True)) for m in bundle.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 2, 3, 1))[0]


def nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    """The conv head's 1x1 conv is a Linear over channels-last maps; Grad-CAM wants (N, C, H, W)."""
    return t.permute(0, 3, 1, 2)


def target_layer(net: ExplainNet) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(layer, reshape_transform) for Grad-CAM: the conv head's 1x1 conv, as in the original work,
    else the last module of forward_features whose output is a 4-D map (found on a dry run, so it
    works for any timm or registry backbone without a per-architecture table)."""
    if isinstance(net.head, ConvHead):
        return net.head.conv, nhwc_to_nchw
    return last_map_module(net.features, net.pp.view_shape), None


def last_map_module(model: nn.Module, shape: tuple[int, int]) -> nn.Module:
    finished: list[nn.Module] = []

    def record(module: nn.Module, _args: object, out: object) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            finished.append(module)

    handles = [m.register_forward_hook(record) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model.forward_features(torch.zeros(1, 3, *shape))
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
