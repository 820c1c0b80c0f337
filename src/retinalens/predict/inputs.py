"""What `predict` accepts: image files, folders of images, and http(s) URLs (bounded in time and size)."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..data.discover import image_entries
from ..errors import RetinaLensError

URL_TIMEOUT_S = 10.0
URL_MAX_BYTES = 20 * 1024 * 1024


@dataclass
class Input:
    name: str  # what the user gave (path or URL), echoed in results
    item: Path | bytes | None  # what the decoder reads; None when it could not be obtained
    error: str = ""


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def fetch_url(url: str, *, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """Download an image within `timeout` seconds in all (not per read: a server trickling bytes
    cannot hold us), refusing bodies over max_bytes and bodies shorter than they declared."""
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "retinalens"}), timeout=timeout) as r:
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise RetinaLensError(f"{url}: {int(declared):,} bytes exceeds the {max_bytes:,}-byte limit")
            blocks, size = [], 0
            while block := r.read1(65536):
                blocks.append(block)
                size += len(block)
                if size > max_bytes:
                    break
                if time.monotonic() > deadline:
                    raise RetinaLensError(f"{url}: download took longer than {timeout:g} s")
            data = b"".join(blocks)
            if declared and declared.isdigit() and len(data) < int(declared):
                raise RetinaLensError(f"{url}: download cut short ({len(data):,} of {int(declared):,} bytes)")
    except urllib.error.HTTPError as exc:
        raise RetinaLensError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RetinaLensError(f"{url}: download failed ({reason})") from None
    if len(data) > max_bytes:
        raise RetinaLensError(f"{url}: more than the {max_bytes:,}-byte limit")
    return data


def expand_inputs(sources: list[str | Path | bytes]) -> list[Input]:
    """Paths, folders (every image below) and URLs -> one Input per image; problems become errors."""
    out: list[Input] = []
    for i, src in enumerate(sources):
        if isinstance(src, (bytes, bytearray)):
            out.append(Input(f"<bytes #{i}>", bytes(src)))
        elif isinstance(src, str) and is_url(src):
            try:
                out.append(Input(src, fetch_url(src)))
            except RetinaLensError as exc:
                out.append(Input(src, None, str(exc)))
        elif isinstance(src, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", src):
            out.append(Input(src, None, f"{src}: only http:// and https:// URLs are supported"))
        else:
            try:
                out += [Input(str(p), p) if problem is None else Input(str(p), None, f"{p}: {problem}")
                        for p, problem in image_entries(src)]
            except RetinaLensError as exc:
                out.append(Input(str(src), None, str(exc)))
    return out
