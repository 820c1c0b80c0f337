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

from collections import Counter
from dataclasses import dataclass, field
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
        return Dataset(self.root, self.layout, picked, self.classes)

    def class_counts(self) -> dict[str, int]:
        return dict(Counter(s.label for s in self.samples if s.label is not None))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def _from_class_folders(root: Path, parser: PatientParser, split: str | None, base: Path) -> list[Sample]:
    samples = []
    for cdir in _class_dirs(root):
        for p in _images_in(cdir):
            samples.append(_sample(p, cdir.name, parser, str(p.relative_to(base)), split))
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
            samples = [s for split, d in sorted(split_dirs.items()) for s in _from_class_folders(d, parser, split, root)]
            layout = "split-folders"
        elif _class_dirs(root):
            samples = _from_class_folders(root, parser, None, root)
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
    return Dataset(root, layout, samples, classes)


def _class_sort_key(name: str) -> tuple[int, int | str]:
    # Numeric labels (DR grades 0-4) sort as numbers, names alphabetically.
    return (0, int(name)) if name.isdigit() else (1, name)


def list_images(path: str | Path) -> list[Path]:
    """Images to predict on: one file, or every image below a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        found = _images_in(p)
        if not found:
            raise RetinaLensError(f"{p}: folder contains no images")
        return found
    raise RetinaLensError(f"{p}: no such file or folder")
