"""What an upload is, judged by its bytes alone, and what of it is kept.

The format comes from the magic bytes (Pillow, restricted to the formats we accept, so that no exotic
decoder ever sees client data), never from the client's file name or content type. The client's name
is only echoed back for display; it never becomes a path and is never logged.

What is stored is the pixels alone: EXIF, JPEG comments, PNG text chunks and ICC profiles, where
clinics' software writes patient names and record numbers, never reach the disk. A JPEG keeps its
compressed data bit for bit without its metadata segments; anything else becomes a PNG of the
decoder's output, the very pixels the model saw (orientation applied, 16-bit scans stretched). Either
way a prediction or a heat map made from the stored copy is the one made from the upload. A DICOM
file is stored as a de-identified copy (data/deidentify.py: the pixel data kept, the identifying tags
removed after the DICOM basic de-identification profile).
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ..data.decode import ALLOWED_FORMATS, MAX_PIXELS, MAX_VOLUME_PIXELS, PILLOW_FORMATS, decode_image
from ..data.dicom import DicomTooLarge, check_header, is_dicom
from ..data.integrity import jpeg_segments
from ..errors import ImageDecodeError

# Pillow format -> the extension of the stored file: the decoder's own allow-list.
ACCEPTED = {fmt: "dcm" if fmt == "DICOM" else fmt.lower() for fmt in ALLOWED_FORMATS}
ACCEPTED_TEXT = "JPEG, PNG, TIFF, BMP, WebP or DICOM"


class ImageTooLarge(ImageDecodeError):
    """More pixels than any retinal image has: a decompression bomb, refused before it is decoded."""


def sniff_image(data: bytes) -> str:
    """The extension for the upload's real format; ImageDecodeError for anything that is not one we accept."""
    if not data:
        raise ImageDecodeError("empty file")
    if is_dicom(data):
        try:
            check_header(data, MAX_PIXELS, MAX_VOLUME_PIXELS)  # the header only, no pixel decoded
        except DicomTooLarge as exc:
            raise ImageTooLarge(f"refused: {exc}") from None
        return ACCEPTED["DICOM"]
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as img:  # reads the header only
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError:  # Pillow's own, far higher limit: the header alone says so
        raise ImageTooLarge(f"refused: more than {MAX_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageDecodeError(f"not an image file ({ACCEPTED_TEXT} expected)") from None
    if fmt not in ACCEPTED:
        raise ImageDecodeError(f"{fmt} files are not accepted ({ACCEPTED_TEXT} expected)")
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"refused: {width}x{height} pixels, more than {MAX_PIXELS:,}")
    return ACCEPTED[fmt]


def without_metadata(data: bytes, extension: str) -> tuple[bytes, str]:
    """(the bytes to store, their extension): the upload without any metadata, with the same pixels.

    A JPEG keeps its compressed data bit for bit and loses its APPn and COM segments (EXIF, XMP, ICC,
    comments, vendor blocks) and whatever trails its end: no re-encoding, no cost, no larger file.
    Everything else, and a JPEG whose EXIF rotates it (the decoder turns it upright; without EXIF it
    would not), becomes a PNG of the decoded pixels. A DICOM file becomes its de-identified copy."""
    if extension == ACCEPTED["DICOM"]:
        from ..data.deidentify import deidentify

        return deidentify(data), extension
    if extension == "jpeg":
        with Image.open(io.BytesIO(data)) as img:
            upright = img.getexif().get(0x0112, 1) == 1  # EXIF orientation
        stripped = _strip_jpeg(data) if upright else None
        if stripped:
            return stripped, "jpeg"
    return pixels_png(data), "png"


# APP0 (JFIF) and APP14 (Adobe) say how the decoder turns the components into colours: kept (they hold
# no free text); every other APPn (0xE1-0xEF) and COM (0xFE) goes.
_KEPT_APP = (0xE0, 0xEE)


def _strip_jpeg(data: bytes) -> bytes | None:
    """The JPEG with its metadata segments dropped, up to its EOI; None if its marker structure is not
    what it should be (then the caller re-encodes)."""
    if data[:2] != b"\xff\xd8":
        return None
    out = [data[:2]]
    for marker, start, end in jpeg_segments(data):
        if marker is None or not (0xE0 <= marker <= 0xEF or marker == 0xFE) or marker in _KEPT_APP:
            out.append(data[start:end])
        if marker == 0xD9:  # EOI: anything after it (some software appends data there) is dropped
            return b"".join(out)
    return None


def pixels_png(data: bytes) -> bytes:
    """The upload's decoded pixels as a PNG with no metadata chunk (nothing but the pixels is written).
    keep_grey: a grey scan stays one channel; the model's RGB conversion of it is the same either way."""
    img = decode_image(data, keep_grey=True)
    img.info.clear()  # Pillow's PNG writer would copy an ICC profile (free text inside) from here
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # level 1: fast, ~5% larger than the default
    return buf.getvalue()


def display_name(filename: str | None, index: int) -> str:
    """The client's file name for display only: its last component, bounded, valid UTF-8; never used as a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = name.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate could not be sent back as JSON
    return name[:200] or f"image {index + 1}"
