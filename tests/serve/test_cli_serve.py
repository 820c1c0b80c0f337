"""`retinalens serve` as a real process: its logs hold no image names or metadata; bad options are one line."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from helpers import run_cli
from retinalens.errors import RetinaLensError
from retinalens.serve._deps import require
from retinalens.serve.server import ServerProcess
from retinalens.serve.service import usable_cores

SECRET = "Doe_Jane_19550101_MRN4711"  # what a clinic's file names look like: identifying


def _jpeg_with_metadata(scan: Path) -> bytes:
    img = Image.open(scan)
    exif = Image.Exif()
    exif[0x010E] = f"patient {SECRET}"  # ImageDescription
    exif[0x013B] = SECRET  # Artist
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_logs_hold_no_image_names_or_metadata(small_bundle, tmp_path, demo_scans):
    data = _jpeg_with_metadata(demo_scans["CNV"])
    with ServerProcess(small_bundle.path, "--db", str(tmp_path / "fb.db"), "--log-level", "debug",
                       "--max-upload-mb", "1") as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/api/predict", files=[("files", (f"{SECRET}.jpeg", data, "image/jpeg")),
                                              ("files", (f"{SECRET}.txt", f"notes on {SECRET}".encode(), "text/plain"))])
            assert r.status_code == 200 and r.json()["results"][0]["name"] == f"{SECRET}.jpeg"
            aid = r.json()["results"][0]["id"]
            assert c.post("/api/feedback", json={"analysis_id": aid, "label": "DME"}).status_code == 200
            assert c.get(f"/api/analyses/{aid}/heatmap.png").status_code == 200
            big = c.post("/api/predict", files=[("files", (f"{SECRET}.png", b"\0" * (2 * 2**20), "image/png"))])
            assert big.status_code == 413
        assert server.stop() == 0  # Ctrl-C: a clean shutdown
    log = "".join(server.log)
    assert "POST /api/predict" in log and "413" in log  # the access log is on, at debug level
    # The default thread plan: one model call per core, each on one core (PyTorch and BLAS).
    assert f"model calls: {usable_cores()} at a time, 1 thread(s) each, up to 4 images per call" in log
    assert SECRET not in log
    for f in tmp_path.iterdir():  # nor in the database, nor in any file name
        assert SECRET not in f.name
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes()
    assert all(SECRET not in p.name for p in (tmp_path / "images").iterdir())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("serve", *args, timeout=120)


def test_bad_options_are_one_clear_line(tmp_path, small_bundle):
    for args, needle in (([str(tmp_path / "nothing")], "not a RetinaLens model bundle"),
                         ([str(small_bundle.path), "--max-upload-mb", "0"], "--max-upload-mb"),
                         ([str(small_bundle.path), "--max-batch", "0"], "--max-batch"),
                         ([str(small_bundle.path), "--workers-threads", "-1"], "--workers-threads"),
                         ([str(small_bundle.path), "--db", "postgresql+psycopg://u:pw@127.0.0.1:1/x"], "--images")):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_a_missing_dependency_names_the_extra():
    with pytest.raises(RetinaLensError, match=r"pip install 'retinalens\[serve\]'"):
        require("fastapi_that_is_not_installed")
