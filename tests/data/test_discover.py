"""discover(): class folders, split folders, CSVs (every place an image may sit), and bad layouts.

Layout tests use tiny synthetic PNG/JPEG files (discover never decodes them, only their names and
places matter) so that they run without the shared data; one test runs on the real OCT2017 layout.
"""

from __future__ import annotations

from collections import Counter
import os
from pathlib import Path

import pytest

from retinalens.data.discover import discover, image_entries, list_images
from retinalens.errors import RetinaLensError

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(r) for r in [header] + rows) + "\n")
    return path


# -- folders -----------------------------------------------------------------------------------

def test_class_folders(tmp_path: Path, make_png) -> None:
    expected = {}
    seed = 0
    for cls, n in zip(CLASSES, (3, 2, 1, 4)):
        for k in range(n):
            seed += 1
            p = make_png(tmp_path / cls / f"{cls}-{100 + k}-{k}.png", seed)
            expected[p] = cls
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / "CNV" / "notes.txt").write_text("not an image either")
    ds = discover(tmp_path)
    assert ds.layout == "class-folders"
    assert ds.classes == CLASSES
    assert {s.path: s.label for s in ds.samples} == expected
    assert all(s.split is None for s in ds.samples)
    assert ds.class_counts() == {"CNV": 3, "DME": 2, "DRUSEN": 1, "NORMAL": 4}
    assert not ds.splits


def test_class_folders_ignore_hidden_files_and_folders(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "A" / "a1.png", 1)
    make_png(tmp_path / "B" / "b1.png", 2)
    make_png(tmp_path / "A" / ".hidden.png", 3)
    make_png(tmp_path / ".thumbnails" / "t.png", 4)
    ds = discover(tmp_path)
    assert ds.classes == ["A", "B"]
    assert sorted(s.path.name for s in ds.samples) == ["a1.png", "b1.png"]


def test_numeric_class_names_sort_as_numbers(tmp_path: Path, make_png) -> None:
    for i, grade in enumerate(["0", "2", "10", "1"]):
        make_png(tmp_path / grade / f"img{i}.png", i)
    assert discover(tmp_path).classes == ["0", "1", "2", "10"]


def test_split_folders_keep_train_and_test(tmp_path: Path, make_png) -> None:
    seed = 0
    want = Counter()
    for split, n in (("train", 3), ("test", 1)):
        for cls in CLASSES:
            for k in range(n):
                seed += 1
                make_png(tmp_path / split / cls / f"{cls}-{seed}-{k}.jpeg", seed)
                want[(split, cls)] += 1
    ds = discover(tmp_path)
    assert ds.layout == "split-folders"
    assert ds.splits == {"train", "test"}
    assert ds.classes == CLASSES
    assert Counter((s.split, s.label) for s in ds.samples) == want
    for s in ds.samples:
        assert s.path.parent.parent.name == s.split and s.path.parent.name == s.label
    assert len(ds.subset("test")) == 4 and len(ds.subset("train")) == 12
    with pytest.raises(RetinaLensError, match="val"):
        ds.subset("val")


def test_split_folder_aliases(tmp_path: Path, make_png) -> None:
    for i, (split, cls) in enumerate([("Training", "A"), ("Training", "B"), ("validation", "A"), ("validation", "B")]):
        make_png(tmp_path / split / cls / f"x{i}.png", i)
    ds = discover(tmp_path)
    assert ds.splits == {"train", "val"}


def test_real_oct_layout(oct_root: Path) -> None:
    ds = discover(oct_root)
    assert ds.layout == "split-folders"
    assert ds.classes == CLASSES
    on_disk = Counter((p.parent.parent.name, p.parent.name) for p in oct_root.glob("*/*/*.jpeg"))
    assert Counter((s.split, s.label) for s in ds.samples) == on_disk
    # every name is CLASS-PATIENT-N: the patient is the middle part
    for s in ds.samples[::25]:
        assert s.patient == s.path.stem.split("-")[1]


# -- CSV ---------------------------------------------------------------------------------------

def test_csv_images_next_to_csv(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "a.png", 1)
    make_png(tmp_path / "b.png", 2)
    make_png(tmp_path / "c.png", 3)
    csv = _write_csv(tmp_path / "labels.csv", ["image", "label"], [["a.png", "CNV"], ["b.png", "NORMAL"], ["c.png", "CNV"]])
    ds = discover(csv)
    assert ds.layout == "csv"
    assert ds.classes == ["CNV", "NORMAL"]
    assert {s.path: s.label for s in ds.samples} == {tmp_path / "a.png": "CNV", tmp_path / "b.png": "NORMAL",
                                                   tmp_path / "c.png": "CNV"}
    assert len({s.patient for s in ds.samples}) == 3  # no ids in the names: one patient per image


