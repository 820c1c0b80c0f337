"""Content hashes: the identity of an image in the feature cache and in the split checks."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], workers: int = 4) -> list[str]:
    """Hash many files; hashlib releases the GIL, so threads overlap the I/O and the hashing."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))
