"""Shallow heads trained on cached backbone features.

Spatial features are stored channels-last (N, H, W, C), so the original 1x1 convolution is a
Linear over the last axis: no layout shuffles in the hot loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RetinaLensError


@dataclass(frozen=True)
class HeadConfig:
    # "conv": the original 1x1 conv head on spatial maps; "linear": linear/MLP on pooled vectors,
    # trained by SGD; "logreg": logistic regression on pooled vectors, fitted by scikit-learn;
    # "dense": the flattened spatial map into a hidden layer (EyeNet's Dense 128).
    # (`train` also takes "auto": conv and logreg both, the better on validation kept.)
    kind: str = "conv"
    channels: int = 64  # conv head: 1x1 conv width
    hidden: int = 0  # linear / dense head: 0 = no hidden layer, > 0 = one hidden ReLU layer (MLP)
    dropout: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadConfig":
        return cls(**{k: d[k] for k in ("kind", "channels", "hidden", "dropout") if k in d})

    @property
    def input_kind(self) -> str:
        return "spatial" if self.kind in ("conv", "dense") else "pooled"


class Dropout(nn.Module):
    """nn.Dropout's distribution, with the mask drawn by rand_like: on CPU, bernoulli_ cost a
    quarter of the conv head's training step (measured), rand_like is 2.6x cheaper."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))


class ConvHead(nn.Module):
    """1x1 conv (C -> 64) + BN + ReLU, Dropout, Flatten, Dense: the original bottleneck head."""

    def __init__(self, feature_shape: tuple[int, int, int], num_classes: int, cfg: HeadConfig) -> None:
        super().__init__()
        c, h, w = feature_shape
        self.conv = nn.Linear(c, cfg.channels, bias=False)  # BN follows, so no bias
        self.bn = nn.BatchNorm1d(cfg.channels)
        self.dropout = Dropout(cfg.dropout)
        self.fc = nn.Linear(h * w * cfg.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, H, W, C)
        n, h, w, _ = x.shape
        z = self.conv(x).reshape(n * h * w, -1)
        z = torch.relu(self.bn(z)).reshape(n, -1)
        return self.fc(self.dropout(z))


class PooledHead(nn.Module):
    """Linear (logistic regression) or one-hidden-layer MLP on globally pooled features."""

    def __init__(self, feature_shape: tuple[int, int, int], num_classes: int, cfg: HeadConfig) -> None:
        super().__init__()
        c = feature_shape[0]
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout)]
        if cfg.hidden > 0:
            layers += [nn.Linear(c, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
        layers.append(nn.Linear(cfg.hidden or c, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C)
        return self.net(x)


class DenseHead(nn.Module):
    """Flatten the (N, H, W, C) map, one hidden ReLU layer, Dropout, Dense: EyeNet's classifier."""

    def __init__(self, feature_shape: tuple[int, int, int], num_classes: int, cfg: HeadConfig) -> None:
        super().__init__()
        c, h, w = feature_shape
        hidden = cfg.hidden or 128
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(h * w * c, hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, H, W, C)
        return self.net(x)


HEADS: dict[str, type[nn.Module]] = {"conv": ConvHead, "linear": PooledHead, "logreg": PooledHead, "dense": DenseHead}


def create_head(cfg: HeadConfig, feature_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    check_head_config(cfg)
    return HEADS[cfg.kind](tuple(feature_shape), num_classes, cfg)


def check_head_config(cfg: HeadConfig, allowed: tuple[str, ...] = tuple(HEADS)) -> None:
    if cfg.kind not in allowed:
        raise RetinaLensError(f"unknown head '{cfg.kind}': use one of {', '.join(allowed)}")
    if cfg.channels < 1 or cfg.hidden < 0 or not 0 <= cfg.dropout < 1:
        raise RetinaLensError(f"head sizes must be positive and dropout in [0, 1) (got {cfg})")


@torch.no_grad()
def head_probabilities(head: nn.Module, x: np.ndarray | torch.Tensor, batch: int = 512) -> np.ndarray:
    """Softmax probabilities (float64) of a head on features, in batches; the head is put in eval mode."""

    head.eval()
    t = torch.as_tensor(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    out = [torch.softmax(head(t[i:i + batch].float()), dim=1) for i in range(0, len(t), batch)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, head_output_size(head)))


def head_output_size(head: nn.Module) -> int:
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features
