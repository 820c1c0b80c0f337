"""`--cv K` in the image modes (train/image_runs.py): k fine-tunes on real scans, their out-of-fold
probabilities through the inference path, the refit on every training image, and resuming after a
fold finished."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import small_oct_dataset
from retinalens.bundle.store import load_bundle
from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.errors import RetinaLensError
from retinalens.predict.model import Model
from retinalens.train import image_runs
from retinalens.train.pipeline import build_run_config, train_bundle
from retinalens.trust.calibration import calibrated

OPTIONS = {"mode": "finetune", "cv": 3, "epochs": 2, "batch_size": 8, "workers": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_oct_dataset(tmp_path_factory.mktemp("cvimg-data"), per_class_train=6, per_class_test=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cvimg-cache")


@pytest.fixture(scope="module")
def bundle(data: Path, cache: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cvimg") / "model"
    return train_bundle(build_run_config(data, cache=cache, **OPTIONS), out, progress=False)


def test_folds_hold_out_every_training_image_once_by_patient(bundle, data: Path) -> None:
    m = bundle.manifest
    cv = m.training.cv
    folds = json.loads((bundle.path / "splits.json").read_text())["folds"]  # sha256 -> fold
    ds = discover(data)
    train = [s for s in ds.samples if s.split != "test"]
    patient = dict(zip(sha256_files(s.path for s in train), (s.patient for s in train)))
    assert set(folds) == set(patient)  # every training image (train + the carved validation) in one fold
    assert sorted(Counter(folds.values())) == [0, 1, 2] and cv.k == 3
    fold_of: dict[str, set[int]] = {}
    for h, f in folds.items():
        fold_of.setdefault(patient[h], set()).add(f)
    assert all(len(f) == 1 for f in fold_of.values())  # a patient's scans share a fold
    assert sum(f["n_images"] for f in cv.folds) == len(folds)
    # The refit trained exactly the epochs on every training image; the held-out scores are out of fold
    assert cv.refit == {"n_images": len(folds), "epochs": 2} and m.training.epochs_run == 2
    assert m.validation["source"] == "3-fold cross-validation (out of fold)" and m.validation["n_images"] == len(folds)
    assert m.calibration is None or m.calibration.fitted_on.startswith("out-of-fold")
    assert m.referral_threshold is not None


def test_the_network_is_measured_against_the_baseline_on_the_same_folds(bundle) -> None:
    cv = bundle.manifest.training.cv
    mine = cv.candidate()
    assert cv.chosen == "finetune (classic) + linear" and mine["epochs"] == 2 and len(mine["fold_accuracy"]) == 3
    assert mine["accuracy_mean"] == pytest.approx(np.mean(mine["fold_accuracy"]))
    base = cv.candidate("logreg C=0.1")
    assert len(base["fold_accuracy"]) == 3
    assert bundle.manifest.training.baseline["val_acc"] == pytest.approx(base["accuracy_mean"])
    assert bundle.manifest.training.head_selection["recipe"]["name"] == "classic"


def test_held_out_probabilities_come_through_the_inference_path(bundle, data: Path) -> None:
    """`probabilities` (what each fold scores its held-out scans with) is what the bundle predicts."""
    scans = sorted((data / "test").rglob("*.jpeg"))
    member = bundle.members[0]
    mine = image_runs.probabilities(member.backbone, member.head, member.head_config, scans, member.precision)
    model = Model(bundle, runtime="torch")
    pixels = torch.stack([bundle.preprocessing.load(p) for p in scans])
    np.testing.assert_allclose(model.probabilities(pixels), calibrated(mine, bundle.temperature), atol=1e-6)


def test_a_run_interrupted_after_a_fold_resumes_without_training_it_again(data: Path, cache: Path, bundle,
                                                                          tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "model"
    cfg = build_run_config(data, cache=cache, **OPTIONS)
    real, calls = image_runs.probabilities, []

    def stop_in_fold_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C at the end of fold 2
        return real(*args, **kwargs)

    monkeypatch.setattr(image_runs, "probabilities", stop_in_fold_two)
    with pytest.raises(KeyboardInterrupt):
        train_bundle(cfg, out, progress=False)
    done = out.with_name("model.checkpoints") / "fold1.done.pt"
    assert done.is_file() and not (out.with_name("model.checkpoints") / "fold2.done.pt").exists()
    with pytest.raises(RetinaLensError, match="holds the folds of an interrupted run: pass --resume"):
        train_bundle(cfg, out, progress=False)
    monkeypatch.setattr(image_runs, "probabilities", real)
    trained: list[int] = []
    original_train = image_runs._train
    monkeypatch.setattr(image_runs, "_train", lambda *a, **k: trained.append(1) or original_train(*a, **k))
    resumed = train_bundle(build_run_config(data, cache=cache, resume=True, **OPTIONS), out, progress=False)
    assert len(trained) == 3  # folds 2 and 3 and the refit: fold 1's held-out scores were kept
    assert resumed.manifest.training.cv.candidates == bundle.manifest.training.cv.candidates  # as if never stopped
    a = load_bundle(resumed.path).members[0].head.state_dict()
    b = bundle.members[0].head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not out.with_name("model.checkpoints").exists()  # the bundle holds everything now


def test_a_changed_run_does_not_reuse_a_finished_fold(data: Path, cache: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "model"
    monkeypatch.setattr(image_runs, "probabilities", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train_bundle(build_run_config(data, cache=cache, **OPTIONS), out, progress=False)
    folder = out.with_name("model.checkpoints")
    (folder / "fold1").mkdir(exist_ok=True)
    torch.save({"probabilities": torch.zeros(1, 4), "history": [], "fingerprint": "another run"},
               folder / "fold1.done.pt")
    with pytest.raises(RetinaLensError, match="written by a run with other data, splits or options"):
        train_bundle(build_run_config(data, cache=cache, resume=True, **OPTIONS), out, progress=False)
