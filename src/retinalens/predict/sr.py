"""Predictions as DICOM Structured Reports (highdicom, Comprehensive SR): `predict --sr-out DIR`.

One SR per DICOM input, in the source's study, referencing the source instance (an IMAGE content item
with its SOP class and instance UIDs), so that a PACS viewer shows the finding beside the image: the
predicted class (or "ungradable" where the quality gate refused a label), its probability, the
referral level and the algorithm's name and version. A PACS files an SR by its patient and study, so
the SR carries the source's Patient and Study modules (highdicom copies them from the evidence): it
is an output for the clinic's own archive, written only when asked for, never logged.

Inputs that are not DICOM files (JPEGs, URLs) get no SR: there is no instance to refer to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _deps
from .._version import __version__
from ..data.dicom import is_dicom_file, pydicom
from ..errors import RetinaLensError

_SCHEME = "99RETINALENS"  # a private coding scheme for our class names and outputs (PS3.16 8.2)


def _hd():
    return _deps.require("highdicom", "DICOM Structured Report output", extra="dicom")


def report_dataset(result: dict[str, Any], source: Path, classes: list[str]):
    """The Comprehensive SR (a pydicom Dataset) of one prediction `result` on the DICOM file `source`."""
    hd = _hd()
    evidence = pydicom().dcmread(source, stop_before_pixels=True)
    concept = hd.sr.CodedConcept
    label = result.get("label")
    probs = result.get("probabilities") or {}
    items = [
        hd.sr.TextContentItem(concept("111001", "DCM", "Algorithm Name"), "RetinaLens", relationship_type="CONTAINS"),
        hd.sr.TextContentItem(concept("111003", "DCM", "Algorithm Version"), __version__, relationship_type="CONTAINS"),
        hd.sr.CodeContentItem(concept("121071", "DCM", "Finding"),
                              concept(label or "UNGRADABLE", _SCHEME, label or "ungradable image"),
                              relationship_type="CONTAINS"),
        hd.sr.ImageContentItem(concept("121112", "DCM", "Source of Measurement"), evidence.SOPClassUID,
                               evidence.SOPInstanceUID, relationship_type="CONTAINS"),
    ]
    for cls in classes:
        items.append(hd.sr.NumContentItem(concept(f"P_{cls}"[:16], _SCHEME, f"Probability of {cls}"),
                                          float(probs.get(cls, 0.0)), concept("1", "UCUM", "no units"),
                                          relationship_type="CONTAINS"))
    if result.get("referral"):
        items.append(hd.sr.TextContentItem(concept("REFERRAL", _SCHEME, "Referral"), str(result["referral"]),
                                           relationship_type="CONTAINS"))
    # A free tree under the root container (Comprehensive SR allows it): no template is claimed.
    root = hd.sr.ContainerContentItem(concept("126000", "DCM", "Imaging Measurement Report"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(evidence=[evidence], content=root, series_instance_uid=hd.UID(), series_number=900,
                                 sop_instance_uid=hd.UID(), instance_number=1, manufacturer="RetinaLens",
                                 is_complete=True)


def write_reports(results: list[dict[str, Any]], classes: list[str], out: Path) -> list[Path]:
    """An SR file in `out` for every result of a DICOM input without an error (named by the SR's own
    new UID, nothing of the patient's); returns their paths."""
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RetinaLensError(f"{out}: cannot create the SR folder ({exc.strerror})") from None
    for result in results:
        source = Path(str(result.get("input", "")))
        if "error" in result or not source.is_file() or not is_dicom_file(source):
            continue
        ds = report_dataset(result, source, classes)
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
