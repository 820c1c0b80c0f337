"""OCT volumes: the aggregation rule on synthetic slice results, then real volumes of real B-scans."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import assert_clean_error, run_cli
from retinalens.config import VolumeConfig
from retinalens.data.decode import decode_image
from retinalens.data.volumes import multi_frame_volume
from retinalens.explain import Explainer
from retinalens.explain.volume import suspicious_heatmaps
from retinalens.predict.model import Model
from retinalens.predict.volume import aggregate, predict_volumes, volume_inputs

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
LEVELS = {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}
THRESHOLD = 0.5


def slice_result(name: str, probs: list[float], ok: bool = True) -> dict:
    """A slice result as Model.predict_many gives it (positives CNV + DME, referral threshold 0.5)."""
    p = dict(zip(CLASSES, probs))
    label = max(p, key=p.get) if ok else None
    p_ref = p["CNV"] + p["DME"]
    return {"input": name, "label": label, "probabilities": p, "referral": LEVELS.get(label),
            "p_referral": p_ref, "refer": p_ref >= THRESHOLD if ok else None,
            "gate": {"ok": ok, "reason": None if ok else "out_of_distribution", "scores": {}}}


def normal_slices(n: int) -> list[dict]:
    return [slice_result(f"s{i}.jpeg", [0.04, 0.03, 0.08, 0.85]) for i in range(n)]


def test_one_urgent_slice_among_30_normal_makes_the_volume_urgent():
    slices = normal_slices(30)
    slices.insert(17, slice_result("cnv.jpeg", [0.9, 0.04, 0.03, 0.03]))
    v = aggregate("eye", "folder", slices)
    assert v["label"] == "CNV" and v["referral"] == "urgent" and v["refer"] is True
    assert v["index_slice"] == 17 and v["suspicious"][0] == 17 and v["p_referral"] == pytest.approx(0.94)
    # The mean the rule refuses to use: it would have sent this eye home.
    mean = v["mean_probabilities"]
    assert mean["CNV"] + mean["DME"] < THRESHOLD and max(mean, key=mean.get) == "NORMAL"
    assert v["gate"]["ok"] and (v["n_slices"], v["n_gradable"], v["n_ungradable"]) == (31, 31, 0)


def test_k_slices_must_agree_and_ranking_is_by_p_referral():
    slices = normal_slices(10)
    slices[3] = slice_result("a", [0.7, 0.1, 0.1, 0.1])
    slices[8] = slice_result("b", [0.2, 0.2, 0.5, 0.1])  # 0.4: under the threshold
    one = aggregate("eye", "folder", slices, VolumeConfig(min_positive_slices=2))
    assert one["refer"] is False and one["index_slice"] == 8 and one["label"] == "DRUSEN"
    assert one["suspicious"] == [3, 8, 0]
    slices[5] = slice_result("c", [0.1, 0.6, 0.2, 0.1])
    two = aggregate("eye", "folder", slices, VolumeConfig(min_positive_slices=2))
    assert two["refer"] is True and two["index_slice"] == 5 and two["label"] == "DME"


def test_ungradable_slices_do_not_decide_and_too_many_make_the_volume_ungradable():
    slices = normal_slices(20)
    slices[0] = slice_result("bad-but-red", [0.99, 0.0, 0.0, 0.01], ok=False)  # the gate rejected it
    v = aggregate("eye", "folder", slices)
    assert v["gate"]["ok"] and v["refer"] is False and v["index_slice"] != 0 and v["n_ungradable"] == 1
    for i in range(1, 11):
        slices[i] = slice_result(f"u{i}", [0.1, 0.1, 0.1, 0.7], ok=False)
    slices[12] = {"input": "broken.jpeg", "error": "broken.jpeg: damaged image"}
    v = aggregate("eye", "folder", slices)
    assert not v["gate"]["ok"] and "8 of 20 B-scans gradable" in v["gate"]["reason"]
    assert v["label"] is None and v["refer"] is None and v["suspicious"] == []
    assert (v["n_ungradable"], v["n_unreadable"]) == (11, 1)


@pytest.fixture(scope="module")
def model(small_bundle):
    return Model(small_bundle)


def _pool(root: Path, cls: str) -> list[Path]:
    return sorted((root / "train" / cls).glob("*.jpeg")) + sorted((root / "test" / cls).glob("*.jpeg"))


@pytest.fixture(scope="module")
def urgent_volume(model, oct_sample_root, tmp_path_factory):
    """A folder of 6 real NORMAL B-scans the model does not refer and one real CNV B-scan it does, 4th
    (few: the rule's 30-slice case is the synthetic test above; this one runs the real model)."""
    cnv = next(r["input"] for r in model.predict_many(_pool(oct_sample_root, "CNV")[:8])
               if r["refer"] and r["label"] == "CNV")
    normals = [r["input"] for r in model.predict_many(_pool(oct_sample_root, "NORMAL")[:10]) if r["refer"] is False]
    assert len(normals) >= 6
    folder = tmp_path_factory.mktemp("volume") / "OD-visit1"
    folder.mkdir()
    for i, p in enumerate(normals[:3] + [cnv] + normals[3:6]):
        shutil.copy(p, folder / f"bscan-{i:02d}.jpeg")
    return folder


def test_a_real_urgent_b_scan_among_normal_ones_refers_the_volume(model, urgent_volume):
    volumes, failures = volume_inputs([urgent_volume], "folder")
    assert not failures and len(volumes) == 1 and volumes[0].slices[3].name.endswith("bscan-03.jpeg")
    v = predict_volumes(model, volumes)[0]
    assert v["grouping"] == "folder" and v["n_slices"] == 7
    assert v["refer"] is True and v["index_slice"] == 3 and v["suspicious"][0] == 3
    positives = model.bundle.positive_classes
    assert sum(v["mean_probabilities"][c] for c in positives) < model.referral_threshold.threshold
    alone = model.predict_many([s.item for s in volumes[0].slices], batch_size=4)  # the slices as plain images
    assert [s["p_referral"] for s in v["slices"]] == pytest.approx([r["p_referral"] for r in alone], abs=1e-5)

    with Explainer(model) as ex:
        maps = suspicious_heatmaps(ex, volumes[0], v)
    assert sorted(maps) == sorted(v["suspicious"])
    m = maps[3]
    assert m.class_name == v["label"] == "CNV" and m.input.endswith("bscan-03.jpeg")
    assert m.heatmap.shape == decode_image(volumes[0].slices[3].item).size[::-1] and m.heatmap.max() > 0


def test_patient_grouping_of_kermany_names(oct_sample_root):
    test = oct_sample_root / "test"
    volumes, _ = volume_inputs([test], "patient")
    by_id = {v.id: v for v in volumes}
    # Kermany patient 1083927 has scans in CNV and DME: one patient, one "volume" (names carry no acquisition).
    assert {Path(s.name).parent.name for s in by_id["1083927"].slices} == {"CNV", "DME"}
    assert all(v.grouping == "patient" for v in volumes)
    assert sum(len(v.slices) for v in volumes) == len(list(test.glob("*/*.jpeg")))


def test_a_multi_page_tiff_is_one_volume_with_the_jpegs_predictions(model, oct_sample_root, tmp_path):
    scans = sorted((oct_sample_root / "test" / "CNV").glob("*.jpeg"))[:4]
    frames = [decode_image(p, keep_grey=True) for p in scans]
    tif = tmp_path / "volume-no-extension"
    frames[0].save(tif, format="TIFF", save_all=True, append_images=frames[1:])
    volume = multi_frame_volume(tif)
    assert volume is not None and volume.grouping == "file" and len(volume.slices) == 4
    assert volume.slices[2].name == f"{tif}#frame 3"
    v = predict_volumes(model, [volume])[0]
    for s, jpeg in zip(v["slices"], model.predict_many(scans)):
        assert np.allclose(list(s["probabilities"].values()), list(jpeg["probabilities"].values()), atol=1e-5)
    Image.new("L", (8, 8)).save(tmp_path / "single.tif")
    assert multi_frame_volume(tmp_path / "single.tif") is None  # one frame: an ordinary image


def test_predict_volumes_cli(small_bundle, urgent_volume, oct_sample_root, tmp_path):
    other = tmp_path / "OS-visit1"
    other.mkdir()
    for p in sorted((oct_sample_root / "test" / "NORMAL").glob("*.jpeg"))[:3]:
        shutil.copy(p, other / p.name)
    r = run_cli("predict", small_bundle.path, urgent_volume, other, tmp_path / "missing", "--volumes",
                "--group-by", "folder", "--json", tmp_path / "v.json", "--csv", tmp_path / "v.csv",
                "--heatmaps", tmp_path / "maps", "-q")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))  # piped: the volume rows
    assert [row["volume"] for row in rows] == [str(urgent_volume), str(other), str(tmp_path / "missing")]
    assert all(None not in row for row in rows) and "no such file" in rows[2]["error"]  # every row fits the header
    assert rows[0]["refer"] == "yes" and rows[0]["index_slice"] == "3" and rows[0]["n_slices"] == "7"
    assert rows[0]["index_input"].endswith("bscan-03.jpeg") and rows[1]["n_slices"] == "3"
    assert (tmp_path / "v.csv").read_text() == r.stdout
    results = json.loads((tmp_path / "v.json").read_text())
    assert len(results[0]["slices"]) == 7 and results[0]["slices"][3]["refer"] is True
    assert "grouped by folder" in r.stderr and "k-th most suspicious" in r.stderr
    pngs = sorted(Path(p).name for p in results[0]["heatmaps"].values())
    assert len(pngs) == 3 and "bscan-03.CNV.png" in pngs and (tmp_path / "maps" / "bscan-03.CNV.png").stat().st_size

    assert_clean_error(run_cli("predict", small_bundle.path, other, "--volumes", "--group-by", "eye"),
                       "unknown grouping 'eye'")


