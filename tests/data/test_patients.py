"""Patient ids from file names: Kermany and Kaggle defaults, user regexes, and images with no id."""

from __future__ import annotations

from pathlib import Path

import pytest

from retinalens.data.discover import discover
from retinalens.data.patients import PatientParser
from retinalens.errors import RetinaLensError


@pytest.mark.parametrize("name, patient", [
    ("CNV-1016042-1.jpeg", "1016042"),
    ("CNV-1016042-66.jpeg", "1016042"),
    ("DRUSEN-1016042-2.jpeg", "1016042"),  # same patient in another class
    ("NORMAL-9053621-14.jpeg", "9053621"),
    ("10_left.jpeg", "10"),
    ("10_right.jpeg", "10"),
    ("4521_left.png", "4521"),
])
def test_default_patterns(name: str, patient: str) -> None:
    assert PatientParser()(Path("/data") / name, fallback="FALLBACK") == patient


@pytest.mark.parametrize("name", ["scan.jpeg", "IMG_0001.jpeg", "10_up.jpeg", "CNV-abc-1.jpeg", "CNV-12.jpeg",
                                  "x-CNV-1016042-1.jpeg"])
def test_no_id_uses_fallback(name: str) -> None:
    assert PatientParser()(Path(name), fallback="own-" + name) == "own-" + name


def test_default_parser_matches_stem_not_folder() -> None:
    assert PatientParser()(Path("/x/CNV-5-1/scan.jpeg"), fallback="fb") == "fb"


def test_user_regex_with_named_group() -> None:
    parser = PatientParser.from_regex(r"^site\d+_(?P<patient>[A-Z]{2}\d{3})_(?P<eye>OD|OS)")
    assert parser(Path("site3_AB123_OD_2020.png"), fallback="fb") == "AB123"
    assert parser(Path("site3_AB123_OS_2021.png"), fallback="fb") == "AB123"
    assert parser(Path("CNV-1016042-1.jpeg"), fallback="fb") == "fb"  # the defaults are replaced, not added


def test_user_regex_without_named_group_uses_first_group() -> None:
    parser = PatientParser.from_regex(r"(\d+)-(\d+)$")  # search, not match: anywhere in the stem
    assert parser(Path("CNV-1016042-1.jpeg"), fallback="fb") == "1016042"
    assert parser(Path("nothing.jpeg"), fallback="fb") == "fb"


def test_from_regex_none_gives_defaults() -> None:
    assert PatientParser.from_regex(None)(Path("DME-77-3.jpeg"), fallback="fb") == "77"
    assert PatientParser.from_regex("")(Path("DME-77-3.jpeg"), fallback="fb") == "77"


@pytest.mark.parametrize("regex", [r"(?P<patient>\d+", r"[unclosed", r"*oops"])
def test_invalid_regex(regex: str) -> None:
    with pytest.raises(RetinaLensError, match="regular expression"):
        PatientParser.from_regex(regex)


def test_regex_without_group() -> None:
    with pytest.raises(RetinaLensError, match="group"):
        PatientParser.from_regex(r"\d+")


def test_invalid_regex_through_discover(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "A" / "a.png", 1)
    make_png(tmp_path / "B" / "b.png", 2)
    with pytest.raises(RetinaLensError):
        discover(tmp_path, patient_regex="(")


def test_discover_groups_patients(tmp_path: Path, make_png) -> None:
    names = {"CNV": ["CNV-111-1.png", "CNV-111-2.png", "CNV-222-1.png"],
             "NORMAL": ["NORMAL-111-3.png", "NORMAL-333-1.png", "scan_a.png", "scan_b.png"]}
    seed = 0
    for cls, files in names.items():
        for f in files:
            seed += 1
            make_png(tmp_path / cls / f, seed)
    ds = discover(tmp_path)
    by = {s.path.name: s.patient for s in ds.samples}
    assert by["CNV-111-1.png"] == by["CNV-111-2.png"] == by["NORMAL-111-3.png"] == "111"
    assert by["CNV-222-1.png"] == "222" and by["NORMAL-333-1.png"] == "333"
    # no id in the name: each image is its own patient, distinct from every parsed id and each other
    assert by["scan_a.png"] != by["scan_b.png"]
    assert {by["scan_a.png"], by["scan_b.png"]}.isdisjoint({"111", "222", "333"})
    assert len(set(by.values())) == 5


def test_discover_with_user_regex(tmp_path: Path, make_png) -> None:
    for i, name in enumerate(["pat7_eyeL.png", "pat7_eyeR.png", "pat8_eyeL.png"]):
        make_png(tmp_path / ("A" if i < 2 else "B") / name, i)
    ds = discover(tmp_path, patient_regex=r"^pat(\d+)_")
    assert sorted(s.patient for s in ds.samples) == ["7", "7", "8"]


def test_same_stem_in_two_folders_without_id_are_different_patients(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "A" / "scan.png", 1)
    make_png(tmp_path / "B" / "scan.png", 2)
    ds = discover(tmp_path)
    assert len({s.patient for s in ds.samples}) == 2


def test_real_oct_patients(oct_root: Path) -> None:
    ds = discover(oct_root)
    patients = {s.patient for s in ds.samples}
    assert all(p.isdigit() for p in patients)
    assert len(patients) < len(ds.samples)  # several B-scans per patient
    # README: train and test are patient-disjoint
    train = {s.patient for s in ds.samples if s.split == "train"}
    test = {s.patient for s in ds.samples if s.split == "test"}
    assert train and test and not (train & test)
