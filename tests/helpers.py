"""Shared test helpers: the demo's bundled real OCT images make small, fast fixtures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from retinalens.demo import DEMO_DATA

if TYPE_CHECKING:  # imported where used: importing helpers stays cheap for the CLI tests
    from retinalens.bundle.store import Bundle
    from retinalens.features.cache import FeatureCache
    from retinalens.train.pipeline import RunConfig


SRC = Path(__file__).resolve().parents[1] / "src"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI child process: this checkout's package, lines wide enough that a
    message is one line (the tests read them), plus `extra` variables."""
    return dict(os.environ, PYTHONPATH=str(SRC), COLUMNS="200", **extra)


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "retinalens.cli.main", *map(str, args)]


def run_cli(*args: object, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """`retinalens ARGS` as users run it: the real entry point, in its own process."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(**env), timeout=timeout,
                          check=False)


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """A refused command: exit code 2, no traceback, the last line `error: ...` holding every needle."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def small_oct_dataset(dst: Path, per_class_train: int = 12, per_class_test: int = 4) -> Path:
    """Copy a few real OCT scans per class into dst/{train,test}/CLASS/ (real files, original names)."""
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for cdir in sorted((DEMO_DATA / split).iterdir()):
            (dst / split / cdir.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cdir.glob("*.jpeg"))[:n]:
                shutil.copy(f, dst / split / cdir.name / f.name)
    return dst


def small_run_config(data: Path, cache: Path, *, head: str = "conv", epochs: int = 12,
                     seed: int = 0) -> RunConfig:
    """The RunConfig of `train_small_bundle` (tests compare a bundle's saved config.json with it)."""
    from retinalens.models.heads import HeadConfig
    from retinalens.train.pipeline import ExtractConfig, RunConfig
    from retinalens.train.trainer import TrainConfig

    # cv=0: one carved validation split, which these tests inspect (tests/train/test_cv.py: the CV default)
    # resize "squash": one network (the OCT default, auto, would train one per view: tests/export/test_two_view.py)
    return RunConfig(data=str(data), extract=ExtractConfig(cache=str(cache), workers=0, resize="squash"),
                     train=TrainConfig(head=HeadConfig(kind=head), epochs=epochs, seed=seed), cv=0)


def train_small_bundle(data: Path, out: Path, cache: Path, *, head: str = "conv", epochs: int = 12,
                       seed: int = 0) -> Bundle:
    """A real (small) bundle: default backbone, real scans, a few epochs."""
    from retinalens.train.pipeline import train_bundle

    return train_bundle(small_run_config(data, cache, head=head, epochs=epochs, seed=seed), out, progress=False)


# -- feature-cache tests ------------------------------------------------------------------------

N = 12  # images in the feature-cache tests' reference cache: three chunks of four


def extract_into(paths, backbone, cache, **kw):
    """Extract real images into a feature cache with small batches and chunks (tests of the cache)."""
    from retinalens.data.hashing import sha256_files
    from retinalens.features.extract import extract_features

    opts = {"batch_size": 4, "chunk_size": 4, "workers": 0, "progress": False} | kw
    paths = list(paths)
    return extract_features(paths, sha256_files(paths), backbone, cache, **opts)


def chunk_files(folder: Path) -> dict[str, tuple[int, str]]:
    """chunk file name -> (mtime_ns, sha256) for every committed or orphan chunk file."""
    from retinalens.data.hashing import sha256_file

    return {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in folder.iterdir() if p.name.startswith("chunk-")}


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("chunk-*.json"))]


def copy_cache(cache: "FeatureCache", dest: Path) -> Path:
    """A private copy of a cache folder (its leaf, which holds the manifest)."""
    target = dest / cache.dir.name
    shutil.copytree(cache.dir, target)
    return target


# -- full disks and read-only file systems -------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(folder: Path, options: str = "size=64k"):
    """A real small file system at `folder` (a tmpfs: writes past its size fail with ENOSPC as on a
    full disk; "ro,..." makes it read-only). Skips the test where mounting needs a root it lacks."""
    import pytest

    folder.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, check=False)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()}): needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def checkpoint_epoch(path: Path) -> int:
    """The epoch an image-mode checkpoint was written after (0: none yet, or mid-write)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def kill_after_epoch(command: list[str], env: dict[str, str], ckpt: Path, epoch: int, timeout: float = 300) -> int:
    """Run `command`, kill -9 it once its checkpoint `ckpt` holds `epoch` epochs; the epoch it held then."""
    import signal
    import time

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while checkpoint_epoch(ckpt) < epoch and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return checkpoint_epoch(ckpt)
