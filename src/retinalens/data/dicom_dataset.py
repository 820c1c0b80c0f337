"""Datasets of DICOM files: who, which eye and which acquisition each image is, from its tags.

Clinic exports follow no file naming convention, so for a DICOM file the patient comes from PatientID,
the eye from ImageLaterality (else the series' Laterality), the visit and the acquisition from the
Study and Series Instance UIDs; patient-level splits then work as they do on the Kermany names. Only the
header is read (`stop_before_pixels`).

PatientID and the UIDs identify a person, so they never leave this module as they are: each becomes a
pseudonym, a keyed hash (HMAC-SHA256) of the value. The key is $RETINALENS_PSEUDONYM_KEY; set it (and
keep it secret) for pseudonyms that cannot be recomputed by someone guessing record numbers. Without
it a fixed public key is used: the pseudonyms are then as stable, but only as strong as the ids are
hard to guess. The same key gives the same pseudonyms, so splits are reproducible.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageDecodeError, RetinaLensError
from .dicom import is_dicom_file, read_tags

KEY_ENV = "RETINALENS_PSEUDONYM_KEY"
_PUBLIC_KEY = b"retinalens-pseudonym"  # used only when no key is given (see the module docstring)


def pseudonym(value: str, kind: str = "p", key: bytes | None = None) -> str:
    """`kind` + 16 hex digits of HMAC-SHA256(key, value); "" for an empty value. `key`: the bytes of
    $RETINALENS_PSEUDONYM_KEY when None (and set)."""
    if not value:
        return ""
    if key is None:
        key = os.environ.get(KEY_ENV, "").encode() or _PUBLIC_KEY
    return f"{kind}-{hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]}"


@dataclass(frozen=True)
class Identity:
    """Where a DICOM image belongs, pseudonymised: patient, eye ("R", "L", ""), study (visit) and series
    (acquisition)."""

    patient: str
    laterality: str
    study: str
    series: str


def identity(path: Path, keep_identifiers: bool = False) -> Identity | None:
    """The pseudonymised identity of a DICOM file (`keep_identifiers`: the tags' own values); None for
    any other file. RetinaLensError (naming the file, never a tag's value) for a DICOM file whose header
    cannot be read."""
    if not is_dicom_file(path):
        return None
    try:
        tags = read_tags(path)
    except ImageDecodeError as exc:
        raise RetinaLensError(str(exc)) from None
    if keep_identifiers:
        return Identity(tags.patient_id, tags.laterality, tags.study_uid, tags.series_uid)
    return Identity(pseudonym(tags.patient_id), tags.laterality, pseudonym(tags.study_uid, "study"),
                    pseudonym(tags.series_uid, "series"))


def add_identity(results: list[dict], keep_identifiers: bool = False) -> None:
    """Each prediction result (a dict whose "input" names a file) of a DICOM file gains its `patient`,
    `laterality`, `study` and `series`: pseudonyms, or with `keep_identifiers` the tags' values."""
    for result in results:
        path = Path(str(result.get("input", "")))
        if "error" not in result and path.is_file():
            who = identity(path, keep_identifiers)
            if who is not None:
                result.update(patient=who.patient, laterality=who.laterality, study=who.study, series=who.series)


def files_by_instance_uid(folders: Iterable[Path]) -> dict[str, Path]:
    """SOPInstanceUID -> file for every DICOM file below `folders` (the first found for a UID kept), for
    labels CSVs keyed by instance."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if path.name.upper() != "DICOMDIR" and is_dicom_file(path):
                try:
                    found.setdefault(read_tags(path).sop_instance_uid, path)
                except ImageDecodeError:
                    continue  # a damaged file is reported when it is decoded, if a row names it
    return found
