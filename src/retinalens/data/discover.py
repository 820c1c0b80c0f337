"""Find labelled images in the layouts users have.

- class folders:        ROOT/CLASS/*.jpeg
- split class folders:  ROOT/{train,val,test}/CLASS/*.jpeg   (OCT2017; the given split is kept)
- a CSV:                image,label[,patient][,split]        (also `level` for DR grades)
- unlabelled:           a folder of images, for prediction

DICOM files (found by content, whatever their names) take their patient, eye, study and series from
their tags, pseudonymised (data/dicom_dataset.py); a labels CSV may name them by file or by
`SOPInstanceUID` (a `sop_instance_uid` column instead of `image`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import RetinaLensError
from .decode import is_image_file
from .dicom_dataset import files_by_instance_uid, identity
from .labels_csv import find_column, image_name, read_rows, resolve_image, search_folders
from .patients import PatientParser

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LABEL_COLUMNS = ("label", "level", "class", "diagnosis")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str | None
    patient: str
    split: str | None = None  # the split the dataset itself assigns, if any
    # From a DICOM file's tags, pseudonymised ("" otherwise): the eye (R / L), visit and acquisition.
    laterality: str = ""
    study: str = ""
    series: str = ""


def _sample(path: Path, label: str | None, parser: PatientParser, fallback: str, split: str | None,
            patient: str = "") -> Sample:
    """A sample whose patient is, in order: the one given (a CSV's column), a DICOM file's PatientID
    (pseudonymised), the one in its name, `fallback`."""
    who = identity(path)
    if who is None:
        return Sample(path, label, patient or parser(path, fallback=fallback), split)
    return Sample(path, label, patient or who.patient or parser(path, fallback=fallback), split,
                  who.laterality, who.study, who.series)


@dataclass
class Dataset:
    root: Path
    layout: str
    samples: list[Sample]
    classes: list[str] = field(default_factory=list)
    # Entries named like images that are no image file (a FIFO, a folder, a dangling or looping link):
    # {path, reason, split}, reported by the commands as skipped instead of vanishing from the walk.
    skipped: list[dict[str, str | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def splits(self) -> set[str]:
        return {s.split for s in self.samples if s.split}

    def subset(self, split: str) -> "Dataset":
        picked = [s for s in self.samples if s.split == split]
        if not picked:
            have = ", ".join(sorted(self.splits)) or "none"
            raise RetinaLensError(f"{self.root}: no '{split}' split (splits present: {have})")
        return replace(self, samples=picked, skipped=[d for d in self.skipped if d["split"] == split])

    def class_counts(self) -> dict[str, int]:
        return dict(Counter(s.label for s in self.samples if s.label is not None))


def entry_problem(path: Path) -> str | None:
    """Why an entry named like an image is not an image file to read, or None for a regular file. Asked
    of the entry itself (stat, never open: opening a FIFO to read it waits for a writer forever)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop, not an image file"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return f"a dangling symbolic link (its target {os.readlink(path)!r} is missing)"
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not an image file"
    kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"{kind}, not an image file"


def _walk(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every image file below `folder`, and every other entry named like one with why it is not read."""
    images, skipped = [], []
    for p in sorted(folder.rglob("*")):
        if is_image_file(p):
            problem = entry_problem(p)
            if problem is None:
                images.append(p)
            else:
                skipped.append((p, problem))
    return images, skipped


def _images_in(folder: Path) -> list[Path]:
    return _walk(folder)[0]


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def _from_class_folders(root: Path, parser: PatientParser, split: str | None, base: Path,
                        skipped: list[dict[str, str | None]]) -> list[Sample]:
    samples = []
    for cdir in _class_dirs(root):
        images, others = _walk(cdir)
        for p in images:
            samples.append(_sample(p, cdir.name, parser, str(p.relative_to(base)), split))
        skipped += [{"path": str(p), "reason": why, "split": split} for p, why in others]
    return samples


def _from_csv(csv_path: Path, parser: PatientParser, images_dir: Path | None) -> list[Sample]:
    rows, fields = read_rows(csv_path)
    if not rows:
        raise RetinaLensError(f"{csv_path}: the CSV has no rows")
    image_col, label_col = find_column(fields, ("image",)), find_column(fields, LABEL_COLUMNS)
    uid_col = None if image_col else find_column(fields, ("sopinstanceuid", "sop_instance_uid"))
    if (image_col or uid_col) is None or label_col is None:
        raise RetinaLensError(f"{csv_path}: expected columns 'image' (or 'SOPInstanceUID') and 'label' (or 'level'), "
                              f"found {', '.join(f for f in fields if f)}")
    patient_col, split_col = find_column(fields, ("patient",)), find_column(fields, ("split",))
    search = search_folders(csv_path, images_dir)
    by_uid = files_by_instance_uid(search[:1] if images_dir else search[1:]) if uid_col else {}
    samples, missing = [], []
    for row in rows:
        name = (row[image_col or uid_col] or "").strip()
        if uid_col:
            path = by_uid.get(name)
        else:  # images only: a row naming notes.txt is missing
            path = (resolve_image(image_name(name), search) or (None, None))[1]
        if path is None:
            missing.append(name)
            continue
        patient = (row.get(patient_col) or "").strip() if patient_col else ""
        split = SPLIT_NAMES.get((row.get(split_col) or "").strip().lower()) if split_col else None
        samples.append(_sample(path, (row[label_col] or "").strip(), parser, name, split, patient))
    if missing and uid_col:  # UIDs identify a patient's images: counted, not echoed
        raise RetinaLensError(f"{csv_path}: {len(missing)} SOPInstanceUID(s) named in the CSV match no DICOM file")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise RetinaLensError(f"{csv_path}: {len(missing)} image(s) named in the CSV were not found: {shown}")
    unlabelled = [s.path.name for s in samples if not s.label]
    if unlabelled:
        raise RetinaLensError(f"{csv_path}: {len(unlabelled)} row(s) have no label, e.g. {unlabelled[0]}")
    return samples


def discover(path: str | Path, *, patient_regex: str | None = None, images_dir: str | Path | None = None) -> Dataset:
    """Find the labelled images under `path` (a folder or a CSV). Raises RetinaLensError on bad layouts."""
    root = Path(path).expanduser()
    parser = PatientParser.from_regex(patient_regex)
    if not root.exists():
        raise RetinaLensError(f"{root}: no such file or folder")
    skipped: list[dict[str, str | None]] = []
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise RetinaLensError(f"{root}: expected a folder of class folders or a labels CSV")
        samples = _from_csv(root, parser, Path(images_dir) if images_dir else None)
        layout = "csv"
    else:
        split_dirs = {SPLIT_NAMES[d.name.lower()]: d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES}
        bare = sorted(d.name for d in split_dirs.values() if not _class_dirs(d))
        if split_dirs and bare and any(_class_dirs(d) for d in split_dirs.values()):
            raise RetinaLensError(f"{root}: split folder(s) {', '.join(bare)} have no class folders "
                                  "(expected ROOT/SPLIT/CLASS/*.jpeg in every split)")
        if split_dirs and not bare:
            samples = [s for split, d in sorted(split_dirs.items())
                       for s in _from_class_folders(d, parser, split, root, skipped)]
            layout = "split-folders"
        elif _class_dirs(root):
            samples = _from_class_folders(root, parser, None, root, skipped)
            layout = "class-folders"
        elif _images_in(root):
            raise RetinaLensError(f"{root}: images but no class folders; expected ROOT/CLASS/*.jpeg or ROOT/train/CLASS/*.jpeg")
        else:
            raise RetinaLensError(f"{root}: no images found (expected ROOT/CLASS/*.jpeg, ROOT/train/CLASS/*.jpeg or a labels CSV)")
    if not samples:
        raise RetinaLensError(f"{root}: no labelled images found")
    classes = sorted({s.label for s in samples if s.label is not None}, key=_class_sort_key)
    if len(classes) < 2:
        raise RetinaLensError(f"{root}: found a single class ({classes[0] if classes else 'none'}); need at least two")
    return Dataset(root, layout, samples, classes, skipped)


def _class_sort_key(name: str) -> tuple[int, int | str]:
    # Numeric labels (DR grades 0-4) sort as numbers, names alphabetically.
    return (0, int(name)) if name.isdigit() else (1, name)


def list_images(path: str | Path) -> list[Path]:
    """Images to predict on: one file, or every image file below a folder."""
    return [p for p, problem in image_entries(path) if problem is None]


def image_entries(path: str | Path) -> list[tuple[Path, str | None]]:
    """Images to predict on: one file, or every image below a folder, each as (path, None); an entry
    named like an image that is none (a FIFO, a folder, a dangling or looping link) as (path, why)."""
    p = Path(path).expanduser()
    if p.is_dir():
        images, skipped = _walk(p)
        if not images and not skipped:
            raise RetinaLensError(f"{p}: folder contains no images")
        return sorted([(i, None) for i in images] + skipped, key=lambda e: e[0])
    if not p.exists() and not p.is_symlink():
        raise RetinaLensError(f"{p}: no such file or folder")
    return [(p, entry_problem(p))]
