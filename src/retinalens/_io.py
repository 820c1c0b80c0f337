"""Atomic file writes: a temp file in the same folder, fsync, then rename.

Readers (and a rerun after kill -9) see either the old file or the whole new one, never half.
Temp files are named `.NAME.*.tmp`, so a folder can be swept of what a killed writer left; until
then they are invisible to readers, which only ever open the final names.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np

from .errors import RetinaLensError


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise RetinaLensError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RetinaLensError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_creatable(out: Path, folder: Path) -> None:
    """Refuse `--out` before any work when the nearest existing folder at or above `folder` (where the
    output's folders will be made) cannot be written."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RetinaLensError(f"--out {out}: cannot create it ({existing} is not a writable folder)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


def sweep_temp_files(folder: Path, older_than_s: float = 3600.0) -> None:
    """Delete what killed writers left behind. Only old temp files: a young one may belong to a
    live writer (another shard on the same folder) that is about to rename it into place."""
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except FileNotFoundError:
            pass
