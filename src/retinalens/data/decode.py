"""The one image decoder: training, evaluation, prediction and serving all call `decode_image`.

Pillow does the work, restricted to an allow-list of formats (`ALLOWED_FORMATS`: no other decoder,
and no external program such as Ghostscript for EPS/PDF, ever sees input). We refuse damaged files
(data/integrity.py: JPEG entropy data checked by libjpeg in strict mode, PNG pixel data checked for
completeness; Pillow itself checks PNG CRCs), apply EXIF orientation, normalise every mode
(greyscale, 16-bit, palette, RGBA, CMYK) to 8-bit RGB in integer arithmetic, reduce images above
`REDUCE_ABOVE` pixels a side, refuse decompression bombs, and turn every failure into
ImageDecodeError so that callers can list the bad file and carry on.

DICOM files (found by their content, the "DICM" at byte 128, never by their name) are read by
data/dicom.py (the `dicom` extra) and finished here like any other image: a single-frame file is an
image (`decode_image`), a multi-frame one (an OCT volume) a sequence of them (`decode_frames`).

Memory per image is bounded by `decoded_bytes_bound(width, height, mode)` plus the file's own bytes:
the full-size raster Pillow decodes into, and at most three rasters of the (reduced) output size.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from collections.abc import Iterator
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError
from .dicom import MAX_FRAMES, is_dicom, is_dicom_file, iter_frames  # noqa: F401 - MAX_FRAMES: decode_frames' limit
from .integrity import check_jpeg, check_png

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]

# The only formats any input is decoded as (the web app's upload sniffing uses the same list).
PILLOW_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")  # those Pillow decodes
ALLOWED_FORMATS = (*PILLOW_FORMATS, "DICOM")  # DICOM: data/dicom.py (pydicom), found by its content
# Pillow's own bomb guard warns at MAX_IMAGE_PIXELS and raises at twice that; we pass an explicit
# limit instead of touching Pillow's global. 50 MP covers a 7000x7000 fundus photograph.
MAX_PIXELS = 50_000_000
# Images with a longer side above this are box-reduced by an integer factor to at most this size
# right after decoding: every model input is far smaller (<= 600 px; fundus preparation decodes at
# twice its output), so nothing is lost, and images up to this size keep their exact pixels.
REDUCE_ABOVE = 4096
# All the frames of one multi-frame file together (an OCT volume: 128 B-scans of 1024x1024 are 134 M).
MAX_VOLUME_PIXELS = 4 * MAX_PIXELS
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_BAND_ROWS = 256  # rows of a 16-bit image mapped to 8 bits at a time
# Set in the info of an image decoded from a JPEG at its own size, upright as stored: its pixels lie on
# the file's 8x8 block grid, which the quality gate's damage statistics read (trust/statistics.py).
JPEG_GRID = "retinalens.jpeg_grid"


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow stores per pixel: 1 for 1/L/P, 2 for 16-bit, 4 for everything else (RGB included)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def reduce_factor(width: int, height: int) -> int:
    return max(1, math.ceil(max(width, height) / REDUCE_ABOVE))


def decoded_bytes_bound(width: int, height: int, mode: str) -> int:
    """Peak bytes `decode_image` needs for a width x height image of Pillow `mode`, beyond the file:
    two full-size rasters (the decoder's output and Pillow's copy, or for 16-bit / 32-bit / float
    greyscale the raster and its copy) and an 8-bit one, then at most three 4-byte rasters of the
    reduced size (reduce, alpha, RGB). A 7071x7071 16-bit PNG: 250 + 150 MB. Servers use it to cap
    the total over a request's images."""
    f, pixels = reduce_factor(width, height), width * height
    return pixels * (2 * _bytes_per_pixel(mode) + 1) + 3 * 4 * math.ceil(width / f) * math.ceil(height / f)


