"""DICOM input (pydicom, from the `dicom` extra): the pixels of a file as frames, and its identifying tags.

What clinics export: Ophthalmic Photography (8 and 16 bit), Ophthalmic Tomography (one multi-frame file
per OCT volume), VL Photographic and Secondary Capture images, uncompressed or JPEG, JPEG-LS, JPEG 2000
or RLE compressed (pydicom's own RLE decoder, the pylibjpeg plugins for the rest). Any other kind of
DICOM object, transfer syntax or photometric interpretation is refused with one ImageDecodeError.

Nothing read from a file's tags goes into an error message, a log line or a warning: a clinic's files
carry the patient's name and record number, and a malformed value would otherwise be echoed (pydicom's
value validation quotes the value; it is switched off). Messages name the file (as the caller labels
it), the problem and at most numbers and UIDs of the DICOM standard itself (SOP class, transfer syntax).

This module only reads; `data/decode.py` (the one decoder) turns each frame into the RGB / L image
every model takes, with the same 16-bit stretching and size reduction as any other file.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from .. import _deps
from ..errors import ImageDecodeError

# A DICOM Part 10 file: a 128-byte preamble, then these four bytes.
MAGIC, MAGIC_OFFSET = b"DICM", 128
# OCT volumes hold 25-128 B-scans (dense protocols up to ~260); past this many frames a file is refused
# before anything is decoded (a header claiming 10^9 frames costs nothing to write).
MAX_FRAMES = 1024
# The image kinds we read, by SOP Class UID.
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.5.4": "Ophthalmic Tomography",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
}
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


class DicomTooLarge(ImageDecodeError):
    """A frame size or count past the limits, told by the header alone (a bomb, not a scan)."""


def is_dicom(head: bytes) -> bool:
    """Whether `head` (a file's first 132 bytes or more) is a DICOM Part 10 file."""
    return head[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC


def is_dicom_file(path: Path) -> bool:
    """A file is DICOM by its content, whatever its name (exports often have no extension)."""
    try:
        # Only a regular file is opened: opening a FIFO to read it would wait for a writer forever.
        if not stat.S_ISREG(path.stat().st_mode):
            return False
        with open(path, "rb") as f:
            return is_dicom(f.read(MAGIC_OFFSET + 4))
    except OSError:
        return False


def pydicom() -> ModuleType:
    """pydicom, with its value validation off: its warnings quote tag values (patient names, ids)."""
    # ImageDecodeError when missing: a batch lists the file as unreadable (with the fix) and goes on.
    # A plain import, not _deps.require: decoding threads call this at once, and the import system's
    # own lock makes each wait for a module another is importing (require's output silencing swaps
    # sys.stdout, which threads must not do).
    try:
        import pydicom as module
        import pydicom.pixels  # noqa: F401 - the decoders, imported here once
    except ImportError:
        raise ImageDecodeError(f"reading DICOM files needs the 'pydicom' package, which is not installed: "
                              f"{_deps.install_hint('pydicom')}") from None
    module.config.settings.reading_validation_mode = module.config.IGNORE
    return module


def _read_errors(dcm: ModuleType) -> tuple[type[BaseException], ...]:
    """What pydicom raises on a damaged file (its parser has no single error type; BytesLengthException,
    a value whose length does not fit its VR, derives from Exception alone)."""
    return (dcm.errors.InvalidDicomError, dcm.errors.BytesLengthException, EOFError, ValueError, KeyError, TypeError, AttributeError,
            NotImplementedError, OverflowError, IndexError)


def read_dataset(data: bytes, *, pixels: bool = True):
    """The pydicom Dataset of a DICOM file's bytes (`pixels=False`: stop before the pixel data)."""
    dcm = pydicom()
    try:
        ds = dcm.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
        if pixels:
            ds.get("PixelData")  # a deferred value is read here, so truncation surfaces now
        return ds
    except (OSError, *_read_errors(dcm)) as exc:
        # pydicom's messages can quote element values: only the kind of failure is passed on
        raise ImageDecodeError(f"damaged DICOM file ({type(exc).__name__} while reading its elements)") from None


@dataclass(frozen=True)
class PixelHeader:
    """What the Image Pixel module says the pixel data holds, checked against our limits."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    photometric: str
    transfer_syntax: str


def _int(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ImageDecodeError(f"DICOM element {keyword} is missing or not a number") from None


def pixel_header(ds, max_pixels: int, max_total_pixels: int) -> PixelHeader:
    """The checked header of `ds`: ImageDecodeError for an object we do not read, a syntax no installed
    decoder handles, or a frame size or count past the limits (`max_pixels` a frame, MAX_FRAMES frames,
    `max_total_pixels` in all)."""
    dcm = pydicom()
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in SOP_CLASSES:
        if not sop:
            raise ImageDecodeError("DICOM file without an SOP class (truncated, or not an image)")
        raise ImageDecodeError(f"DICOM object of class {dcm.uid.UID(sop).name!s:.80} is not an image we read "
                               f"(one of: {', '.join(sorted(set(SOP_CLASSES.values())))})")
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM file has no pixel data")
    syntax = dcm.uid.UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""))
    try:
        available = dcm.pixels.get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageDecodeError(f"DICOM transfer syntax {syntax.name!s:.80} is not supported "
                               f"(compressed syntaxes need {_deps.install_hint('pydicom', 'dicom')})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in PHOTOMETRIC:
        raise ImageDecodeError(f"DICOM photometric interpretation {photometric[:20]!r} is not supported "
                               f"(one of {', '.join(PHOTOMETRIC)})")
    head = PixelHeader(_int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "NumberOfFrames", 1) or 1,
                       _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated"), photometric, str(syntax))
    if head.rows < 1 or head.columns < 1 or head.samples not in (1, 3) or head.bits_allocated not in (8, 16):
        raise ImageDecodeError(f"DICOM image of {head.columns}x{head.rows} pixels, {head.samples} samples of "
                               f"{head.bits_allocated} bits is not supported (1 or 3 samples of 8 or 16 bits)")
    if head.rows * head.columns > max_pixels:
        raise DicomTooLarge(f"{head.columns}x{head.rows} pixels exceeds the {max_pixels:,}-pixel limit")
    if not 1 <= head.frames <= MAX_FRAMES:
        raise DicomTooLarge(f"DICOM file claims {head.frames:,} frames (the limit is {MAX_FRAMES:,})")
    if head.frames * head.rows * head.columns > max_total_pixels:
        raise DicomTooLarge(f"{head.frames} frames of {head.columns}x{head.rows} pixels exceed the "
                               f"{max_total_pixels:,}-pixel limit of a volume")
    if not syntax.is_compressed:
        expected = head.rows * head.columns * head.samples * head.bits_allocated // 8 * head.frames
        held = len(ds.PixelData)
        if held < expected:
            raise ImageDecodeError(f"DICOM pixel data ends after {held:,} of the {expected:,} bytes its header's "
                                   f"{head.frames} frame(s) need (truncated, or a wrong frame count)")
        if held > expected + 1:  # +1: the pad byte of an odd length
            raise ImageDecodeError(f"wrong frame count: the pixel data holds more than the header's {head.frames} frame(s)")
    return head


def _to_image(arr: np.ndarray, ds, head: PixelHeader) -> Image.Image:
    """One decoded frame as a PIL image the decoder finishes: L / RGB for 8-bit data kept exactly,
    I;16 or F (stretched to 8 bits by the decoder) where rescaling, windowing or 16 bits are in play."""
    dcm = pydicom()
    if head.samples == 3:  # pydicom has already turned YBR into RGB
        if arr.dtype != np.uint8:
            top = float((1 << _int(ds, "BitsStored", head.bits_allocated)) - 1)
            arr = np.clip(np.rint(arr.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    lut_free = not any(k in ds for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
                                         "WindowCenter", "VOILUTSequence"))
    if arr.dtype == np.uint8 and lut_free:
        return Image.fromarray(255 - arr if head.photometric == "MONOCHROME1" else arr, "L")
    values = dcm.pixels.apply_voi_lut(dcm.pixels.apply_modality_lut(arr, ds), ds)
    values = values.astype(np.float32)
    if head.photometric == "MONOCHROME1":  # the decoder stretches the used range: negating inverts it
        values = -values
    return Image.fromarray(values, "F")


def _checked_header(ds, max_pixels: int, max_total_pixels: int) -> PixelHeader:
    """pixel_header, with pydicom's errors on malformed values (whose text can quote them) made ours."""
    dcm = pydicom()
    try:
        return pixel_header(ds, max_pixels, max_total_pixels)
    except _read_errors(dcm) as exc:
        raise ImageDecodeError(f"damaged DICOM file ({type(exc).__name__} in its image header)") from None


def check_header(data: bytes, max_pixels: int, max_total_pixels: int) -> PixelHeader:
    """The checked pixel header of a DICOM file's bytes, nothing decoded (DicomTooLarge past the limits)."""
    return _checked_header(read_dataset(data), max_pixels, max_total_pixels)


def iter_frames(data: bytes, max_pixels: int, max_total_pixels: int, single: bool = False) -> Iterator[Image.Image]:
    """Every frame of a DICOM file's bytes, decoded one at a time (memory: the file plus one frame),
    as a PIL image of mode L, RGB or F; ImageDecodeError for anything we do not read or that is damaged,
    including pixel data holding fewer or more frames than the header says. The frame count and size
    are checked before anything is decoded. `single`: a multi-frame file is refused (it is a volume)."""
    dcm = pydicom()
    ds = read_dataset(data)
    head = _checked_header(ds, max_pixels, max_total_pixels)
    if single and head.frames > 1:
        raise ImageDecodeError(f"a multi-frame DICOM file ({head.frames} frames): a volume, not one image")
    count = 0
    try:
        for arr in dcm.pixels.iter_pixels(ds):
            count += 1
            if count > head.frames:
                break
            yield _to_image(arr, ds, head)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the decoders' many failure types; their text may quote values
        raise ImageDecodeError(f"damaged DICOM pixel data ({type(exc).__name__} decoding frame {count + 1})") from None
    if count != head.frames:
        raise ImageDecodeError(f"wrong frame count: the header says {head.frames} frame(s), the pixel data holds "
                               f"{'more' if count > head.frames else count}")


@dataclass(frozen=True)
class DicomTags:
    """The tags a dataset is organised by. `patient_id` is PHI: it is pseudonymised before it leaves
    the data layer (data/dicom_dataset.py) and never logged."""

    patient_id: str
    laterality: str  # "R", "L" or "" (ImageLaterality, else Laterality)
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    frames: int


def read_tags(source: Path | bytes, name: str = "upload") -> DicomTags:
    """The organising tags of a DICOM file (a path, or its bytes: an upload, labelled `name` in errors),
    read without its pixel data (from a path, nor the bytes that hold it): `frames` is the header's count,
    no frame decoded."""
    dcm = pydicom()
    label = name if isinstance(source, bytes) else source
    try:
        ds = dcm.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True)
    except OSError:
        raise ImageDecodeError(f"{label}: cannot be read") from None
    except _read_errors(dcm) as exc:
        raise ImageDecodeError(f"{label}: damaged DICOM file ({type(exc).__name__} while reading its elements)") from None
    side = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
    frames = ds.get("NumberOfFrames", 1)
    return DicomTags(str(ds.get("PatientID", "") or "").strip(), side if side in ("R", "L") else "",
                     str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                     str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", "")),
                     int(frames) if str(frames).isdigit() else 1)
