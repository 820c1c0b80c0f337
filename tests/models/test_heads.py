"""Heads: output shapes, probabilities, the original conv head's size and its 1x1-conv equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from retinalens.errors import RetinaLensError
from retinalens.models.heads import ConvHead, HeadConfig, PooledHead, create_head, head_output_size, head_probabilities

SHAPES = [(1280, 7, 7), (2048, 8, 8), (1536, 5, 6)]  # (C, H, W): Lite0 at 224, InceptionV3 at 299, non-square


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("shape", SHAPES)
def test_conv_head_shapes(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    head = create_head(HeadConfig(kind="conv"), shape, 4)
    assert isinstance(head, ConvHead)
    out = head.eval()(torch.randn(3, h, w, c))
    assert out.shape == (3, 4)
    assert head_output_size(head) == 4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hidden", [0, 32])
def test_pooled_head_shapes(shape: tuple[int, int, int], hidden: int) -> None:
    head = create_head(HeadConfig(kind="linear", hidden=hidden), shape, 4)
    assert isinstance(head, PooledHead)
    assert head.eval()(torch.randn(5, shape[0])).shape == (5, 4)
    assert head_output_size(head) == 4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [4, 5])
def test_conv_head_parameter_count_matches_original_design(shape: tuple[int, int, int], k: int) -> None:
    c, h, w = shape
    head = create_head(HeadConfig(kind="conv", channels=64), shape, k)
    # 1x1 conv C->64 (no bias: BN follows) + BN (gamma, beta) + Dense(H*W*64 -> K) with bias
    assert n_params(head) == c * 64 + 2 * 64 + h * w * 64 * k + k
    bn = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bn) == 1 and bn[0].num_features == 64  # plus running mean/var buffers (not trained)


def test_pooled_head_parameter_counts() -> None:
    c = 1280
    assert n_params(create_head(HeadConfig(kind="linear"), (c, 7, 7), 4)) == c * 4 + 4
    assert n_params(create_head(HeadConfig(kind="linear", hidden=128), (c, 7, 7), 4)) == c * 128 + 128 + 128 * 4 + 4


def test_conv_head_linear_equals_1x1_convolution() -> None:
    """The channels-last Linear is the original 1x1 Conv2d on NCHW maps, position by position."""
    torch.manual_seed(0)
    head = create_head(HeadConfig(kind="conv", channels=8), (16, 3, 4), 4).eval()
    x = torch.randn(2, 3, 4, 16)  # (N, H, W, C)
    conv = nn.Conv2d(16, 8, 1, bias=False)
    conv.weight.data = head.conv.weight.data[:, :, None, None].clone()
    want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # back to (N, H, W, 8)
    torch.testing.assert_close(head.conv(x), want, atol=1e-5, rtol=1e-5)


def test_conv_head_uses_every_position() -> None:
    torch.manual_seed(0)
    head = create_head(HeadConfig(kind="conv", channels=8, dropout=0.0), (16, 3, 3), 4).eval()
    x = torch.randn(1, 3, 3, 16)
    base = head(x)
    for i, j in [(0, 0), (2, 2), (1, 2)]:
        y = x.clone()
        y[0, i, j] += 5
        assert not torch.allclose(head(y), base), (i, j)


def test_heads_accept_float16_features_via_probabilities() -> None:
    head = create_head(HeadConfig(kind="conv"), (1280, 7, 7), 4)
    x = np.random.default_rng(0).normal(size=(3, 7, 7, 1280)).astype(np.float16)  # what the cache stores
    probs = head_probabilities(head, x)
    assert probs.shape == (3, 4) and probs.dtype == np.float64


@pytest.mark.parametrize("kind, shape", [("conv", (1280, 7, 7)), ("linear", (2048, 8, 8))])
def test_head_probabilities_rows_sum_to_one(kind: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    head = create_head(HeadConfig(kind=kind), shape, 4)
    head.train()
    c, h, w = shape
    x = torch.randn(7, h, w, c) * 3 if kind == "conv" else torch.randn(7, c) * 3
    probs = head_probabilities(head, x, batch=3)  # several batches, the last one short
    assert probs.shape == (7, 4) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (probs >= 0).all() and (probs <= 1).all()
    assert not head.training  # put in eval mode: dropout off, BN running stats
    # batching does not change (or reorder) the rows, and eval mode makes it deterministic
    np.testing.assert_allclose(head_probabilities(head, x, batch=512), probs, atol=1e-6)
    np.testing.assert_allclose(head_probabilities(head, x.numpy()[::-1].copy(), batch=2), probs[::-1], atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.softmax(head(x), 1).double().numpy(), atol=1e-6)


def test_head_probabilities_on_empty_input() -> None:
    head = create_head(HeadConfig(kind="linear"), (64, 1, 1), 3)
    out = head_probabilities(head, np.zeros((0, 64), np.float32))
    assert out.shape == (0, 3)


@pytest.mark.parametrize("kind", ["mlp", "Conv", ""])
def test_unknown_head_kind(kind: str) -> None:
    with pytest.raises(RetinaLensError, match="unknown head"):
        create_head(HeadConfig(kind=kind), (1280, 7, 7), 4)


def test_head_config_round_trip_and_input_kind() -> None:
    cfg = HeadConfig(kind="linear", channels=32, hidden=16, dropout=0.2)
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    assert HeadConfig.from_dict({"kind": "conv", "unknown_key": 1}) == HeadConfig(kind="conv")
    assert HeadConfig(kind="conv").input_kind == "spatial"
    assert HeadConfig(kind="linear").input_kind == "pooled"
