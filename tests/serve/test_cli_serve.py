"""`retinalens serve` as a real process: its logs and its storage hold no identifiers; bad options are one line."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import httpx
import pytest

from helpers import run_cli
from retinalens.errors import RetinaLensError
from retinalens.serve._deps import require
from retinalens.serve.server import ServerProcess
from retinalens.models.machine import usable_cores

SECRET = "Doe_Jane_19550101_MRN4711"  # what a clinic's file names and image metadata look like: identifying


def _phi_requests(c: httpx.Client, demo_scans, with_metadata) -> str:
    """Requests that carry SECRET everywhere a client can put it; returns the analysis id of the first scan."""
    jpeg, png = with_metadata["jpeg"](demo_scans["CNV"], SECRET), with_metadata["png"](demo_scans["DME"], SECRET)
    assert SECRET.encode() in jpeg and SECRET.encode() in png  # EXIF, COM, tEXt, iTXt
    r = c.post(f"/api/predict?patient={SECRET}", data={"patient": SECRET, "note": f"MRN of {SECRET}"},
               files=[("files", (f"{SECRET}.jpeg", jpeg, "image/jpeg")), ("files", (f"{SECRET}/x.png", png, "image/png")),
                      ("files", (f"{SECRET}.txt", f"notes on {SECRET}".encode(), "text/plain"))])
    assert r.status_code == 200 and r.json()["results"][0]["name"] == f"{SECRET}.jpeg"
    aid = r.json()["results"][0]["id"]
    assert c.post(f"/api/feedback?q={SECRET}", json={"analysis_id": aid, "label": "DME"}).status_code == 200
    assert c.get(f"/api/analyses/{aid}/heatmap.png", params={"who": SECRET}).status_code == 200
    assert c.get(f"/api/analyses/{aid}", params={"who": SECRET}).status_code == 200
    assert c.get(f"/{SECRET}").status_code == 404
    assert c.post("/api/feedback", json={"analysis_id": SECRET, "label": SECRET}).status_code == 422
    big = c.post("/api/predict", files=[("files", (f"{SECRET}.png", b"\0" * (2 * 2**20), "image/png"))])
    assert big.status_code == 413
    return aid


def _files_hold_no_secret(folder: Path) -> None:
    for f in folder.rglob("*"):  # nor in the database, nor in any stored file or its name
        assert SECRET not in f.name
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_logs_and_storage_hold_no_identifiers(small_bundle, tmp_path, demo_scans, with_metadata):
    with ServerProcess(small_bundle.path, "--db", str(tmp_path / "fb.db"), "--log-level", "debug",
                       "--max-upload-mb", "1") as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            aid = _phi_requests(c, demo_scans, with_metadata)
        assert server.stop() == 0  # Ctrl-C: a clean shutdown
    log = "".join(server.log)
    # the access log is on, at debug level: method, route template, status, duration; never a path or a query
    assert "POST /api/predict 200" in log and "POST /api/predict 413" in log
    assert "GET /api/analyses/{analysis_id}/heatmap.png 200" in log and "GET (no route) 404" in log
    assert aid not in log and "?" not in log.split("model calls:")[1]
    # The default thread plan: one model call per core, each on one core (PyTorch and BLAS).
    assert f"model calls: {usable_cores()} at a time, 1 thread(s) each, up to 4 images per call" in log
    assert SECRET not in log
    _files_hold_no_secret(tmp_path)
    assert {p.suffix for p in (tmp_path / "images").iterdir()} == {".jpeg", ".png"}
    assert not (tmp_path / "originals").exists()


def test_keep_originals_keeps_the_upload_verbatim(small_bundle, tmp_path, demo_scans, with_metadata):
    from retinalens.feedback.store import FeedbackStore

    with ServerProcess(small_bundle.path, "--db", str(tmp_path / "fb.db"), "--keep-originals",
                       "--max-upload-mb", "1", "--log-level", "warning") as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            aid = _phi_requests(c, demo_scans, with_metadata)
    assert SECRET not in "".join(server.log)
    with FeedbackStore(tmp_path / "fb.db") as store:
        record = store.analysis(aid)
        original = (store.originals_dir / record["original"]).read_bytes()
        assert original == with_metadata["jpeg"](demo_scans["CNV"], SECRET)  # as sent, metadata and all
        assert hashlib.sha256(original).hexdigest() == record["image_sha256"] and store.verify() == []
    _files_hold_no_secret(tmp_path / "images")


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
