"""Long file names and full disks through the real commands: outputs for legal 250-byte names, and a
disk that fills up as one line naming the path, exit code 2, with the work already done kept."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import assert_clean_error, run_cli, small_tmpfs
from retinalens.features.cache import MANIFEST as CACHE_MANIFEST


def test_explain_writes_outputs_for_250_byte_names(small_bundle, oct_pool, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, src in enumerate(oct_pool[:10]):  # ten names alike but for their last characters
        name = "scan-" + "a" * 238 + f"{i:02d}.jpeg"
        assert len(name.encode()) == 250
        shutil.copy(src, inputs / name)
    out = tmp_path / "heatmaps"
    r = run_cli("explain", small_bundle.path, inputs, "--out", out)
    assert r.returncode == 0, r.stderr
    pngs = sorted(out.iterdir())
    assert len(pngs) == 10 and all(len(p.name.encode()) <= 255 for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert r.stdout.count(" -> ") == 10


def test_a_full_disk_in_train_is_exit_2_and_the_cache_is_kept(small_dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with small_tmpfs(tmp_path / "disk", "size=2m") as disk:  # room for less than the backbone's weights
        # one network (--resize squash): the whole run's features come before the first write that fails
        r = run_cli("train", small_dataset, "--out", disk / "model", "--head", "logreg", "--resize", "squash", "-q",
                    RETINALENS_CACHE=str(cache))
        assert_clean_error(r, f"cannot write {disk / 'model'}", "no space left on the device")
        assert "internal error" not in r.stderr
        assert list(disk.iterdir()) == []  # no half bundle, no temp folder
    assert "extracted" in r.stderr and len(list(cache.rglob(CACHE_MANIFEST))) == 1
    again = run_cli("train", small_dataset, "--out", tmp_path / "model", "--head", "logreg", "--resize", "squash", "-q",
                    RETINALENS_CACHE=str(cache))
    assert again.returncode == 0, again.stderr
    assert "extracted" not in again.stderr  # every image's features came from the cache the failed run wrote
