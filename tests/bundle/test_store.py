"""Model bundles: save/load round trip, manifest contents, integrity checks, atomic replacement."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from retinalens.errors import RetinaLensError
from retinalens.bundle.store import MANIFEST, load_bundle, save_bundle
from retinalens.models.heads import HeadConfig, create_head
from retinalens.models.registry import Backbone

OCT = ["CNV", "DME", "DRUSEN", "NORMAL"]
FEATURE_SHAPE = (1280, 7, 7)


def _head(cfg: HeadConfig, k: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    head = create_head(cfg, FEATURE_SHAPE, k)
    with torch.no_grad():  # non-default BN statistics, so that buffers are checked too
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return head.eval()


def _save(out: Path, backbone: Backbone, *, cfg: HeadConfig = HeadConfig(kind="conv", channels=8),
          classes: list[str] = OCT, seed: int = 0, files: dict[str, bytes] | None = None,
          **kw) -> tuple[Path, torch.nn.Module]:
    head = _head(cfg, len(classes), seed)
    path = save_bundle(out, backbone=backbone, head=head, head_config=cfg, classes=classes, precision="fp32",
                       feature_shape=FEATURE_SHAPE, sections={"training": {"epochs": 3}, "validation": {"auc": 0.9}},
                       files=files if files is not None else {"config.json": b'{"seed": 0}\n'}, **kw)
    return path, head


@pytest.fixture(scope="module")
def saved(backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return _save(tmp_path_factory.mktemp("bundles") / "oct-model", backbone)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_head_weights_identical(saved) -> None:
    path, head = saved
    bundle = load_bundle(path)
    assert bundle.classes == OCT
    assert bundle.head_config == HeadConfig(kind="conv", channels=8)
    assert bundle.precision == "fp32"
    assert not bundle.head.training
    want, got = head.state_dict(), bundle.head.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    x = torch.randn(2, 7, 7, 1280)
    with torch.no_grad():
        assert torch.equal(bundle.head(x), head(x))


def test_manifest_contents(saved, backbone: Backbone) -> None:
    path, _ = saved
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["classes"] == OCT
    assert manifest["referral"] == {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}
    assert manifest["backbone"]["weights_sha256"] == backbone.weights_sha256
    assert manifest["backbone"]["name"] == backbone.name
    assert manifest["backbone"]["preprocessing"] == backbone.preprocessing.to_dict()
    assert manifest["features"]["feature_shape"] == list(FEATURE_SHAPE)
    assert manifest["head"] == HeadConfig(kind="conv", channels=8).to_dict()
    assert manifest["training"] == {"epochs": 3} and manifest["validation"] == {"auc": 0.9}
    versions = manifest["library_versions"]
    assert torch.__version__.startswith(versions["torch"])
    assert {"python", "timm", "numpy", "safetensors"} <= set(versions)
    # every weights file is hashed, and the hashes are right
    assert {"head.safetensors", "backbone.safetensors"} <= set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert _sha(path / name) == digest, name
    assert (path / "config.json").read_bytes() == b'{"seed": 0}\n'
    bundle = load_bundle(path)
    assert bundle.referral == manifest["referral"]
    assert bundle.preprocessing == backbone.preprocessing


def test_referral_for_lowercase_and_other_classes(tmp_path: Path, backbone: Backbone) -> None:
    path, _ = _save(tmp_path / "m", backbone, cfg=HeadConfig(kind="linear"), classes=["cnv", "normal", "other"])
    assert load_bundle(path).referral == {"cnv": "urgent", "normal": "observation", "other": None}


def test_no_pickle_files_in_bundle(saved) -> None:
    path, _ = saved
    files = [p for p in path.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if p.suffix in {".pkl", ".pt", ".pth", ".pickle", ".ckpt", ".bin"}]
    for p in files:
        if p.suffix == ".safetensors":  # a safetensors file starts with its header length + JSON header
            head = p.read_bytes()[:9]
            assert head[8:9] == b"{", p.name


def test_loaded_backbone_encodes_identically(saved, backbone: Backbone, oct_images: list[Path]) -> None:
    path, _ = saved
    bundle = load_bundle(path)
    bb = bundle.backbone
    assert bb is not backbone
    assert bb.weights_sha256 == backbone.weights_sha256
    assert bb.preprocessing == backbone.preprocessing
    x = torch.stack([backbone.preprocessing.load(p) for p in oct_images[:2]])
    s1, p1 = backbone.encode(x, "fp32")
    s2, p2 = bb.encode(x, "fp32")
    assert torch.equal(p1, p2) and torch.equal(s1, s2)


def _flip_byte(path: Path, offset_fraction: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["head.safetensors", "backbone.safetensors"])
def test_tampered_weights_file(tmp_path: Path, backbone: Backbone, name: str) -> None:
    path, _ = _save(tmp_path / "m", backbone)
    load_bundle(path)  # sound before
    _flip_byte(path / name)
    with pytest.raises(RetinaLensError, match=name):
        load_bundle(path)


def test_missing_weights_file(tmp_path: Path, backbone: Backbone) -> None:
    path, _ = _save(tmp_path / "m", backbone)
    (path / "head.safetensors").unlink()
    with pytest.raises(RetinaLensError, match="head.safetensors"):
        load_bundle(path)


def test_missing_manifest(tmp_path: Path, backbone: Backbone) -> None:
    path, _ = _save(tmp_path / "m", backbone)
    (path / MANIFEST).unlink()
    with pytest.raises(RetinaLensError, match="manifest"):
        load_bundle(path)
    with pytest.raises(RetinaLensError):
        load_bundle(tmp_path / "does-not-exist")


def test_unreadable_or_newer_manifest(tmp_path: Path, backbone: Backbone) -> None:
    path, _ = _save(tmp_path / "m", backbone)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(RetinaLensError):
        load_bundle(path)
    (path / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "classes"}))
    with pytest.raises(RetinaLensError):
        load_bundle(path)
    (path / MANIFEST).write_text(json.dumps(manifest | {"format": manifest["format"] + 1}))
    with pytest.raises(RetinaLensError, match="newer"):
        load_bundle(path)


def test_save_over_existing_bundle_replaces_it(tmp_path: Path, backbone: Backbone) -> None:
    out = tmp_path / "models" / "m"
    _save(out, backbone, cfg=HeadConfig(kind="conv", channels=8), files={"old-only.txt": b"old"})
    assert (out / "old-only.txt").is_file()
    _, head2 = _save(out, backbone, cfg=HeadConfig(kind="linear"), classes=["A", "B", "C"], seed=5,
                     files={"config.json": b"{}"})
    bundle = load_bundle(out)
    assert bundle.classes == ["A", "B", "C"]
    assert bundle.head_config.kind == "linear"
    for k, v in head2.state_dict().items():
        assert torch.equal(bundle.head.state_dict()[k], v)
    assert not (out / "old-only.txt").exists()  # replaced, not merged
    # no temp or backup folders left beside it
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]


def test_failed_save_leaves_nothing_behind(tmp_path: Path, backbone: Backbone) -> None:
    out = tmp_path / "models" / "m"
    _save(out, backbone)
    before = _sha(out / MANIFEST)
    cfg = HeadConfig(kind="linear")
    # a section that JSON cannot hold (NaN) fails the manifest write after the weights were written
    with pytest.raises(ValueError):
        save_bundle(out, backbone=backbone, head=_head(cfg), head_config=cfg, classes=OCT, precision="fp32",
                    feature_shape=FEATURE_SHAPE, sections={"bad": float("nan")})
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
    assert _sha(out / MANIFEST) == before  # the old bundle is intact
    load_bundle(out)


def test_never_replaces_a_file_or_a_foreign_folder(tmp_path):
    from retinalens.bundle.store import check_output_folder

    (tmp_path / "file").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    for target in (tmp_path / "file", tmp_path / "docs"):
        with pytest.raises(RetinaLensError):
            check_output_folder(target)
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty")  # new or empty folders are fine
    check_output_folder(tmp_path / "new")


def test_an_unwritable_destination_is_refused_up_front(tmp_path):
    from retinalens.bundle.store import check_output_folder

    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(RetinaLensError, match="cannot create"):
        check_output_folder(tmp_path / "afile.txt" / "sub")  # a file where a folder must be