def test_csv_images_in_images_folder_without_extension_and_level(tmp_path: Path, make_png) -> None:
    # The Kaggle DR layout: trainLabels.csv (image,level) with names without extension, files in images/.
    for i, name in enumerate(["10_left", "10_right", "13_left", "13_right", "15_left"]):
        make_png(tmp_path / "images" / f"{name}.jpeg", i)
    csv = _write_csv(tmp_path / "trainLabels.csv", ["image", "level"],
                     [["10_left", "0"], ["10_right", "2"], ["13_left", "0"], ["13_right", "0"], ["15_left", "4"]])
    ds = discover(csv)
    assert ds.classes == ["0", "2", "4"]
    by_name = {s.path.name: s for s in ds.samples}
    assert set(by_name) == {"10_left.jpeg", "10_right.jpeg", "13_left.jpeg", "13_right.jpeg", "15_left.jpeg"}
    assert all(s.path.parent == tmp_path / "images" for s in ds.samples)
    assert by_name["10_left.jpeg"].patient == by_name["10_right.jpeg"].patient == "10"
    assert by_name["13_left.jpeg"].patient == "13"
    assert by_name["10_right.jpeg"].label == "2"


def test_csv_explicit_images_dir(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "elsewhere" / "p.png", 1)
    make_png(tmp_path / "elsewhere" / "q.png", 2)
    csv = _write_csv(tmp_path / "meta" / "labels.csv", ["image", "label"], [["p.png", "A"], ["q.png", "B"]])
    with pytest.raises(RetinaLensError):
        discover(csv)
    ds = discover(csv, images_dir=tmp_path / "elsewhere")
    assert sorted(s.path for s in ds.samples) == [tmp_path / "elsewhere" / "p.png", tmp_path / "elsewhere" / "q.png"]


def test_csv_patient_and_split_columns(tmp_path: Path, make_png) -> None:
    rows = []
    for i, (label, patient, split) in enumerate([("A", "p1", "train"), ("A", "p1", "train"), ("B", "p2", "test"),
                                                 ("B", "p3", "validation"), ("A", "", "train")]):
        make_png(tmp_path / f"img{i}.png", i)
        rows.append([f"img{i}.png", label, patient, split])
    ds = discover(_write_csv(tmp_path / "labels.csv", ["image", "label", "patient", "split"], rows))
    by_name = {s.path.name: s for s in ds.samples}
    assert by_name["img0.png"].patient == by_name["img1.png"].patient == "p1"
    assert by_name["img2.png"].patient == "p2"
    assert by_name["img4.png"].patient not in {"p1", "p2", "p3", ""}  # empty cell: parsed / own patient
    assert [by_name[f"img{i}.png"].split for i in range(5)] == ["train", "train", "test", "val", "train"]
    assert ds.splits == {"train", "test", "val"}


def test_csv_missing_files_are_named(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "present.png", 1)
    make_png(tmp_path / "also-present.png", 2)
    csv = _write_csv(tmp_path / "labels.csv", ["image", "label"],
                     [["present.png", "A"], ["ghost-1.png", "A"], ["also-present.png", "B"], ["ghost-2.png", "B"]])
    with pytest.raises(RetinaLensError) as info:
        discover(csv)
    msg = str(info.value)
    assert "ghost-1.png" in msg and "ghost-2.png" in msg
    assert "2 image(s)" in msg or " 2 " in msg
    assert "present.png," not in msg


def test_csv_without_image_or_label_column(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "a.png", 1)
    with pytest.raises(RetinaLensError, match="label"):
        discover(_write_csv(tmp_path / "x.csv", ["image", "grade_text"], [["a.png", "A"]]))
    with pytest.raises(RetinaLensError, match="image"):
        discover(_write_csv(tmp_path / "y.csv", ["file", "label"], [["a.png", "A"]]))


def test_csv_with_no_rows(tmp_path: Path) -> None:
    with pytest.raises(RetinaLensError):
        discover(_write_csv(tmp_path / "empty.csv", ["image", "label"], []))


def test_non_csv_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "labels.txt"
    p.write_text("image,label\n")
    with pytest.raises(RetinaLensError):
        discover(p)


# -- bad layouts -------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RetinaLensError, match="no such"):
        discover(tmp_path / "nope")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "CNV").mkdir()  # an empty class folder is not a class
    with pytest.raises(RetinaLensError, match="no images"):
        discover(tmp_path)


