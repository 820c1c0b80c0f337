"""The API token (required off loopback, enforced when set) and storage that fails under a real server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from helpers import run_cli
from retinalens.errors import RetinaLensError
from retinalens.serve.server import ServerProcess, running_server
from retinalens.serve.service import ServeConfig

TOKEN = "k3Hs9-test-token-of-enough-length"


def test_a_token_is_required_beyond_loopback(small_bundle, tmp_path):
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        with pytest.raises(RetinaLensError, match="set an API token"):
            ServeConfig(bundle=small_bundle.path, host=host)
    with pytest.raises(RetinaLensError, match="at least 16 characters"):
        ServeConfig(bundle=small_bundle.path, token="short")
    ServeConfig(bundle=small_bundle.path, host="0.0.0.0", token=TOKEN)  # with one, any address
    ServeConfig(bundle=small_bundle.path, host="localhost")  # loopback needs none
    r = run_cli("serve", str(small_bundle.path), "--host", "0.0.0.0", "--db", str(tmp_path / "fb.db"), timeout=120)
    assert r.returncode == 2 and "set an API token" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "fb.db").exists()  # refused before anything was made


def test_the_token_is_enforced_when_set(small_bundle, tmp_path, demo_scans):
    cfg = ServeConfig(bundle=small_bundle.path, port=0, db=str(tmp_path / "fb.db"), token=TOKEN, log_level="warning")
    scan = [("files", ("a.jpeg", demo_scans["NORMAL"].read_bytes(), "image/jpeg"))]
    with running_server(cfg) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").status_code == 200  # probes need no token
        for wrong in ({}, {"authorization": "Bearer " + TOKEN[:-1] + "x"}, {"authorization": TOKEN},
                      {"cookie": "retinalens_session=" + TOKEN}):
            refused = c.post("/api/predict", files=scan, headers=wrong)
            assert refused.status_code == 401 and "token" in refused.json()["detail"]
            assert c.get("/api/model", headers=wrong).status_code == 401
        assert not list((tmp_path / "images").iterdir())
        page = c.get("/")  # a browser is sent to the login page
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert 'name="token"' in c.get("/login").text
        assert c.post("/login", data={"token": "wrong" * 4}).status_code == 401
        bearer = {"authorization": f"Bearer {TOKEN}"}
        r = c.post("/api/predict", files=scan, headers=bearer)
        assert r.status_code == 200 and "id" in r.json()["results"][0]
        logged_in = c.post("/login", data={"token": TOKEN})  # the page's way: a cookie, HttpOnly, SameSite
        assert logged_in.status_code == 303
        cookie = logged_in.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and TOKEN not in cookie
        assert c.get("/").status_code == 200 and "not a medical device" in c.get("/").text
        assert c.get(r.json()["results"][0]["heatmap"]).status_code == 200
        fb = c.post("/api/feedback", json={"analysis_id": r.json()["results"][0]["id"], "label": "DME"})
        assert fb.status_code == 200


def _post_scan(c: httpx.Client, data: bytes) -> httpx.Response:
    return c.post("/api/predict", files=[("files", ("a.jpeg", data, "image/jpeg"))])


def test_an_unwritable_images_folder_is_a_clear_503_and_health_says_so(small_bundle, tmp_path, demo_scans):
    images = tmp_path / "images"
    scans = [p.read_bytes() for p in demo_scans.values()]
    with ServerProcess(small_bundle.path, "--db", str(tmp_path / "fb.db"), "--images", str(images)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        first = _post_scan(c, scans[0])
        assert first.status_code == 200
        shutil.rmtree(images)
        images.write_text("a file where the folder was")  # a real failure, also for root (chmod is not one)
        r = _post_scan(c, scans[1])
        assert r.status_code == 503 and "images folder cannot be written" in r.json()["detail"]
        assert str(tmp_path) not in r.text
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "images folder" in health.json()["storage"]
        # what needs no new file still works: the connection, reading, feedback
        aid = first.json()["results"][0]["id"]
        assert c.post("/api/feedback", json={"analysis_id": aid, "label": "CNV"}).status_code == 200
        images.unlink()
        images.mkdir()
        assert c.get("/healthz").json()["status"] == "ok"
        assert _post_scan(c, scans[1]).status_code == 200
    log = "".join(server.log)
    assert "POST /api/predict: feedback storage unavailable: the images folder cannot be written" in log
    assert "Traceback" not in log


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 1 MB tmpfs (root may mount one; where it cannot, the test is skipped)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_clear_507(small_bundle, tmp_path, demo_scans, tiny_filesystem: Path):
    images = tiny_filesystem / "images"
    with ServerProcess(small_bundle.path, "--db", str(tmp_path / "fb.db"), "--images", str(images)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        filler = tiny_filesystem / "filler"
        with filler.open("wb", buffering=0) as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        r = _post_scan(c, demo_scans["DRUSEN"].read_bytes())
        assert r.status_code == 507 and "No space left on device" in r.json()["detail"]
        health = c.get("/healthz")
        assert health.status_code == 503 and "No space left" in health.json()["storage"]
        filler.unlink()
        assert c.get("/healthz").status_code == 200 and _post_scan(c, demo_scans["DRUSEN"].read_bytes()).status_code == 200
    assert "Traceback" not in "".join(server.log)
