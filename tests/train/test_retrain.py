"""Retraining with feedback: real images in a real SQLite feedback store, the parent's splits kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retinalens
from retinalens.cli.main import main
from retinalens.data.hashing import sha256_file
from retinalens.demo import DEMO_DATA
from retinalens.train.retrain import retrain


def _store(path: Path):
    from retinalens.feedback.store import FeedbackStore

    return FeedbackStore(path)


def _confirm(store, model, image: Path, label: str) -> None:
    from retinalens.feedback.store import ModelVersion

    result = model.predict(image)
    aid = store.add_analysis(image.read_bytes(), image.suffix.lstrip("."), result,
                             ModelVersion.of_bundle(model.bundle))
    store.add_feedback(aid, label)


def test_retrain_adds_feedback_to_train_only_and_compares_on_the_parents_splits(tmp_path, small_bundle, small_dataset,
                                                                                 feature_cache):
    model = retinalens.load(small_bundle.path)
    # Real scans the parent never saw (small_dataset holds the first 12 per class of the demo's train).
    new = [(f, c.name) for c in sorted((DEMO_DATA / "train").iterdir()) for f in sorted(c.glob("*.jpeg"))[12:15]]
    held_out = next((small_dataset / "test" / "CNV").glob("*.jpeg"))
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(black)
    # A test scan saved again at JPEG quality 50: another sha256, the same scan.
    reencoded = tmp_path / "reencoded.jpeg"
    Image.open(sorted((small_dataset / "test" / "DME").glob("*.jpeg"))[0]).convert("L").save(reencoded, quality=50)
    db = tmp_path / "fb" / "feedback.db"
    with _store(db) as store:
        for f, label in new:
            _confirm(store, model, f, label)
        _confirm(store, model, held_out, "CNV")
        _confirm(store, model, black, "NORMAL")
        _confirm(store, model, reencoded, "DME")

    report = retrain(small_bundle.path, db, tmp_path / "v2", cache=feature_cache, progress=False)

    reasons = {Path(x["image"]).name: x["reason"] for x in report["feedback"]["left_out"]}
    assert reasons[f"{sha256_file(held_out)}.jpeg"] == "already in the validation or test split"
    assert reasons[f"{sha256_file(black)}.png"].startswith("ungradable")  # the parent's quality gate screens
    near = reasons[f"{sha256_file(reencoded)}.jpeg"]
    assert near.startswith("near-duplicate of ") and near.endswith(")") and "in the validation or test split" in near
    assert report["feedback"]["added"] == len(new)
    target = Path(report["bundle"])
    assert target == (tmp_path / "v2" if report["promoted"] else tmp_path / "v2.rejected")
    val = report["compared"]["val"]
    assert report["promoted"] == (val["candidate"]["accuracy"] >= val["parent"]["accuracy"])

    child = retinalens.load_bundle(target)
    assert child.manifest.to_dict()["lineage"]["version"] == 2
    assert child.manifest.to_dict()["lineage"]["parent"]["manifest_sha256"] == sha256_file(small_bundle.path / "manifest.json")
    before = json.loads((small_bundle.path / "splits.json").read_text())["sha256"]
    after = json.loads((target / "splits.json").read_text())["sha256"]
    assert after["val"] == before["val"] and after["test"] == before["test"]  # compared on the same images
    added = set(after["train"]) - set(before["train"])
    assert added == {sha256_file(f) for f, _ in new} and set(before["train"]) <= set(after["train"])
    for split in ("val", "test"):
        pair = report["compared"][split]
        assert pair["parent"]["n_images"] == pair["candidate"]["n_images"] == len(before[split])
    assert json.loads((target / "retrain_report.json").read_text())["promoted"] == report["promoted"]


def test_retrain_of_the_two_view_default_retrains_each_view_on_the_parents_splits(tmp_path, small_dataset):
    cache = tmp_path / "cache"
    parent = retinalens.train(small_dataset, tmp_path / "v1", head="logreg", cv=0, cache=cache)  # OCT: two views
    assert [m.preprocessing.view for m in parent.members] == ["squash", "band"]
    model = retinalens.load(parent.path)
    new = [(f, c.name) for c in sorted((DEMO_DATA / "train").iterdir()) for f in sorted(c.glob("*.jpeg"))[12:14]]
    db = tmp_path / "fb" / "feedback.db"
    with _store(db) as store:
        for f, label in new:
            _confirm(store, model, f, label)

    stale = tmp_path / "v2.candidate.members"  # an earlier retrain's members, stopped half way
    stale.mkdir()
    (stale / "member0.done.pt").write_bytes(b"from an earlier try")
    report = retrain(parent.path, db, tmp_path / "v2", cache=cache, progress=False)

    assert report["feedback"]["added"] == len(new) and not stale.exists()  # retrain starts afresh (no --resume)
    child = retinalens.load_bundle(report["bundle"])
    assert [m.preprocessing.view for m in child.members] == ["squash", "band"]  # both views again
    assert child.manifest.lineage.version == 2
    assert child.manifest.lineage.parent["manifest_sha256"] == sha256_file(parent.path / "manifest.json")
    before = json.loads((parent.path / "splits.json").read_text())["sha256"]
    after = json.loads((child.path / "splits.json").read_text())["sha256"]
    assert after["val"] == before["val"] and after["test"] == before["test"]
    assert set(after["train"]) - set(before["train"]) == {sha256_file(f) for f, _ in new}
    # Compared as the bundles predict: the members' mean, as the ensemble's own validation score was taken.
    val = report["compared"]["val"]
    assert val["candidate"]["accuracy"] == pytest.approx(child.manifest.validation["accuracy"], abs=1e-9)
    assert val["parent"]["accuracy"] == pytest.approx(parent.manifest.validation["accuracy"], abs=1e-9)
    assert report["promoted"] == (val["candidate"]["accuracy"] >= val["parent"]["accuracy"])


def test_retrain_reads_feedback_from_postgresql(tmp_path, small_bundle, feature_cache, postgres_db, capsys):
    from retinalens.feedback.store import FeedbackStore

    model = retinalens.load(small_bundle.path)
    new = [(sorted(c.glob("*.jpeg"))[15], c.name) for c in sorted((DEMO_DATA / "train").iterdir())]
    with FeedbackStore(postgres_db, tmp_path / "images") as store:  # what `serve --db URL --images DIR` writes
        for f, label in new:
            _confirm(store, model, f, label)
    code = main(["retrain", str(small_bundle.path), "--feedback", postgres_db, "--feedback-images",
                 str(tmp_path / "images"), "--cache", str(feature_cache), "--out", str(tmp_path / "v2"), "-q"])
    said = capsys.readouterr().err.replace("\n", " ")  # the console writes to stderr
    assert code == 0, said
    assert f"{len(new)} feedback image(s) added" in said
    target = tmp_path / "v2" if (tmp_path / "v2").is_dir() else tmp_path / "v2.rejected"
    report = json.loads((target / "retrain_report.json").read_text())
    assert report["feedback"]["added"] == len(new)
    added = set(json.loads((target / "splits.json").read_text())["sha256"]["train"]) - \
        set(json.loads((small_bundle.path / "splits.json").read_text())["sha256"]["train"])
    assert added == {sha256_file(f) for f, _ in new}


def test_retrain_without_confirmed_feedback_is_a_clear_error(tmp_path, small_bundle, capsys):
    db = tmp_path / "empty.db"
    _store(db).close()
    code = main(["retrain", str(small_bundle.path), "--feedback", str(db), "--out", str(tmp_path / "x"), "-q"])
    assert code == 2 and "no image has a confirmed or corrected label" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad", ["not-a-bundle"])
def test_retrain_refuses_a_folder_that_is_not_a_bundle(tmp_path, bad, capsys):
    (tmp_path / bad).mkdir()
    code = main(["retrain", str(tmp_path / bad), "--feedback", str(tmp_path / "f.db"), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a RetinaLens model bundle" in capsys.readouterr().err
