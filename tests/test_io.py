"""Atomic writes: short temp names whatever the target's name, and a full disk, a read-only file system
or a quota as one clear error naming the path, with the old file intact and no temp file left."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import small_tmpfs
from retinalens._io import atomic_save_npy, atomic_write_bytes, atomic_write_json, write_error
from retinalens.errors import RetinaLensError


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 64 kB file system: writes past it fail with ENOSPC as on a full disk."""
    with small_tmpfs(tmp_path / "tiny") as folder:
        yield folder


@pytest.fixture
def read_only(tmp_path: Path):
    with small_tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        yield folder


def test_a_250_byte_name_is_written(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 245 + ".json")
    assert len(target.name.encode()) == 250
    atomic_write_json(target, {"ok": True})
    assert target.read_text() == '{\n  "ok": true\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_full_disk_names_the_path_and_keeps_the_old_file(tiny_disk: Path) -> None:
    target = tiny_disk / "results.json"
    atomic_write_bytes(target, b"old results\n")
    with pytest.raises(RetinaLensError) as err:
        atomic_write_bytes(target, os.urandom(1 << 20))
    assert str(err.value) == f"cannot write {target}: no space left on the device"
    assert target.read_bytes() == b"old results\n"
    assert [p.name for p in tiny_disk.iterdir()] == ["results.json"]  # the temp file is gone
    with pytest.raises(RetinaLensError, match="no space left"):
        atomic_save_npy(tiny_disk / "big.npy", np.zeros(1 << 18))


def test_a_read_only_file_system_names_the_path(read_only: Path) -> None:
    with pytest.raises(RetinaLensError) as err:
        atomic_write_json(read_only / "sub" / "m.json", {})
    assert str(err.value) == f"cannot write {read_only / 'sub' / 'm.json'}: the file system is read-only"


@pytest.mark.parametrize("code, words", [(errno.EDQUOT, "disk quota exceeded"), (errno.EACCES, "permission denied"),
                                         (errno.ENOSPC, "no space left on the device")])
def test_a_refused_flush_is_one_clear_error(tmp_path: Path, monkeypatch, code: int, words: str) -> None:
    """Network file systems report a full disk or quota at fsync; no quota can be set up here, so the
    system call is made to fail."""
    target = tmp_path / "out.bin"

    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(RetinaLensError) as err:
        atomic_write_bytes(target, b"data")
    assert str(err.value) == f"cannot write {target}: {words}"
    assert list(tmp_path.iterdir()) == []


def test_write_error_keeps_an_unknown_reason() -> None:
    exc = OSError(errno.EIO, "Input/output error", "/x")
    assert str(write_error(Path("/x"), exc)) == "cannot write /x: Input/output error"
    assert str(write_error(None, OSError(errno.ENOSPC, "No space", "/d/f"))) == "cannot write /d/f: no space left on the device"
