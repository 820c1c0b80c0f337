"""The feedback store on its own: content-addressed images, records, the retrain API, concurrency; on
an SQLite file and, where one can be started, on a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from retinalens.errors import RetinaLensError
from retinalens.feedback.store import (
    FeedbackStore,
    ModelVersion,
    UnknownAnalysis,
    database_url,
)

VERSION = ModelVersion("a" * 64, "2026-01-01T00:00:00+00:00")
CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")


def _result(label: str = "CNV") -> dict:
    probs = {c: (0.7 if c == label else 0.1) for c in CLASSES}
    return {"label": label, "probabilities": probs, "referral": "urgent", "gate": {"ok": True, "reason": None, "scores": {}}}


@pytest.fixture
def scans(demo_scans) -> list[bytes]:
    return [p.read_bytes() for p in demo_scans.values()]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A new, empty database: an SQLite file in a folder still to be made, or one on a PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'fb.db'}"
    return request.getfixturevalue("postgres_db")


def test_images_are_content_addressed_and_atomic(tmp_path, scans):
    store = FeedbackStore(tmp_path / "fb.db")
    assert store.images_dir == tmp_path / "images"
    a = store.add_analysis(scans[0], "jpeg", _result(), VERSION)
    b = store.add_analysis(scans[0], "jpeg", _result(), VERSION)  # the same bytes again: one file
    c = store.add_analysis(scans[1], "jpeg", _result("DME"), VERSION)
    assert len({a, b, c}) == 3
    files = sorted(p.name for p in store.images_dir.iterdir())
    assert files == sorted({f"{hashlib.sha256(s).hexdigest()}.jpeg" for s in scans[:2]})  # no temp files left
    assert (store.images_dir / store.analysis(c)["image"]).read_bytes() == scans[1]
    assert store.verify() == []
    store.close()


def test_feedback_latest_label_wins_and_survives_reopening(tmp_path, scans, db_url):
    url = db_url
    with FeedbackStore(url, tmp_path / "imgs") as store:
        first = store.add_analysis(scans[0], "jpeg", _result("CNV"), VERSION)
        second = store.add_analysis(scans[1], "jpeg", _result("DME"), VERSION)
        store.add_analysis(scans[2], "jpeg", _result("DRUSEN"), VERSION)  # never labelled: not in confirmed()
        assert store.add_feedback(first, "CNV")["confirmed"] is True
        store.add_feedback(second, "NORMAL")
        store.add_feedback(second, "DRUSEN")
        with pytest.raises(RetinaLensError, match="not one of the model's classes"):
            store.add_feedback(first, "cnv")
        with pytest.raises(UnknownAnalysis):
            store.add_feedback("f" * 32, "CNV")
    with FeedbackStore(url, tmp_path / "imgs") as store:  # what was committed is there after reopening
        confirmed = store.confirmed()
        assert [(c.label, c.record["analysis_id"]) for c in confirmed] == [("CNV", first), ("DRUSEN", second)]
        image, _, record = confirmed[1]
        assert image.read_bytes() == scans[1] and image.parent == tmp_path / "imgs"
        assert record["predicted"] == "DME" and record["confirmed"] is False and record["model_sha256"] == VERSION.sha256
        assert record["probabilities"]["DME"] == pytest.approx(0.7) and record["gate"]["ok"] is True
        assert list(record["probabilities"]) == list(CLASSES)  # the class order survives the JSON column
        assert record["analysed_at"].endswith("+00:00") and record["feedback_at"] > record["analysed_at"]
        assert store.counts() == {"analyses": 3, "feedback": 3}


def test_verify_reports_a_missing_or_altered_image(tmp_path, scans):
    with FeedbackStore(tmp_path / "fb.db") as store:
        a = store.add_analysis(scans[0], "jpeg", _result(), VERSION)
        b = store.add_analysis(scans[1], "jpeg", _result(), VERSION)
        store.image_path(store.analysis(a)).unlink()
        store.image_path(store.analysis(b)).write_bytes(b"changed")
        problems = store.verify()
        assert len(problems) == 2 and "missing" in problems[0] + problems[1] and "hash" in problems[0] + problems[1]


def test_concurrent_writers_lose_nothing(tmp_path, scans, db_url):
    with FeedbackStore(db_url, tmp_path / "images") as store:
        ids = [store.add_analysis(s, "jpeg", _result(), VERSION) for s in scans]
        with ThreadPoolExecutor(8) as pool:
            made = list(pool.map(lambda k: store.add_feedback(ids[k % len(ids)], CLASSES[k % 4]), range(80)))
        assert len({m["id"] for m in made}) == 80 and store.counts()["feedback"] == 80
        newest = {m["analysis_id"]: m["label"] for m in sorted(made, key=lambda m: m["id"])}  # last one wins
        assert {c.record["analysis_id"]: c.label for c in store.confirmed()} == newest
    if not db_url.startswith("sqlite"):
        return
    con = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_database_urls_and_clear_errors(tmp_path):
    assert database_url(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert database_url("postgresql+psycopg://u@db.example/feedback") == "postgresql+psycopg://u@db.example/feedback"
    with pytest.raises(RetinaLensError, match="--images"):  # a server database needs a folder for the images
        FeedbackStore("postgresql+psycopg://u:secret@127.0.0.1:1/feedback")
    # A driver that is not installed, or a server that is not there: one clear line, no password in it.
    with pytest.raises(RetinaLensError) as err:
        FeedbackStore("postgresql+psycopg://u:secret@127.0.0.1:1/feedback", tmp_path / "imgs")
    assert "secret" not in str(err.value) and "feedback" in str(err.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(RetinaLensError, match="cannot create"):
        FeedbackStore(tmp_path / "file" / "fb.db")
    not_a_db = tmp_path / "garbage.db"
    not_a_db.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(RetinaLensError, match="cannot open"):
        FeedbackStore(not_a_db)


def test_a_missing_postgresql_driver_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(RetinaLensError, match=r"driver missing .*pip install 'retinalens\[postgres\]'") as err:
        FeedbackStore("postgresql+psycopg://u:secret@127.0.0.1:1/feedback", tmp_path / "imgs")
    assert "secret" not in str(err.value)


def test_in_memory_or_malformed_databases_are_refused():
    with pytest.raises(RetinaLensError, match="in-memory"):
        FeedbackStore("sqlite://")
    with pytest.raises(RetinaLensError, match="not a database URL"):
        FeedbackStore("not a url://x")
