"""Labels CSVs: training (`discover`) and fundus preparation (`prepare_fundus`) read them with one reader and
find each row's image with one resolver, so that they agree on which file a row means.

Both used to have their own copy: only preparation knew `.tiff` and Windows separators, so a Kaggle-style
CSV (names without extension) over TIFF photographs prepared fine and then could not be trained on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from retinalens.data.discover import discover
from retinalens.data.fundus import prepare_fundus
from retinalens.data.labels_csv import find_column, image_name, resolve_image
from retinalens.errors import RetinaLensError


def _photo(path: Path) -> Path:
    """A bright disc on black, the shape of a fundus photograph (preparation keeps it), saved as `path`."""
    img = Image.new("RGB", (300, 220))
    ImageDraw.Draw(img).ellipse((50, 10, 250, 210), fill=(170, 80, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_tiff_without_extension_and_windows_separators_work_in_both_paths(tmp_path: Path) -> None:
    data = tmp_path / "kaggle"
    _photo(data / "images" / "10_left.tiff")
    _photo(data / "images" / "left" / "13_left.tif")
    _photo(data / "images" / "15_right.tiff")
    labels = data / "labels.csv"
    labels.write_text("image,level\n10_left,0\nleft\\13_left,2\n15_right.tiff,0\n")

    ds = discover(labels)
    assert {s.path.relative_to(data / "images").as_posix(): s.label for s in ds.samples} == {
        "10_left.tiff": "0", "left/13_left.tif": "2", "15_right.tiff": "0"}
    assert ds.classes == ["0", "2"]

    report = prepare_fundus(labels, tmp_path / "prepared", size=64, workers=1, progress=False)
    assert report.dropped == [] and report.kept == 3
    prepared = discover(tmp_path / "prepared" / "labels.csv")  # what preparation wrote trains too
    assert sorted(s.path.relative_to(tmp_path / "prepared" / "images").as_posix() for s in prepared.samples) == [
        "10_left.jpeg", "15_right.jpeg", "left/13_left.jpeg"]


def test_a_row_naming_a_file_that_is_no_image(tmp_path: Path) -> None:
    # discover calls it missing (it lists images by name); preparation lets the decoder say why it drops it
    data = tmp_path / "data"
    _photo(data / "a.png")
    _photo(data / "b.png")
    (data / "notes.txt").write_text("not an image")
    labels = data / "labels.csv"
    labels.write_text("image,level\na.png,0\nb.png,1\nnotes.txt,1\n")
    with pytest.raises(RetinaLensError, match="not found: notes.txt"):
        discover(labels)
    report = prepare_fundus(labels, tmp_path / "out", size=64, workers=1, progress=False)
    assert report.kept == 2
    [(path, reason)] = report.dropped
    assert path == data / "notes.txt" and "not an image file" in reason


def test_resolver_prefers_an_image_and_never_resolves_an_empty_cell(tmp_path: Path) -> None:
    _photo(tmp_path / "images" / "eye.jpeg")
    (tmp_path / "eye").write_text("a stray file without an extension")
    folders = [tmp_path / "images", tmp_path]
    assert resolve_image(image_name("eye"), folders) == (tmp_path / "images", tmp_path / "images" / "eye.jpeg")
    assert resolve_image(image_name("eye"), folders, any_file=True)[1] == tmp_path / "images" / "eye.jpeg"
    assert resolve_image(image_name("notes"), folders, any_file=True) is None
    assert resolve_image(image_name("  "), folders, any_file=True) is None


def test_columns_are_found_whatever_their_case_and_spaces() -> None:
    assert find_column(["Image ", " LEVEL", "patient"], ("label", "level")) == " LEVEL"
    assert find_column(["file", "label"], ("image",)) is None
