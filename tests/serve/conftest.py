"""Fixtures of the web app tests: a real server on loopback (uvicorn in a thread) with a real bundle;
what an image is once decoded, and images that carry identifiers in their metadata."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

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


def _pixels(data: bytes) -> np.ndarray:
    """What the model sees of an image file (orientation applied, 8-bit RGB)."""
    from retinalens.data.decode import decode_image

    return np.asarray(decode_image(data))


def _jpeg_with_metadata(scan: Path, secret: str) -> bytes:
    """A real scan as a JPEG with `secret` in EXIF (description, artist) and in a JPEG comment (COM)."""
    exif = Image.Exif()
    exif[0x010E] = f"patient {secret}"  # ImageDescription
    exif[0x013B] = secret  # Artist
    buf = io.BytesIO()
    Image.open(scan).save(buf, format="JPEG", exif=exif, quality=95, comment=f"MRN {secret}".encode())
    return buf.getvalue()


def _png_with_metadata(scan: Path, secret: str) -> bytes:
    """A real scan as a PNG with `secret` in tEXt and iTXt chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", secret)
    info.add_itxt("Comment", f"record of {secret}")
    buf = io.BytesIO()
    Image.open(scan).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture(scope="session")
def pixels() -> Callable[[bytes], np.ndarray]:
    return _pixels


@pytest.fixture(scope="session")
def with_metadata() -> dict[str, Callable[[Path, str], bytes]]:
    """Format -> (scan, secret) -> the scan's bytes with `secret` in that format's metadata."""
    return {"jpeg": _jpeg_with_metadata, "png": _png_with_metadata}
