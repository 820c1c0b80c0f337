"""Folders of DICOM files as datasets: patients from PatientID (pseudonymised), eyes and acquisitions
from their tags, labels from a CSV keyed by SOPInstanceUID or by file name; the patient-level splits
hold on a clinic export with no naming convention."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("pydicom")

import dicom_files as F  # noqa: E402
from retinalens.data.dicom_dataset import pseudonym  # noqa: E402
from retinalens.data.discover import discover  # noqa: E402
from retinalens.data.splits import assert_disjoint, make_splits  # noqa: E402
from retinalens.config import SplitConfig  # noqa: E402
from retinalens.errors import RetinaLensError  # noqa: E402

PATIENTS = [f"{F.SENTINEL}-{k}" for k in range(8)]  # record numbers that must not surface


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, oct_sample_root: Path) -> tuple[Path, dict[Path, tuple[str, str]]]:
    """A clinic-style export: files named by number in one folder, two classes, eight patients, two eyes
    each; returns (folder, file -> (class, patient id))."""
    root = tmp_path_factory.mktemp("export")
    truth: dict[Path, tuple[str, str]] = {}
    scans = {c: sorted((oct_sample_root / "train" / c).glob("*.jpeg"))[:16] for c in ("CNV", "NORMAL")}
    n = 0
    for cls, paths in scans.items():
        for k, scan in enumerate(paths):
            patient = PATIENTS[k % len(PATIENTS)]
            ds = F.build(F.grey_pixels(scan)[:64, :64], patient=patient, laterality="RL"[k // len(PATIENTS) % 2])
            n += 1
            truth[F.save(ds, root / "images" / f"{n:05d}")] = (cls, patient)
    return root, truth


def _labels(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_keyed_by_instance_uid(export, tmp_path: Path) -> None:
    from pydicom import dcmread

    root, truth = export
    rows = [{"SOPInstanceUID": dcmread(p, stop_before_pixels=True).SOPInstanceUID, "label": cls}
            for p, (cls, _) in truth.items()]
    ds = discover(_labels(root / "labels.csv", rows))
    assert len(ds) == len(truth) and ds.classes == ["CNV", "NORMAL"]
    for s in ds.samples:
        cls, patient = truth[s.path]
        assert s.label == cls and s.patient == pseudonym(patient) and F.SENTINEL not in s.patient
        assert s.laterality in ("R", "L") and s.study.startswith("study-") and s.series.startswith("series-")
    assert len({s.patient for s in ds.samples}) == len(PATIENTS)
    splits = make_splits(ds, SplitConfig(val_fraction=0.25, test_fraction=0.25))
    assert_disjoint(ds, splits)  # no patient in two splits: the grouping came from PatientID
    assert all(F.SENTINEL not in str(v) for v in splits.summary(ds).values())

    rows[0]["SOPInstanceUID"] = "1.2.3.999"
    with pytest.raises(RetinaLensError, match="1 SOPInstanceUID") as caught:
        discover(_labels(tmp_path / "bad.csv", rows), images_dir=root / "images")
    assert "1.2.3.999" not in str(caught.value)


def test_csv_keyed_by_file_name_and_class_folders(export, tmp_path: Path) -> None:
    root, truth = export
    rows = [{"image": f"images/{p.name}", "label": cls} for p, (cls, _) in truth.items()]
    by_name = discover(_labels(root / "by_name.csv", rows))
    assert {s.path: s.patient for s in by_name.samples} == {p: pseudonym(pid) for p, (_, pid) in truth.items()}
    for p, (cls, _) in truth.items():  # the same files in class folders
        (tmp_path / cls).mkdir(exist_ok=True)
        (tmp_path / cls / p.name).write_bytes(p.read_bytes())
    folders = discover(tmp_path)
    assert sorted(s.patient for s in folders.samples) == sorted(s.patient for s in by_name.samples)


def test_pseudonyms_are_keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = pseudonym("12345")
    monkeypatch.setenv("RETINALENS_PSEUDONYM_KEY", "clinic secret")
    assert pseudonym("12345") != plain and pseudonym("12345") == pseudonym("12345", key=b"clinic secret")
    assert pseudonym("") == ""
