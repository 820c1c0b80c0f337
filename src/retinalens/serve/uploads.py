"""What an upload is, judged by its bytes alone.

The format comes from the magic bytes (Pillow, restricted to the formats we accept, so that no exotic
decoder ever sees client data), never from the client's file name or content type. The client's name
is only echoed back for display; it never becomes a path and is never logged.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ..data.decode import ALLOWED_FORMATS
from ..errors import ImageDecodeError

# Pillow format -> the extension of the stored file: the decoder's own allow-list.
ACCEPTED = {fmt: fmt.lower() for fmt in ALLOWED_FORMATS}
ACCEPTED_TEXT = "JPEG, PNG, TIFF, BMP or WebP"


def sniff_image(data: bytes) -> str:
    """The extension for the upload's real format; ImageDecodeError for anything that is not one we accept."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data), formats=list(ACCEPTED)) as img:  # reads the header only
            fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageDecodeError(f"not an image file ({ACCEPTED_TEXT} expected)") from None
    if fmt not in ACCEPTED:
        raise ImageDecodeError(f"{fmt} files are not accepted ({ACCEPTED_TEXT} expected)")
    return ACCEPTED[fmt]


def display_name(filename: str | None, index: int) -> str:
    """The client's file name for display only: its last component, bounded; never used as a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:200] or f"image {index + 1}"
