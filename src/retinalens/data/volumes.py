"""OCT volumes: the ordered B-scans (slices) of one acquisition, and where their grouping comes from.

A clinician decides per eye and visit, not per B-scan, so `predict --volumes`, `evaluate --volumes`
and the web app answer per volume. A volume comes from one of three sources, and says which:

- "file": a multi-frame file is one volume, its frames in file order. The formats are listed by
  `frame_formats()` (DICOM Ophthalmic Tomography and multi-page TIFF); it is the one place a
  multi-frame reader is registered.
- "folder": the images of one folder are one acquisition (a device export of one volume per folder).
- "patient": Kermany-layout names (CLASS-PATIENT-N.jpeg) carry a patient id and no acquisition, so
  the B-scans of one patient are grouped, which may mix both eyes and several visits.

Frames are split here and re-encoded losslessly (PNG) so that each one still goes through the one
decoder (data/decode.py), like any other image: the same normalisation, limits and errors.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageSequence

from ..errors import ImageDecodeError, RetinaLensError
from .decode import MAX_PIXELS, decode_frames, is_dicom
from .dicom import read_tags
from .dicom_dataset import identity
from .images import ImageItem
from .patients import PatientParser

GROUPINGS = ("patient", "folder", "series")  # what --group-by accepts; "file" is a multi-frame file's own
MAX_FRAMES = 512  # OCT volumes hold 25-128 B-scans; a file claiming more is refused, not read
_HEADER_BYTES = 132  # enough to sniff every format below (DICOM's "DICM" sits at offset 128)


@dataclass(frozen=True)
class Slice:
    name: str  # what results call it: the file, or "file#frame N" for a frame of a multi-frame file
    item: ImageItem  # what the decoder reads


@dataclass(frozen=True)
class Volume:
    id: str  # the file, the folder or the patient id
    grouping: str  # file | folder | patient
    slices: tuple[Slice, ...]


FrameReader = Callable[[Path], Iterable[Image.Image]]


@dataclass(frozen=True)
class FrameFormat:
    """A multi-frame file format: `sniff` looks at the file's first bytes (content, never the name:
    DICOM files often have none), `count` reads how many frames its header holds (nothing decoded),
    `read` gives its frames in order (an iterator may decode them one at a time)."""

    name: str
    sniff: Callable[[bytes], bool]
    count: Callable[[Path], int]
    read: FrameReader


def frame_formats() -> tuple[FrameFormat, ...]:
    """The multi-frame formats, tried in order."""
    return (FrameFormat("DICOM", is_dicom, dicom_frame_count, dicom_frames),
            FrameFormat("TIFF", lambda head: head[:4] in (b"II*\x00", b"MM\x00*"), tiff_frame_count, tiff_frames))


def dicom_frame_count(source: Path | bytes) -> int:
    """The frame count of a DICOM file's header (a path, or an upload's bytes); 0 where it cannot be read."""
    try:
        return read_tags(source).frames  # the header alone
    except ImageDecodeError:
        return 0  # not readable as DICOM: the decoder says why, with the other inputs


def dicom_frames(path: Path) -> Iterable[Image.Image]:
    """The B-scans of a multi-frame DICOM file (data/dicom.py, through the one decoder's decode_frames,
    which checks the frame count and sizes before decoding any), decoded one at a time. A frame count
    that the pixel data does not hold raises once the frames run out, so a caller collecting them all
    (multi_frame_volume) gets all of them or an error: a part volume is never answered as if whole."""
    return decode_frames(path, keep_grey=True)


def tiff_frame_count(path: Path) -> int:
    try:
        with Image.open(path, formats=["TIFF"]) as img:
            return getattr(img, "n_frames", 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RetinaLensError(f"{path}: unreadable multi-frame file ({exc})") from None


def tiff_frames(path: Path) -> list[Image.Image]:
    """The pages of a TIFF, each within the decoder's pixel limit, at most MAX_FRAMES of them."""
    try:
        with Image.open(path, formats=["TIFF"]) as img:
            n = getattr(img, "n_frames", 1)
            if n > MAX_FRAMES:
                raise RetinaLensError(f"{path}: {n} frames exceeds the {MAX_FRAMES}-frame limit")
            frames = []
            for frame in ImageSequence.Iterator(img):
                if frame.width * frame.height > MAX_PIXELS:
                    raise RetinaLensError(f"{path}: a {frame.width}x{frame.height} frame exceeds the "
                                          f"{MAX_PIXELS:,}-pixel limit")
                frames.append(frame.copy())
            return frames
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RetinaLensError(f"{path}: unreadable multi-frame file ({exc})") from None


def frame_count(path: Path) -> int:
    """How many frames a file's header says it holds: 1 for any file that is not a multi-frame format
    (the decoder judges it), read without decoding a frame."""
    fmt = _multi_frame_format(path)
    return fmt.count(path) if fmt else 1


def multi_frame_volume(path: Path) -> Volume | None:
    """The volume a multi-frame file holds, or None for a file of one frame (an ordinary image). Each
    frame is re-encoded as it is read, so memory is the file, one decoded frame and the frames' PNGs."""
    fmt = _multi_frame_format(path)
    if fmt is None or fmt.count(path) < 2:
        return None
    slices = tuple(Slice(f"{path}#frame {i + 1}", png_bytes(frame)) for i, frame in enumerate(fmt.read(path)))
    return Volume(str(path), "file", slices) if len(slices) >= 2 else None


def _multi_frame_format(path: Path) -> FrameFormat | None:
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None  # a FIFO is never opened (it would wait for a writer): the walk reports it
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
    except OSError:
        return None  # the decoder reports an unreadable file with the rest
    return next((f for f in frame_formats() if f.sniff(head)), None)


def png_bytes(image: Image.Image) -> bytes:
    """A frame as a PNG: lossless, and a format the one decoder reads (16-bit greyscale included)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def natural_key(name: str) -> list[int | str]:
    """CNV-1-2 before CNV-1-10: the B-scan numbers of a name sort as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def check_grouping(group_by: str) -> str:
    if group_by not in GROUPINGS:
        raise RetinaLensError(f"unknown grouping '{group_by}': use one of {', '.join(GROUPINGS)}")
    return group_by


def volume_key(name: str, group_by: str, parser: PatientParser) -> str:
    """The volume a B-scan named `name` belongs to: its folder; its patient (from the name, or a DICOM
    file's PatientID; a name without a patient id is a volume of its own); or, for "series", a DICOM
    file's acquisition (SeriesInstanceUID, pseudonymised: data/dicom_dataset.py) and any other file's
    folder."""
    group_by = check_grouping(group_by)
    if group_by == "series":
        who = identity(Path(name)) if os.path.isfile(name) else None
        return who.series if who is not None and who.series else os.path.dirname(name) or "."
    if group_by == "folder":
        return os.path.dirname(name) or "."
    return parser(Path(name), fallback=name)


def group_slices(slices: Sequence[Slice], group_by: str, parser: PatientParser | None = None) -> list[Volume]:
    """Single-frame B-scans -> volumes by `group_by`, each in natural order of the file names, the
    volumes in order of first appearance."""
    parser = parser or PatientParser()
    groups: dict[str, list[Slice]] = {}
    for s in slices:
        groups.setdefault(volume_key(s.name, group_by, parser), []).append(s)
    return [Volume(key, group_by, tuple(sorted(members, key=lambda s: natural_key(os.path.basename(s.name)))))
            for key, members in groups.items()]
