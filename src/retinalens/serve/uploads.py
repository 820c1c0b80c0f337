"""What an upload is, judged by its bytes alone, and what of it is kept.

The format comes from the magic bytes (Pillow, restricted to the formats we accept, so that no exotic
decoder ever sees client data), never from the client's file name or content type. The client's name
is only echoed back for display; it never becomes a path and is never logged.

What is stored is the pixels alone, as PNG: EXIF, JPEG comments, PNG text chunks and ICC profiles,
where clinics' software writes patient names and record numbers, never reach the disk. The pixels
are the decoder's output, the very ones the model saw (orientation applied, 16-bit scans stretched),
so a prediction or a heat map made from the stored copy is the one made from the upload.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ..data.decode import MAX_PIXELS, decode_image
from ..errors import ImageDecodeError

# Pillow format -> the extension of the stored file.
ACCEPTED = {"JPEG": "jpeg", "PNG": "png", "TIFF": "tiff", "BMP": "bmp", "WEBP": "webp"}
ACCEPTED_TEXT = "JPEG, PNG, TIFF, BMP or WebP"


class ImageTooLarge(ImageDecodeError):
    """More pixels than any retinal image has: a decompression bomb, refused before it is decoded."""


def sniff_image(data: bytes) -> str:
    """The extension for the upload's real format; ImageDecodeError for anything that is not one we accept."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED)) as img:  # reads the header only
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
