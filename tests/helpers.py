"""Shared test helpers: the demo's bundled real OCT images make small, fast fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from retinalens.demo import DEMO_DATA


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


def small_oct_dataset(dst: Path, per_class_train: int = 12, per_class_test: int = 4) -> Path:
    """Copy a few real OCT scans per class into dst/{train,test}/CLASS/ (real files, original names)."""
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for cdir in sorted((DEMO_DATA / split).iterdir()):
            (dst / split / cdir.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cdir.glob("*.jpeg"))[:n]:
                shutil.copy(f, dst / split / cdir.name / f.name)
    return dst


def train_small_bundle(data: Path, out: Path, cache: Path, *, head: str = "conv", epochs: int = 12, seed: int = 0):
    """A real (small) bundle: default backbone, real scans, a few epochs."""
    from retinalens.models.heads import HeadConfig
    from retinalens.train.pipeline import ExtractConfig, RunConfig, train_bundle
    from retinalens.train.trainer import TrainConfig

    cfg = RunConfig(data=str(data), extract=ExtractConfig(cache=str(cache), workers=0),
                    train=TrainConfig(head=HeadConfig(kind=head), epochs=epochs, seed=seed))
    return train_bundle(cfg, out, progress=False)
