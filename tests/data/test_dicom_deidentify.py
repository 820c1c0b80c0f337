"""De-identified copies (data/deidentify.py): the identifying attributes gone at every depth, the pixel
data and the IOD's validity kept, UIDs replaced so that the instances of a study still belong together."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

import dicom_files as F  # noqa: E402
from retinalens.data.deidentify import deidentify  # noqa: E402


def test_identifiers_go_pixels_and_study_stay(tmp_path: Path, oct_images: list[Path]) -> None:
    study = pydicom.uid.generate_uid()
    sources = []
    for k, scan in enumerate(oct_images[:2]):
        ds = F.build(F.grey_pixels(scan), study=study)
        ds.add_new(0x00091010, "LO", f"{F.SENTINEL} private")  # a vendor's private element
        ds.add_new(0x60003000, "OW", F.SENTINEL.encode() * 2)  # overlay data
        ds.AnatomicRegionSequence[0].PatientName = F.SENTINEL  # nested, where no IOD puts it
        sources.append(F.save(ds, tmp_path / f"src{k}"))
    copies = []
    for k, src in enumerate(sources):
        out = tmp_path / f"copy{k}"
        out.write_bytes(deidentify(src.read_bytes()))
        raw = out.read_bytes()
        assert F.SENTINEL.encode() not in raw and b"19010101" not in raw
        copies.append(pydicom.dcmread(out))
        original = pydicom.dcmread(src)
        assert np.array_equal(copies[-1].pixel_array, original.pixel_array)
        assert copies[-1].SOPInstanceUID != original.SOPInstanceUID
        assert copies[-1].file_meta.MediaStorageSOPInstanceUID == copies[-1].SOPInstanceUID
        assert copies[-1].PatientIdentityRemoved == "YES"
        assert copies[-1].DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        if shutil.which("dciodvfy"):
            report = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
            assert not [ln for ln in (report.stdout + report.stderr).splitlines() if ln.startswith("Error")]
    assert copies[0].StudyInstanceUID == copies[1].StudyInstanceUID != study  # still one study
    assert copies[0].SeriesInstanceUID != copies[1].SeriesInstanceUID
