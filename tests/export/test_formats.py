"""Exported graphs against the fp32 eager model on real OCT scans: ONNX, TorchScript, Core ML."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from retinalens.errors import RetinaLensError
from retinalens.export import OnnxModel, export_bundle
from retinalens.export.formats import sidecar_path
from retinalens.predict.model import Model

TOL = 1e-4


@pytest.fixture(scope="module")
def onnx_file(small_bundle, tmp_path_factory):
    return export_bundle(small_bundle, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx")


def assert_parity(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    (p, pooled), (p_ref, pooled_ref) = got, want
    assert p.shape == p_ref.shape and pooled.shape == pooled_ref.shape
    assert (p.argmax(1) == p_ref.argmax(1)).all()
    assert np.abs(p - p_ref).max() < TOL
    assert np.abs(pooled - pooled_ref).max() < 1e-3 * np.abs(pooled_ref).max()  # features are O(1-10)


def test_onnx_matches_fp32_eager_on_real_scans(onnx_file, small_bundle, pixels, eager_fp32):
    import onnx

    onnx.checker.check_model(str(onnx_file), full_check=True)
    ort = OnnxModel(onnx_file)
    want = eager_fp32(small_bundle, pixels)
    assert_parity(ort.run(pixels), want)
    for n in (1, 5):  # the batch axis is dynamic
        assert_parity(ort.run(pixels[:n]), (want[0][:n], want[1][:n]))
    assert small_bundle.manifest.to_dict()["calibration"]["temperature"] != 1.0  # so the graph's temperature was exercised
    assert onnx_file.stat().st_size <= 20e6  # the deployable default model (EfficientNet-Lite0) target


def test_onnx_against_the_default_bf16_path(onnx_file, small_bundle, pixels):
    """onnxruntime (fp32) against what `predict --runtime torch` gives on this CPU (bf16 traced where
    the CPU has bf16 units): same class on every scan; the probabilities differ by up to ~0.08 on this
    bundle (bf16 features are ~10% off fp32 ones; README "Export" gives the figures on the real test split)."""
    default = Model(small_bundle, runtime="torch").probabilities(pixels)
    ort = OnnxModel(onnx_file).probabilities(pixels)
    assert (default.argmax(1) == ort.argmax(1)).all()
    assert np.abs(default - ort).max() < 0.25
    if small_bundle.precision == "fp32":  # a CPU without bf16 units: the very same numbers
        assert np.abs(default - ort).max() < TOL


def test_metadata_sidecar_and_embedded(onnx_file, small_bundle):
    import onnx

    side = json.loads(sidecar_path(onnx_file).read_text())
    assert side["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest() and side["file"] == "model.onnx"
    assert side["classes"] == small_bundle.classes == ["CNV", "DME", "DRUSEN", "NORMAL"]
    assert side["preprocessing"] == small_bundle.manifest.to_dict()["backbone"]["preprocessing"]
    assert side["referral"] == small_bundle.referral and side["positive_classes"] == ["CNV", "DME"]
    assert side["backbone"]["name"] == "efficientnet_lite0"
    assert side["backbone"]["weights_sha256"] == small_bundle.manifest.to_dict()["backbone"]["weights_sha256"]
    manifest_hash = hashlib.sha256((small_bundle.path / "manifest.json").read_bytes()).hexdigest()
    assert side["bundle"]["manifest_sha256"] == manifest_hash
    assert side["temperature"] == pytest.approx(small_bundle.manifest.to_dict()["calibration"]["temperature"])
    assert side["input"]["dtype"] == "uint8" and side["input"]["shape"] == ["N", 224, 224, 3]
    assert side["outputs"] == {"probabilities": ["N", 4], "pooled": ["N", 1280]}
    embedded = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(embedded["retinalens"]) == {k: v for k, v in side.items() if k not in ("file", "sha256")}
    assert OnnxModel(onnx_file).classes == small_bundle.classes  # the file alone is enough


def test_torchscript_round_trip(small_bundle, pixels, eager_fp32, tmp_path):
    out = export_bundle(small_bundle.path, "torchscript", tmp_path / "model.pt")
    extra = {"retinalens.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["retinalens.json"])["classes"] == small_bundle.classes
    assert json.loads(sidecar_path(out).read_text())["format"] == "torchscript"
    want = eager_fp32(small_bundle, pixels)
    with torch.no_grad():
        for n in (1, 5, 8):
            p, pooled = module(pixels[:n])
            assert_parity((p.double().numpy(), pooled.numpy()), (want[0][:n], want[1][:n]))


def test_a_scratch_backbone_with_a_dense_head(tmp_path, oct_images, eager_fp32):
    """Export is generic: EyeNet (not a timm model) with the dense head on its spatial map, calibrated."""
    from retinalens.bundle.store import load_bundle, save_bundle
    from retinalens.models.heads import HeadConfig, create_head
    from retinalens.models.registry import create_backbone

    bb = create_backbone("eyenet")
    cfg = HeadConfig(kind="dense", hidden=32)
    shape = bb.feature_shape()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = create_head(cfg, shape, 4)
    save_bundle(tmp_path / "eyenet", backbone=bb, head=head, head_config=cfg, classes=["CNV", "DME", "DRUSEN", "NORMAL"],
                precision="fp32", feature_shape=shape, sections={"calibration": {"temperature": 2.5}})
    bundle = load_bundle(tmp_path / "eyenet")
    x = torch.stack([bundle.preprocessing.load(p) for p in oct_images])  # 256 px for EyeNet
    out = export_bundle(bundle, "onnx", tmp_path / "eyenet.onnx")
    assert_parity(OnnxModel(out).run(x), eager_fp32(bundle, x))
    assert json.loads(sidecar_path(out).read_text())["input"]["shape"] == ["N", 256, 256, 3]


def test_coreml_conversion(small_bundle, tmp_path):
    """Core ML needs coremltools (extra 'coreml'). It converts on Linux; running the package needs macOS."""
    ct = pytest.importorskip("coremltools")
    out = export_bundle(small_bundle, "coreml", tmp_path / "model.mlpackage")
    assert (out / "Manifest.json").is_file() and sidecar_path(out).is_file()
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["pixels"]
    assert [o.name for o in spec.description.output] == ["probabilities", "pooled"]
    array = spec.description.input[0].type.multiArrayType
    assert list(array.shape)[1:] == [224, 224, 3]
    assert (array.shapeRange.sizeRanges[0].lowerBound, array.shapeRange.sizeRanges[0].upperBound) == (1, 1024)
    meta = json.loads(spec.description.metadata.userDefined["retinalens"])
    assert meta["classes"] == small_bundle.classes and meta["input"]["dtype"] == "float32"
    if sys.platform == "darwin":  # Core ML runs only on Apple platforms
        x = np.stack([np.zeros((224, 224, 3), np.float32)] * 2)
        assert ct.models.MLModel(str(out)).predict({"pixels": x})["probabilities"].shape == (2, 4)


def test_bad_requests_are_clear_errors(small_bundle, tmp_path):
    with pytest.raises(RetinaLensError, match="unknown export format 'openvino'"):
        export_bundle(small_bundle, "openvino", tmp_path / "m.xml")
    with pytest.raises(RetinaLensError, match="not a RetinaLens model bundle"):
        export_bundle(tmp_path, "onnx", tmp_path / "m.onnx")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RetinaLensError, match="not a writable folder"):
        export_bundle(small_bundle, "onnx", tmp_path / "afile" / "m.onnx")
    with pytest.raises(RetinaLensError, match="is a folder"):
        export_bundle(small_bundle, "onnx", tmp_path)
    with pytest.raises(RetinaLensError, match="a Core ML package is a folder"):
        export_bundle(small_bundle, "coreml", tmp_path / "afile")
    with pytest.raises(RetinaLensError, match="not a RetinaLens ONNX export"):
        OnnxModel(tmp_path / "afile")