def test_a_dicom_oct_volume_is_one_volume_on_the_command_line(small_bundle, oct_sample_root, tmp_path):
    """An Ophthalmic Tomography file (one patient's real B-scans as frames, no extension, as devices
    export) named on the command line is answered as one volume, each frame as the PNG of its pixels
    would be; a one-frame DICOM file stays an ordinary image."""
    pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")
    import dicom_files as F

    scans = sorted((oct_sample_root / "test" / "CNV").glob("*.jpeg"))[:3]
    frames = F.volume(scans)
    opt = F.save(F.build(frames, sop_class=F.OPT), tmp_path / "IM0001")
    volume = multi_frame_volume(opt)
    assert volume is not None and volume.grouping == "file" and len(volume.slices) == len(scans)
    single = F.save(F.build(frames[0]), tmp_path / "IM0002")
    assert multi_frame_volume(single) is None
    r = run_cli("predict", small_bundle.path, opt, "-q")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(row["volume"], row["grouping"], row["n_slices"]) for row in rows] == [(str(opt), "file", "3")]
    pngs = []
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"frame{i}.png")
        pngs.append(tmp_path / f"frame{i}.png")
    by_png = Model(small_bundle).predict_many(pngs)
    v = predict_volumes(Model(small_bundle), [volume])[0]
    for s, want in zip(v["slices"], by_png):
        assert np.allclose(list(s["probabilities"].values()), list(want["probabilities"].values()), atol=1e-5)
