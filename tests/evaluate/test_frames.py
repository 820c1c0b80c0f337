"""`evaluate` on a labelled dataset of multi-frame files (DICOM Ophthalmic Tomography volumes and a
multi-page TIFF built from real Kermany B-scans): each frame is a B-scan, each file one volume, with the
answers `predict --volumes` gives, through the feature cache; a broken file is one listed failure."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")

import dicom_files as F  # noqa: E402
from helpers import chunk_files  # noqa: E402
from retinalens.config import VolumeConfig  # noqa: E402
from retinalens.data.decode import decode_image  # noqa: E402
from retinalens.data.discover import discover  # noqa: E402
from retinalens.data.hashing import sha256_files  # noqa: E402
from retinalens.evaluate.frames import score_bscans  # noqa: E402
from retinalens.evaluate.run import evaluate_bundle  # noqa: E402
from retinalens.predict.model import Model  # noqa: E402
from retinalens.predict.volume import predict_volumes, volume_inputs  # noqa: E402
from retinalens.trust.calibration import calibrated  # noqa: E402

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")


@pytest.fixture(scope="module")
def volume_dataset(oct_sample_root: Path, small_dataset: Path, tmp_path_factory) -> dict:
    """Class folders of multi-frame files: per class an OPT volume of 3 real test B-scans (its own
    patient in PatientID), a multi-page TIFF of 2 in NORMAL, one JPEG B-scan in DME, a training JPEG of
    the bundle in CNV (left out by file hash), and in CNV an OPT file whose header claims 5 frames
    but holds 3 (broken)."""
    root = tmp_path_factory.mktemp("volumes") / "data"
    frames, files = {}, {}
    for k, cls in enumerate(CLASSES):
        scans = sorted((oct_sample_root / "test" / cls).glob("*.jpeg"))[4:7]  # not the bundle's own test split
        pixels = F.volume(scans)
        files[cls] = F.save(F.build(pixels, sop_class=F.OPT, patient=f"PAT-{k}"), root / cls / f"IM000{k}")
        frames[cls] = pixels
    tif_scans = sorted((oct_sample_root / "test" / "NORMAL").glob("*.jpeg"))[7:9]
    images = [decode_image(p, keep_grey=True) for p in tif_scans]
    tif = root / "NORMAL" / "NORMAL-777-1.tif"
    images[0].save(tif, format="TIFF", save_all=True, append_images=images[1:])
    jpeg = sorted((oct_sample_root / "test" / "DME").glob("*.jpeg"))[7]
    shutil.copy(jpeg, root / "DME" / jpeg.name)
    trained = sorted((small_dataset / "train" / "CNV").glob("*.jpeg"))[0]
    shutil.copy(trained, root / "CNV" / trained.name)
    broken = F.save(F.build(frames["CNV"], sop_class=F.OPT, frames=5, patient="PAT-X"), root / "CNV" / "IM0099")
    return {"root": root, "opt": files, "tif": tif, "jpeg": root / "DME" / jpeg.name, "broken": broken,
            "n_frames": 3 * len(CLASSES) + 2}


@pytest.fixture(scope="module")
def evaluated(small_bundle, volume_dataset, tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("frames-cache")
    report = cache.parent / "frames-report.html"
    m = evaluate_bundle(small_bundle, volume_dataset["root"], cache=cache, n_boot=50, progress=False,
                        report_path=report, volumes=VolumeConfig(group_by="patient"))
    return {"metrics": m, "cache": cache, "report": report.read_text()}


def test_each_frame_is_a_b_scan_and_training_files_are_left_out(evaluated, volume_dataset):
    m = evaluated["metrics"]
    assert m["n_images"] == volume_dataset["n_frames"] + 1  # every frame, and the one JPEG
    scored = m["data"]["scored"]
    # Left out by file, before any expansion: 4 OPT + TIFF + 2 JPEGs + the broken file are in the data.
    assert (scored["n_in_data"], scored["n_images"], scored["excluded_training"]) == (8, 7, 1)
    assert (scored["n_multi_frame_files"], scored["n_bscans"]) == (5, m["n_images"])
    [failure] = m["failures"]
    assert failure["input"] == str(volume_dataset["broken"]) and "frame" in failure["error"]


def test_frames_are_scored_as_predict_scores_them(small_bundle, volume_dataset):
    """The evaluation's per-frame probabilities (through the feature cache) are Model.predict's on the
    frames that predict --volumes reads from the same files."""
    ds = discover(volume_dataset["root"])
    samples = [s for s in ds.samples if s.path != volume_dataset["broken"] and s.path.suffix != ".jpeg"]
    out = score_bscans(small_bundle, samples, sha256_files(s.path for s in samples), None, progress=False)
    assert [b.name for b in out.bscans][:3] == [f"{samples[0].path}#frame {i}" for i in (1, 2, 3)]
    assert {b.sample.patient for b in out.bscans if b.sample.path == volume_dataset["opt"]["DME"]} == \
        {s.patient for s in samples if s.path == volume_dataset["opt"]["DME"]}
    volumes, failures = volume_inputs([s.path for s in samples], "patient")
    assert not failures and sorted(len(v.slices) for v in volumes) == [2, 3, 3, 3, 3]
    by_name = {}
    for r in predict_volumes(Model(small_bundle), volumes):
        by_name |= {s["input"]: s for s in r["slices"]}
    probs = calibrated(out.probabilities, small_bundle.temperature)
    assert len(out.bscans) == len(by_name) == 14
    for b, p in zip(out.bscans, probs):
        predicted = by_name[b.name]
        assert np.allclose(p, [predicted["probabilities"][c] for c in small_bundle.classes], atol=1e-4), b.name
        assert small_bundle.classes[int(np.argmax(p))] == max(predicted["probabilities"],
                                                               key=predicted["probabilities"].get)


def test_each_file_is_one_volume_with_predicts_answer(evaluated, small_bundle, volume_dataset):
    v = evaluated["metrics"]["volumes"]
    rows = {r["volume"]: r for r in v["volumes"]}
    files = [*volume_dataset["opt"].values(), volume_dataset["tif"]]
    assert sorted(r["volume"] for r in v["volumes"] if r["grouping"] == "file") == sorted(map(str, files))
    assert [r["grouping"] for r in v["volumes"]].count("patient") == 1  # the JPEG keeps --group-by
    assert v["grouping"] == "patient, file" or v["grouping"] == "file, patient"
    assert "each multi-frame file" in v["grouping_note"] and "patient id in their names" in v["grouping_note"]
    for cls, path in volume_dataset["opt"].items():
        assert (rows[str(path)]["true"], rows[str(path)]["n_slices"]) == (cls, 3)
    assert rows[str(volume_dataset["tif"])]["n_slices"] == 2
    volumes, _ = volume_inputs(files, "patient")
    for p in predict_volumes(Model(small_bundle), volumes):
        row = rows[p["volume"]]
        assert (row["label"], row["refer"], row["index_slice"], row["gradable"]) == \
            (p["label"], p["refer"], p["index_slice"], p["gate"]["ok"])
        assert row["index_input"] == p["slices"][p["index_slice"]]["input"]
        assert row["p_referral"] == pytest.approx(p["p_referral"], abs=1e-4)


def test_report_draws_frames_in_strips_and_gallery(evaluated):
    m, html = evaluated["metrics"], evaluated["report"]
    rows = {r["volume"]: r for r in m["volumes"]["volumes"]}
    strips = re.findall(r"<h3>([^<]*)</h3><div class=\"strip\">(.*?)</div>", html)
    drawn = [(rows[head.split(": true")[0]], cells) for head, cells in strips]
    assert drawn and any(row["grouping"] == "file" for row, _ in drawn)
    for row, cells in drawn:
        assert cells.count("<img") == row["n_slices"] and "unreadable" not in cells
    wrong = re.search(r"(\d+) of (\d+) images misclassified", html)
    if wrong:  # the gallery's thumbnails of frames are decoded again from their files
        assert "could not be read again" not in html and html.count('alt="Heat map for') >= 1
        assert re.search(r'<img alt="[^"]*#frame \d+"', html)


def test_a_second_run_takes_the_frames_from_the_feature_cache(evaluated, small_bundle, volume_dataset):
    folder = next(p.parent for p in evaluated["cache"].rglob("manifest.json"))
    before = chunk_files(folder)
    again = evaluate_bundle(small_bundle, volume_dataset["root"], cache=evaluated["cache"], n_boot=50,
                            progress=False, volumes=VolumeConfig(group_by="patient"))
    assert chunk_files(folder) == before and before  # nothing extracted: no chunk written or rewritten
    assert again["accuracy"] == evaluated["metrics"]["accuracy"]
    assert again["volumes"]["volumes"] == evaluated["metrics"]["volumes"]["volumes"]
