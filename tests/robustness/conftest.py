"""Fixtures of the robustness tests: the generated corpus (once per session) and a web app serving the
session's small bundle on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from retinalens.demo import DEMO_DATA
from robustness.corpus import Spec, build, corpus_specs, source_scans


@pytest.fixture(scope="session")
def corpus_sources(oct_sample_root: Path) -> list[Path]:
    """The demo's scans and, when the shared Kermany set is there, some of its scans too."""
    return source_scans(DEMO_DATA, None if oct_sample_root == DEMO_DATA else oct_sample_root)


@pytest.fixture(scope="session")
def corpus(corpus_sources: list[Path]) -> list[Spec]:
    return corpus_specs(corpus_sources)


@pytest.fixture(scope="session")
def corpus_dir(corpus: list[Spec], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(corpus, tmp_path_factory.mktemp("corpus") / "items")


@pytest.fixture(scope="session")
def corpus_server(small_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real server on loopback; its upload cap holds every corpus file (the largest,
    a BMP of a full-size scan, is ~2.3 MB), so that what is tested is decoding, not the cap."""
    from retinalens.serve.server import running_server
    from retinalens.serve.service import ServeConfig

    folder = tmp_path_factory.mktemp("corpus-serve")
    cfg = ServeConfig(bundle=small_bundle.path, port=0, db=str(folder / "feedback.db"), max_upload_mb=8.0,
                      log_level="warning")
    with running_server(cfg) as url:
        yield url