def test_images_without_class_folders(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "a.png", 1)
    make_png(tmp_path / "b.png", 2)
    with pytest.raises(RetinaLensError, match="class folders"):
        discover(tmp_path)


def test_single_class(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "CNV" / "a.png", 1)
    make_png(tmp_path / "CNV" / "b.png", 2)
    with pytest.raises(RetinaLensError, match="CNV"):
        discover(tmp_path)


def test_single_class_in_csv(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "a.png", 1)
    make_png(tmp_path / "b.png", 2)
    with pytest.raises(RetinaLensError, match="single class"):
        discover(_write_csv(tmp_path / "l.csv", ["image", "label"], [["a.png", "X"], ["b.png", "X"]]))


# -- list_images (prediction inputs) -----------------------------------------------------------

def test_list_images(tmp_path: Path, make_png) -> None:
    a = make_png(tmp_path / "in" / "z.png", 1)
    b = make_png(tmp_path / "in" / "sub" / "a.png", 2)
    (tmp_path / "in" / "note.txt").write_text("x")
    assert list_images(tmp_path / "in") == sorted([a, b])
    assert list_images(a) == [a]
    (tmp_path / "void").mkdir()
    with pytest.raises(RetinaLensError):
        list_images(tmp_path / "void")
    with pytest.raises(RetinaLensError):
        list_images(tmp_path / "missing")


def _special_entries(folder: Path) -> dict[str, str]:
    """A FIFO, a folder, a dangling link and a link loop, all named like scans -> what each must be called."""
    os.mkfifo(folder / "pipe.jpeg")
    (folder / "folder.jpeg").mkdir()
    (folder / "dangling.png").symlink_to("no-such-scan.png")
    (folder / "loop-a.jpeg").symlink_to("loop-b.jpeg")
    (folder / "loop-b.jpeg").symlink_to("loop-a.jpeg")
    return {"pipe.jpeg": "FIFO", "folder.jpeg": "a folder", "dangling.png": "dangling symbolic link",
            "loop-a.jpeg": "symbolic link loop", "loop-b.jpeg": "symbolic link loop"}


def test_special_entries_are_listed_with_their_reason_never_opened(tmp_path: Path, make_png) -> None:
    image = make_png(tmp_path / "in" / "a.png", 1)
    expected = _special_entries(tmp_path / "in")
    entries = dict(image_entries(tmp_path / "in"))  # a FIFO opened for reading would hang this test
    assert entries.pop(image) is None
    assert {p.name: why for p, why in entries.items()}.keys() == expected.keys()
    for p, why in entries.items():
        assert expected[p.name] in why and "not an image file" in why or "missing" in why, why
    assert list_images(tmp_path / "in") == [image]
    assert image_entries(tmp_path / "in" / "pipe.jpeg")[0][1].startswith("a FIFO")  # named directly, too


def test_special_entries_in_class_folders_are_skipped_with_their_reason(tmp_path: Path, make_png) -> None:
    for k, cls in enumerate(("CNV", "NORMAL")):
        make_png(tmp_path / "train" / cls / f"{cls}-{k}-1.png", k)
        make_png(tmp_path / "test" / cls / f"{cls}-{k + 5}-1.png", k + 5)
    expected = _special_entries(tmp_path / "train" / "CNV")
    ds = discover(tmp_path)
    assert len(ds) == 4 and {Path(d["path"]).name for d in ds.skipped} == expected.keys()
    assert {d["split"] for d in ds.skipped} == {"train"}
    assert ds.subset("test").skipped == [] and len(ds.subset("train").skipped) == len(expected)


def test_split_folder_without_class_folders_is_an_error(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "train" / "CNV" / "a.png", 1)
    make_png(tmp_path / "train" / "NORMAL" / "b.png", 2)
    make_png(tmp_path / "test" / "c.png", 3)  # loose images: not a class layout
    with pytest.raises(RetinaLensError, match="test have no class folders"):
        discover(tmp_path)


def test_csv_rows_must_name_images_and_carry_labels(tmp_path: Path, make_png) -> None:
    make_png(tmp_path / "a.png", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(RetinaLensError, match="not found: notes.txt"):
        discover(_write_csv(tmp_path / "l.csv", ["image", "label"], [["a.png", "X"], ["notes.txt", "Y"]]))
    make_png(tmp_path / "b.png", 2)
    with pytest.raises(RetinaLensError, match="no label"):
        discover(_write_csv(tmp_path / "m.csv", ["image", "label"], [["a.png", "X"], ["b.png", ""]]))
