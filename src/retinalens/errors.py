"""The one exception type that user-facing code raises for bad input.

The CLI turns it into one clear line and a non-zero exit; anything else is a bug and is
reported as such (with the traceback only under --debug).
"""

from __future__ import annotations


class RetinaLensError(Exception):
    """A problem with the user's input (file, folder, option, bundle), never a bug."""


class ImageDecodeError(RetinaLensError):
    """A file that is not a readable image (corrupt, truncated, empty, too large, not an image)."""
