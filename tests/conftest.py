"""Shared fixtures: the real data set (skipped when absent), a few real OCT images, the default backbone.

Tests that need a few real OCT scans (decode, cache, kill -9, export) take them from the shared data
set when it is there and from the demo's bundled sample of real Kermany scans otherwise, so that a
clone without ../shared still runs them; the header of the test report says which. Tests that need the
whole data set (accuracy floors, counts of its files, fundus photographs) skip with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from retinalens.demo import DEMO_DATA

REPO_ROOT = Path(__file__).resolve().parents[1]
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
# Session fixtures of the pipeline-level tests (a small trained bundle and its dataset).
pytest_plugins = ["pipeline_fixtures"]


def _shared_dir() -> Path:
    """$RETINALENS_SHARED_DATA, default <repo>/../shared/data (CI puts ../shared beside the clone)."""
    return Path(os.environ.get("RETINALENS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).expanduser()


def _shared_absent(path: Path) -> str:
    return f"shared data folder {path} is absent (set RETINALENS_SHARED_DATA to the folder that holds oct-kermany/)"


def _oct_root_missing() -> str | None:
    """Why the shared OCT data set cannot be used, or None when it can."""
    shared = _shared_dir()
    if not shared.is_dir():
        return _shared_absent(shared)
    root = shared / "oct-kermany"
    if not all((root / "train" / c).is_dir() for c in OCT_CLASSES):
        return f"{root} is absent or incomplete (expected train/{{{','.join(OCT_CLASSES)}}}/*.jpeg)"
    return None


def pytest_report_header(config: pytest.Config) -> str:
    why = _oct_root_missing()
    if why is None:
        return f"real OCT scans: the shared data set {_shared_dir() / 'oct-kermany'}"
    return f"real OCT scans: the bundled demo sample {DEMO_DATA} ({why}; tests that need the whole data set skip)"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder: $RETINALENS_SHARED_DATA, default <repo>/../shared/data. Skips when absent."""
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(_shared_absent(path) + "; tests on real images are skipped")
    return path


@pytest.fixture(scope="session")
def oct_root(shared_data: Path) -> Path:
    """The real OCT2017-layout data set (oct-kermany/{train,test}/CLASS/*.jpeg): the whole of it."""
    if why := _oct_root_missing():
        pytest.skip(why)
    return shared_data / "oct-kermany"


@pytest.fixture(scope="session")
def oct_sample_root() -> Path:
    """Real OCT scans in the OCT2017 layout for tests that need only a few: the shared data set when
    present, else the demo's sample (the same kind of scans, stored at half size)."""
    return DEMO_DATA if _oct_root_missing() else _shared_dir() / "oct-kermany"


def _per_class(root: Path, n: int) -> list[Path]:
    """The first n real OCT scans of each class in the train split (sorted: the same files every run)."""
    picked: list[Path] = []
    for cls in OCT_CLASSES:
        files = sorted((root / "train" / cls).glob("*.jpeg"))
        if len(files) < n:
            pytest.skip(f"{root / 'train' / cls} holds fewer than {n} images")
        picked += files[:n]
    return picked


@pytest.fixture(scope="session")
def oct_images(oct_sample_root: Path) -> list[Path]:
    """Two real OCT B-scans per class from the train split."""
    return _per_class(oct_sample_root, 2)


@pytest.fixture(scope="session")
def oct_pool(oct_sample_root: Path) -> list[Path]:
    """A larger pool of real OCT images (16: four per class) for cache tests."""
    return _per_class(oct_sample_root, 4)


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


@pytest.fixture(scope="session")
def demo_scans() -> dict[str, Path]:
    """One real OCT scan per class from the bundled demo test split (used by the web app and feedback tests)."""
    from retinalens.demo import DEMO_DATA

    return {c.name: min(c.glob("*.jpeg")) for c in sorted((DEMO_DATA / "test").iterdir())}
