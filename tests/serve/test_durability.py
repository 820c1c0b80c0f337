"""kill -9 during a burst of analyses and feedback: every acknowledged record is there, whole, in an
SQLite file and in a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import httpx
import pytest
import sqlalchemy as sa

from retinalens.demo import DEMO_DATA
from retinalens.feedback.store import FeedbackStore
from retinalens.serve.server import ServerProcess

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
# A client thread's failed assertion (a 500 before the kill) fails the test, not only warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> tuple[str, list[str]]:
    """(the store's URL or file, the extra `serve` options it needs)."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db"), []
    return request.getfixturevalue("postgres_db"), ["--images", str(tmp_path / "images")]


def test_kill_9_mid_burst_keeps_every_acknowledged_record(small_bundle, tmp_path, database):
    db, options = database
    scans = [p.read_bytes() for p in sorted(DEMO_DATA.rglob("*.jpeg"))]  # distinct files: new image writes
    analyses: dict[str, str] = {}  # acknowledged analysis id -> image sha256
    feedback: dict[int, tuple[str, str]] = {}  # acknowledged feedback id -> (analysis id, label)
    lock, stop = threading.Lock(), threading.Event()
    server = ServerProcess(small_bundle.path, "--db", db, *options, "--log-level", "warning")

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if i % 3 == 1 or not analyses:
                        data = scans[(k * 1000 + i) % len(scans)]
                        r = c.post("/api/predict", files=[("files", ("scan.jpeg", data, "image/jpeg"))])
                        if r.status_code == 200:
                            with lock:
                                analyses[r.json()["results"][0]["id"]] = hashlib.sha256(data).hexdigest()
                    else:
                        with lock:
                            aid = list(analyses)[(k + i) % len(analyses)]
                        label = CLASSES[(k + i) % 4]
                        r = c.post("/api/feedback", json={"analysis_id": aid, "label": label})
                        if r.status_code == 200:
                            with lock:
                                feedback[r.json()["id"]] = (aid, label)
                except httpx.HTTPError:
                    return  # the server is gone
                assert r.status_code == 200, r.text

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(feedback) < 60 and time.monotonic() < deadline and all(t.is_alive() for t in threads):
        time.sleep(0.05)
    server.kill()  # SIGKILL in the middle of the burst: requests are in flight
    stop.set()
    for t in threads:
        t.join(30)
    assert len(feedback) >= 20 and len(analyses) >= 10, (len(feedback), len(analyses))

    if not options:  # SQLite: the file is readable by any SQLite client after the crash
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    engine = sa.create_engine(db if options else f"sqlite:///{db}")
    with engine.connect() as con:
        rows = {fid: (aid, label) for fid, aid, label in con.execute(sa.text("SELECT id, analysis_id, label FROM feedback"))}
        assert all(rows.get(fid) == want for fid, want in feedback.items())  # every acknowledged feedback, as sent
        # no half records: every column that must hold something does, every feedback has its analysis
        assert con.execute(sa.text("SELECT COUNT(*) FROM analyses WHERE image IS NULL OR probabilities IS NULL "
                                   "OR model_sha256 IS NULL OR created_at IS NULL")).scalar_one() == 0
        assert con.execute(sa.text("SELECT COUNT(*) FROM feedback f LEFT JOIN analyses a ON a.id = f.analysis_id "
                                   "WHERE a.id IS NULL OR f.created_at IS NULL")).scalar_one() == 0
    engine.dispose()
    with FeedbackStore(db, tmp_path / "images" if options else None) as store:
        for aid, digest in analyses.items():
            record = store.analysis(aid)
            assert record is not None and record["image_sha256"] == digest
        assert store.verify() == []  # every referenced image exists and matches its hash
        assert {c.record["analysis_id"] for c in store.confirmed()} >= {aid for aid, _ in feedback.values()}
