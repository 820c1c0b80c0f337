"""Fixtures of the web app tests: a real server on loopback (uvicorn in a thread) with a real bundle."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

UPLOAD_MB = 1.0  # the test server's cap: every real scan is far below it (the largest is ~0.3 MB)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "load: bounded load test of the web app (runs in the suite, ~10-40 s)")


@pytest.fixture(scope="session")
def serve_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="session")
def live_app(small_bundle, serve_dir: Path):
    """(base URL, app) of one server for the whole session: the bundle is loaded once."""
    from retinalens.serve.app import create_app
    from retinalens.serve.server import running_server
    from retinalens.serve.service import ServeConfig

    cfg = ServeConfig(bundle=small_bundle.path, port=0, db=str(serve_dir / "feedback.db"), max_upload_mb=UPLOAD_MB,
                      log_level="warning")
    app = create_app(cfg)
    with running_server(cfg, app) as url:
        yield url, app


@pytest.fixture(scope="session")
def live_url(live_app) -> str:
    return live_app[0]


@pytest.fixture
def client(live_url: str) -> Iterator:
    import httpx

    with httpx.Client(base_url=live_url, timeout=120) as c:
        yield c


@pytest.fixture
def predict(client) -> Callable:
    """POST /api/predict with (name, bytes, content type) parts; returns the response JSON (asserting 200)."""

    def post(*parts: tuple[str, bytes, str]) -> dict:
        r = client.post("/api/predict", files=[("files", part) for part in parts])
        assert r.status_code == 200, r.text
        return r.json()

    return post
