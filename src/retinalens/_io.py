"""Atomic file writes: a temp file in the same folder, fsync, then rename; and one clear error for a
write the system refuses.

Readers (and a rerun after kill -9) see either the old file or the whole new one, never half.
Temp files get a short random name, `.rl-XXXXXXXX.tmp`, whatever the target's name: a legal 250-byte
name plus a suffix would overflow the 255-byte limit of a file name. A folder can be swept of what a
killed writer left (`.*.tmp`); until then temp files are invisible to readers, which only ever open
the final names.

A full disk, a quota, a read-only file system or a refused permission is the user's to fix, not a bug:
`write_error` turns it into one RetinaLensError naming the path (the CLI: one line, exit 2).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, IO, Iterator

import numpy as np

from .errors import RetinaLensError

TEMP_PREFIX, TEMP_SUFFIX = ".rl-", ".tmp"
# The errors a write meets when the system, not the program, is at fault, in words a user can act on.
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for this file system or process limit",
    errno.ENAMETOOLONG: "file name too long",
}


def is_environment_error(exc: BaseException) -> bool:
    """A write refused by the system (disk full, quota, read-only, permission), not a bug."""
    return isinstance(exc, OSError) and exc.errno in _REASONS


def write_error(path: Path | str | None, exc: OSError) -> RetinaLensError:
    """One line naming the path and the reason (`cannot write PATH: no space left on the device`).
    A short write reported without an error number (numpy's "N requested and M written") is a full
    disk when the file system has no room left: said so."""
    path = path if path is not None else exc.filename
    reason = _REASONS.get(exc.errno or -1) or exc.strerror or str(exc)
    if exc.errno is None and path is not None and _no_room(Path(path)):
        reason = _REASONS[errno.ENOSPC]
    return RetinaLensError(f"cannot write {path}: {reason}")


def _no_room(path: Path) -> bool:
    folder = next((p for p in path.parents if p.is_dir()), None)
    try:
        return folder is not None and os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Any OSError inside becomes write_error(path, ...); the caller cleans up what it started."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None


def user_cache_dir(name: str) -> Path:
    """Where RetinaLens keeps one kind of rebuildable file (ONNX exports, traced graphs, machine
    probes): `$RETINALENS_CACHE/<name>`, else `~/.cache/retinalens/<name>`."""
    env = os.environ.get("RETINALENS_CACHE")
    return Path(env).expanduser() / name if env else Path.home() / ".cache" / "retinalens" / name


def prune_entries(root: Path, keep: int) -> None:
    """Keep the `keep` most recently used entries (folders of files) of a cache, delete the rest."""
    entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        for f in old.iterdir():
            f.unlink(missing_ok=True)
        old.rmdir()


def temp_file(folder: Path) -> tuple[int, str]:
    """A new private temp file in `folder` with a short name (fd, path)."""
    return tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)


def temp_folder(folder: Path) -> Path:
    """A new private temp folder in `folder` with a short name."""
    return Path(tempfile.mkdtemp(dir=folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path.parent)
    try:
        with writing(path):
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_creatable(out: Path, folder: Path) -> None:
    """Refuse `--out` before any work when the nearest existing folder at or above `folder` (where the
    output's folders will be made) cannot be written."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RetinaLensError(f"--out {out}: cannot create it ({existing} is not a writable folder)")


def canonical_json(obj: Any) -> bytes:
    """The one serialisation of JSON files: sorted keys, two-space indent, no NaN. A bundle's digest is
    the sha256 of its manifest in this form (bundle/store.py), so `sha256sum manifest.json` shows it."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def atomic_write_with(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(handle)` into a temp file beside `path`, renamed into place once it returned: a writer
    that streams (a Parquet file in row groups) is atomic too; an exception inside leaves no file."""
    _atomic_write(path, write)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, canonical_json(obj))


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
