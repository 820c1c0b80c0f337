"""Shared fixtures: the real data set (skipped when absent), a few real OCT images, the default backbone."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
# Session fixtures of the pipeline-level tests (a small trained bundle and its dataset).
pytest_plugins = ["pipeline_fixtures"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder: $RETINALENS_SHARED_DATA, default <repo>/../shared/data. Skips when absent."""
    path = Path(os.environ.get("RETINALENS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).expanduser()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (set RETINALENS_SHARED_DATA to the folder "
                    "that holds oct-kermany/); tests on real images are skipped")
    return path


@pytest.fixture(scope="session")
def oct_root(shared_data: Path) -> Path:
    """The real OCT2017-layout data set (oct-kermany/{train,test}/CLASS/*.jpeg)."""
    root = shared_data / "oct-kermany"
    if not all((root / "train" / c).is_dir() for c in OCT_CLASSES):
        pytest.skip(f"{root} is absent or incomplete (expected train/{{{','.join(OCT_CLASSES)}}}/*.jpeg)")
    return root


def _per_class(oct_root: Path, n: int) -> list[Path]:
    """The first n real OCT scans of each class in the train split (sorted: the same files every run)."""
    picked: list[Path] = []
    for cls in OCT_CLASSES:
        files = sorted((oct_root / "train" / cls).glob("*.jpeg"))
        if len(files) < n:
            pytest.skip(f"{oct_root / 'train' / cls} holds fewer than {n} images")
        picked += files[:n]
    return picked


@pytest.fixture(scope="session")
def oct_images(oct_root: Path) -> list[Path]:
    """Two real OCT B-scans per class from the train split."""
    return _per_class(oct_root, 2)


@pytest.fixture(scope="session")
def oct_pool(oct_root: Path) -> list[Path]:
    """A larger pool of real OCT images (16: four per class) for cache tests."""
    return _per_class(oct_root, 4)


@pytest.fixture(scope="session")
def backbone():
    """The default backbone (EfficientNet-Lite0 with packaged ImageNet weights), built once per session.

    Tests must not mutate it (its preprocessing, weights or compiled graphs)."""
    from retinalens.models.registry import create_backbone

    return create_backbone()


@pytest.fixture
def make_png() -> Callable[..., Path]:
    """Write a small synthetic PNG whose pixels are drawn from `seed` (distinct seeds -> distinct files)."""

    def make(path: Path, seed: int, size: tuple[int, int] = (12, 10), mode: str = "L") -> Path:
        from PIL import Image

        rng = np.random.default_rng(seed)
        w, h = size
        shape = (h, w) if mode == "L" else (h, w, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)  # 2-D -> L, 3-D -> RGB
        return path

    return make


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (skips, saying why, where none can be started)."""
    from pg_server import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_db(postgres_server_url: str) -> str:
    """The URL of a new, empty database on that server: one per test."""
    from pg_server import fresh_database

    return fresh_database(postgres_server_url)