def _read(source: ImageSource) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"{path}: no such file")
        data = path.read_bytes()
    else:
        data = source.read()
    if not data:
        raise ImageDecodeError("empty file")
    return data


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale (some OCT exports) -> 8-bit L, the used range stretched to
    0..255 (clipping would turn most 16-bit scans white), in integer tables or Pillow's point()."""
    lo, hi = img.getextrema()
    if hi <= lo:
        return Image.new("L", img.size, 0)
    if img.mode.startswith("I;16"):
        # A 65536-entry table rounded like np.rint, indexed by the uint16 pixels of one band of rows
        # at a time: no full-size copy beside the 8-bit result (Pillow's own 65536-entry point()
        # needs mode "I", 4 bytes a pixel, first).
        lut = np.clip(np.rint((np.arange(65536, dtype=np.float64) - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)
        out = Image.new("L", img.size)
        for top in range(0, img.height, _BAND_ROWS):
            band = np.asarray(img.crop((0, top, img.width, min(top + _BAND_ROWS, img.height))))
            out.paste(Image.fromarray(lut[band]), (0, top))  # 2-D uint8 -> mode "L"
        return out
    scale = 255.0 / (hi - lo)  # "I" and "F": Pillow truncates, so +0.5 rounds
    return img.point(lambda x: x * scale - lo * scale + 0.5).convert("L")


def _to_rgb(img: Image.Image, keep_grey: bool = False) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, the backbones' input (or 8-bit L for a grey image if keep_grey)."""
    if img.mode in _WIDE_GREY:
        img = _wide_grey_to_l(img)
    factor = reduce_factor(*img.size)
    if factor > 1:
        if img.mode not in ("L", "RGB", "RGBA", "LA"):  # the modes Image.reduce takes
            img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else "RGB")
        img = img.reduce(factor)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the background of both OCT and fundus images.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    if keep_grey and img.mode in ("L", "1"):
        return img.convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img


def _decode_checked(img: Image.Image, data: bytes, draft_size: int | None, concurrent: bool = False) -> Image.Image:
    """`img` (opened, not loaded) decoded in full after the damage checks of its format."""
    if img.format in ("JPEG", "MPO"):  # MPO: a camera's multi-picture JPEG, read as its first image
        drafting = bool(draft_size) and img.format == "JPEG"
        pixels = check_jpeg(data, img.mode, want_pixels=not drafting, concurrent=concurrent)
        if drafting:
            img.draft(img.mode if img.mode in ("L", "RGB") else None, (draft_size, draft_size))
        elif pixels is not None:  # the strict decode's pixels: no second full decode
            decoded = Image.fromarray(pixels)
            decoded.info.update(img.info)  # EXIF / XMP orientation travels with them
            img = decoded
    elif img.format == "PNG":
        check_png(data)
    ImageOps.exif_transpose(img, in_place=True)  # in place: no second full-size raster
    img.load()  # force the full decode here so that truncation errors surface now
    return img


def decode_image(source: ImageSource, *, draft_size: int | None = None, name: str | None = None,
                 keep_grey: bool = False, concurrent: bool = False) -> Image.Image:
    """Decode `source` (path, bytes or binary file) into an 8-bit RGB PIL image.

    `draft_size` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding, as long as
    both sides stay >= draft_size: much faster on large photos, but the pixels differ from a full
    decode, so model inputs never use it (fundus preparation does, at twice its output size).
    `keep_grey` returns greyscale images (most OCT scans) as 8-bit L, so that the resize that
    follows works on one channel instead of three (measured: 4.0 -> 2.3 ms per scan at 299 px).
    `concurrent`: a JPEG's two strict decodes (pixels, end check) run on two threads, for a caller
    with a core idle (a lone image to predict); the pixels and errors are the same.
    Images with a side above REDUCE_ABOVE come back box-reduced to at most that size.
    Peak memory: the file's bytes plus decoded_bytes_bound(width, height, mode).
    Raises ImageDecodeError with a one-line reason for anything that is not a sound image of an
    allowed format ("damaged image (...)" for corrupt or incomplete data).
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    try:
        data = _read(source)
        if is_dicom(data):  # single=True: exactly one frame, or an error (a list: the frame count is checked)
            return list(_dicom_frames(data, keep_grey, single=True))[0]
        img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise ImageDecodeError(f"{label}: {width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit")
        out = _to_rgb(_decode_checked(img, data, draft_size, concurrent), keep_grey)
        if img.format == "JPEG" and out.size == (width, height) and not draft_size:
            out.info[JPEG_GRID] = True
        return out
    except ImageDecodeError as exc:
        raise ImageDecodeError(str(exc) if str(exc).startswith(label) else f"{label}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label}: not an image file (one of {', '.join(ALLOWED_FORMATS)} expected)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{label}: refused, {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated/corrupt data surfaces as these
        raise ImageDecodeError(f"{label}: unreadable image ({exc})") from None


def _dicom_frames(data: bytes, keep_grey: bool, single: bool = False) -> Iterator[Image.Image]:
    """The frames of a DICOM file's bytes finished like any image; `single`: refuse a multi-frame file."""
    frames = iter_frames(data, MAX_PIXELS, max_total_pixels=MAX_VOLUME_PIXELS, single=single)
    for frame in frames:
        yield _to_rgb(frame, keep_grey)


def decode_frames(source: ImageSource, *, name: str | None = None, keep_grey: bool = False) -> Iterator[Image.Image]:
    """Decode every frame of `source` (path, bytes or binary file), in order, as `decode_image` decodes
    one image: 8-bit RGB PIL images (8-bit L for grey ones with `keep_grey`), reduced above REDUCE_ABOVE.

    A multi-frame DICOM file (an Ophthalmic Tomography volume: one frame per B-scan) yields each frame,
    decoded one at a time (memory: the file's bytes plus about one frame); any other image, a single-frame
    DICOM file included, yields its one image. Frame count and sizes are checked before the first frame
    is decoded: at most MAX_FRAMES frames, MAX_PIXELS pixels a frame and MAX_VOLUME_PIXELS in all.
    Raises ImageDecodeError (message starting with `name`, default the path or "image") for a file that
    is not a sound image, including a DICOM file whose pixel data holds more or fewer frames than its
    header says; that one is raised after the frames that could be read were yielded, so a caller that
    must not act on a part volume collects them first (`list(decode_frames(...))`)."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    try:
        data = _read(source)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{label}: {exc}") from None
    if not is_dicom(data):
        yield decode_image(data, name=label, keep_grey=keep_grey)
        return
    try:
        yield from _dicom_frames(data, keep_grey)
    except ImageDecodeError as exc:
        raise type(exc)(f"{label}: {exc}") from None  # the kind kept: a bomb (DicomTooLarge) is told apart


def is_image_file(path: Path) -> bool:
    """An image by its extension, or a DICOM file by its content (DICOMDIR, the index of a DICOM
    medium, holds no image)."""
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return path.name.upper() != "DICOMDIR" and is_dicom_file(path)
