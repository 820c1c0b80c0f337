"""`--group-by series`: single-frame DICOM B-scans grouped into volumes by their acquisition
(SeriesInstanceUID), whatever their names and folders; `evaluate --volumes` and `predict --volumes`
give each series the same answer."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")

import dicom_files as F  # noqa: E402
from retinalens.config import VolumeConfig  # noqa: E402
from retinalens.data.dicom_dataset import pseudonym  # noqa: E402
from retinalens.evaluate.run import evaluate_bundle  # noqa: E402
from retinalens.predict.model import Model  # noqa: E402
from retinalens.predict.volume import predict_volumes, volume_inputs  # noqa: E402

SERIES = {"1.2.826.0.1.3680043.10.543.1": ("CNV", "R"), "1.2.826.0.1.3680043.10.543.2": ("CNV", "L"),
          "1.2.826.0.1.3680043.10.543.3": ("NORMAL", "R")}


@pytest.fixture(scope="module")
def export(oct_sample_root: Path, tmp_path_factory) -> Path:
    """One patient, three acquisitions of 3 real test B-scans each, files numbered across them in
    interleaved order; both CNV series share one class folder, so only the series tells them apart."""
    root = tmp_path_factory.mktemp("series") / "data"
    n = 0
    for k, (uid, (cls, eye)) in enumerate(SERIES.items()):
        for scan in sorted((oct_sample_root / "test" / cls).glob("*.jpeg"))[3 * k:3 * k + 3]:
            n += 1
            ds = F.build(F.grey_pixels(scan), patient="PAT-1", laterality=eye, series=uid, study="1.2.3.4")
            F.save(ds, root / cls / f"{(n * 7) % 10:05d}{n}")
    return root


def test_evaluate_groups_dicom_b_scans_by_series(small_bundle, export, tmp_path):
    m = evaluate_bundle(small_bundle, export, cache=tmp_path / "cache", n_boot=50, progress=False,
                        volumes=VolumeConfig(group_by="series"))
    v = m["volumes"]
    assert v["grouping"] == "series" and "SeriesInstanceUID" in v["grouping_note"]
    rows = {r["volume"]: r for r in v["volumes"]}
    # Pseudonyms of the series (never the UID itself), 3 B-scans each; by folder there would be 2 volumes
    # and by patient 1.
    assert set(rows) == {pseudonym(uid, "series") for uid in SERIES}
    assert all(r["n_slices"] == 3 for r in rows.values())
    assert sorted(r["true"] for r in rows.values()) == ["CNV", "CNV", "NORMAL"]

    files = sorted(p for p in export.rglob("*") if p.is_file())
    volumes, failures = volume_inputs(files, "series")
    assert not failures and sorted(v.id for v in volumes) == sorted(rows)
    for p in predict_volumes(Model(small_bundle), volumes):
        row = rows[p["volume"]]
        assert (p["grouping"], p["n_slices"]) == ("series", 3)
        assert (row["label"], row["refer"], row["index_slice"]) == (p["label"], p["refer"], p["index_slice"])
