"""Labels CSVs (`image,label[,patient][,split]`, Kaggle's `image,level`): reading one and finding the file
each row names.

Discovery (`discover`, for training and evaluation) and fundus preparation (`prepare_fundus`) both read
them. One reader and one resolver keep the two agreeing on which file a row means: two copies had
drifted (only preparation knew `.tiff` and Windows separators, so a CSV it prepared from could fail to
train).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from ..errors import RetinaLensError
from .decode import is_image_file

# Kaggle's CSVs name images without their extension; these are tried after the name itself, in order.
IMPLIED_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff")


def read_rows(csv_path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows (header name -> cell) and the header of a CSV. utf-8-sig: Excel writes a BOM that would
    otherwise stick to the first column's name. Raises RetinaLensError when it cannot be read."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RetinaLensError(f"{csv_path}: cannot read CSV ({exc})") from None


def find_column(fields: Iterable[str | None], names: Iterable[str]) -> str | None:
    """The header's own spelling of the first of `names` it holds (case and surrounding spaces ignored:
    hand-written CSVs say `Image` or ` label`)."""
    by_key = {}
    for f in fields:
        if f:
            by_key.setdefault(f.strip().lower(), f)
    return next((by_key[n] for n in names if n in by_key), None)


def search_folders(csv_path: Path, images_dir: Path | None = None) -> list[Path]:
    """Where a CSV's images are looked for, in order: a folder the user named, images/ beside the CSV
    (Kaggle's layout), the CSV's own folder."""
    return [d for d in (images_dir, csv_path.parent / "images", csv_path.parent) if d is not None]


def image_name(value: str) -> PurePosixPath:
    """A CSV cell as the path it names, with Windows separators read as '/' (a CSV saved on Windows
    names sub\\a.png)."""
    return PurePosixPath(value.strip().replace("\\", "/"))


def resolve_image(name: PurePosixPath, folders: Iterable[Path], *, any_file: bool = False) -> tuple[Path, Path] | None:
    """(the folder, the file) that a row's image name means, or None.

    In each folder in turn: the name itself when it is an image file, else the name plus one of
    IMPLIED_SUFFIXES. With `any_file`, failing that, a file of exactly that name whatever it holds:
    fundus preparation lets the decoder say what is wrong with it (and drops it) instead of calling it
    missing, while discovery keeps such a row missing."""
    if not name.parts:  # an empty cell: never the folder itself, nor a sibling named ".jpeg"
        return None
    folders = list(folders)
    for folder in folders:
        p = folder / name
        if p.is_file() and is_image_file(p):
            return folder, p
        for suffix in IMPLIED_SUFFIXES:
            if (q := p.with_name(p.name + suffix)).is_file():
                return folder, q
    if any_file:
        for folder in folders:
            if (folder / name).is_file():
                return folder, folder / name
    return None
