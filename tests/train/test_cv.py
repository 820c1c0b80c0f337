"""Cross-validated selection (train/cv.py): folds on real Kermany names, the refit, the out-of-fold
calibration rule, a default (cross-validated) bundle's manifest, and evaluate on its own test split."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from retinalens.bundle.manifest import CrossValidation, Manifest
from retinalens.bundle.store import load_bundle
from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.errors import RetinaLensError
from retinalens.evaluate.run import evaluate_bundle
from retinalens.train.cv import Candidate, cross_validate, make_folds, refit, select
from retinalens.train.pipeline import build_run_config, train_bundle
from retinalens.train.trainer import TrainConfig, fit_logistic
from retinalens.models.heads import HeadConfig
from retinalens.trust.calibration import calibrated, fit_calibration, nll

from retinalens.features.extract import extract_features, open_cache
from retinalens.models.registry import resolve_precision


def test_folds_are_patient_disjoint_and_stratified(oct_sample_root):
    ds = discover(oct_sample_root / "train")  # real Kermany names: CLASS-PATIENT-N.jpeg
    labels, patients = [s.label for s in ds.samples], [s.patient for s in ds.samples]
    folds = make_folds(labels, patients, 5, seed=0)
    assert sorted(Counter(folds.fold.tolist())) == [0, 1, 2, 3, 4]  # every image in exactly one fold
    fold_of_patient: dict[str, set[int]] = {}
    for p, f in zip(patients, folds.fold):
        fold_of_patient.setdefault(p, set()).add(int(f))
    assert all(len(fs) == 1 for fs in fold_of_patient.values())  # no patient in two folds
    overall = Counter(labels)
    for f in range(5):
        fit, held = folds.split(f)
        assert len(fit) + len(held) == len(labels) and not set(fit) & set(held)
        share = Counter(labels[i] for i in held)
        for c, n in overall.items():  # each class's share of a fold within 8 points of its share overall
            assert abs(share[c] / len(held) - n / len(labels)) < 0.08, (f, c)
    record = folds.record(labels, patients)
    assert sum(r["n_images"] for r in record["folds"]) == len(labels)
    assert sum(r["n_patients"] for r in record["folds"]) == len(set(patients))
    assert make_folds(labels, patients, 5, seed=0).record(labels, patients)["digest"] == record["digest"]
    assert make_folds(labels, patients, 5, seed=1).record(labels, patients)["digest"] != record["digest"]
    with pytest.raises(RetinaLensError, match="at least 5 patients"):
        make_folds(labels[:3], patients[:3], 5)


@pytest.fixture(scope="module")
def real_features(oct_sample_root, backbone, tmp_path_factory):
    """Pooled features of 60 real training scans, evenly spaced (so every class and many patients)."""
    ds = discover(oct_sample_root / "train")
    samples = ds.samples[:: max(1, len(ds.samples) // 60)]
    paths, hashes = [s.path for s in samples], sha256_files(s.path for s in samples)
    cache = open_cache(tmp_path_factory.mktemp("cv-cache"), backbone, resolve_precision("auto"), spatial=False)
    extract_features(paths, hashes, backbone, cache, precision=resolve_precision("auto"), progress=False)
    x = cache.pooled(hashes)
    y = np.array([ds.classes.index(s.label) for s in samples])
    return x, y, [s.label for s in samples], [s.patient for s in samples]


def test_refit_uses_every_training_image_once(real_features):
    x, y, labels, patients = real_features
    folds = make_folds(labels, patients, 4)
    shape = (x.shape[1], 1, 1)
    results = [cross_validate(Candidate(HeadConfig(kind="logreg", dropout=0.0), c), lambda kind: x, y, folds,
                              num_classes=4, feature_shape=shape, train=TrainConfig()) for c in (0.01, 1.0)]
    chosen = select(results, y)
    assert chosen.oof.shape == (len(y), 4) and np.allclose(chosen.oof.sum(1), 1)  # every image predicted out of fold
    final = refit(chosen, lambda kind: x, y, num_classes=4, feature_shape=shape, train=TrainConfig())
    whole, _ = fit_logistic(x, y, chosen.candidate.c, num_classes=4, feature_shape=shape)
    for a, b in zip(final.head.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)  # the refit is the fit on all the images, each once ...
    minus_one, _ = fit_logistic(x[1:], y[1:], chosen.candidate.c, num_classes=4, feature_shape=shape)
    assert not torch.equal(final.head.net[-1].weight, minus_one.net[-1].weight)  # ... not on all but one
    doubled, _ = fit_logistic(np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]]), chosen.candidate.c,
                              num_classes=4, feature_shape=shape)
    assert not torch.equal(final.head.net[-1].weight, doubled.net[-1].weight)  # ... nor one of them twice


def test_trained_head_epochs_are_chosen_on_the_folds(real_features):
    x, y, labels, patients = real_features
    folds = make_folds(labels, patients, 3)
    cfg = TrainConfig(epochs=6, batch_size=32)
    r = cross_validate(Candidate(HeadConfig(kind="linear", dropout=0.0)), lambda kind: x, y, folds, num_classes=4,
                       feature_shape=(x.shape[1], 1, 1), train=cfg)
    losses = [row["val_loss"] for row in r.curve]
    assert len(losses) == 6 and r.epochs == int(np.argmin(losses)) + 1  # the mean held-out loss decides
    final = refit(r, lambda kind: x, y, num_classes=4, feature_shape=(x.shape[1], 1, 1), train=cfg)
    assert len(final.history) == r.epochs  # exactly the chosen epoch count, on every image


def test_temperature_is_dropped_when_it_does_not_lower_out_of_fold_nll():
    rng = np.random.default_rng(0)
    n, k = 400, 4
    logits = rng.normal(size=(n, k)) * 2
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in true_p])
    folds = np.arange(n) % 2
    # Over-confident everywhere (T = 3 undoes it): kept, and the cross-fitted NLL is lower.
    over = calibrated(true_p, 1 / 3)
    kept = fit_calibration(over, y, folds)
    assert kept["kept"] and 2 < kept["temperature"] < 4 and kept["nll_after"] < kept["nll_before"]
    assert sum(kept["bin_counts_before"]) == n and len(kept["bin_counts_after"]) == kept["ece_bins"]
    # Over-confident in one fold, under-confident in the other: the T fitted on one fold makes the
    # other worse, so out of fold it raises the NLL and is dropped (T = 1, probabilities unchanged).
    mixed = np.where((folds == 0)[:, None], calibrated(true_p, 1 / 3), calibrated(true_p, 3))
    dropped = fit_calibration(mixed, y, folds)
    assert not dropped["kept"] and dropped["temperature"] == 1.0
    assert dropped["nll_after"] == pytest.approx(nll(mixed, y)) == pytest.approx(dropped["nll_before"])
    # On one validation split (no folds) the same probabilities would keep an in-sample T.
    assert fit_calibration(mixed, y)["temperature"] != 1.0


@pytest.fixture(scope="module")
def cv_bundle(tmp_path_factory, small_dataset, feature_cache):
    """A default bundle (cross-validated, --head auto) trained on a plain class-folder tree, so that
    it carves its own test split."""
    data = tmp_path_factory.mktemp("plain") / "scans"
    shutil.copytree(small_dataset / "train", data)
    cfg = build_run_config(data, cache=feature_cache, epochs=8)
    assert cfg.cv is None  # the default: auto
    return train_bundle(cfg, tmp_path_factory.mktemp("cvb") / "model", progress=False), data


def test_default_bundle_records_its_cross_validation(cv_bundle):
    bundle, _ = cv_bundle
    m = bundle.manifest
    cv = m.training.cv
    assert isinstance(cv, CrossValidation) and cv.k == 5 and m.format == 2
    n_train = m.training.splits["train"]["n_images"]
    assert m.training.splits["val"]["n_images"] == 0  # no validation split: every training image is in a fold
    assert sum(f["n_images"] for f in cv.folds) == n_train == cv.refit["n_images"]
    names = [c["name"] for c in cv.candidates]
    assert names == ["conv", "logreg C=0.01", "logreg C=0.1", "logreg C=1"] and cv.chosen in names
    best = max(cv.candidates, key=lambda c: c["accuracy_mean"])
    assert cv.candidate()["accuracy_mean"] == best["accuracy_mean"]  # never below the baseline (C=0.1) on CV
    assert m.training.baseline["val_acc"] == cv.candidate("logreg C=0.1")["accuracy_mean"]
    for c in cv.candidates:
        assert c["accuracy_mean"] == pytest.approx(np.mean(c["fold_accuracy"]))
        assert c["accuracy_sd"] == pytest.approx(np.std(c["fold_accuracy"], ddof=1))
    assert m.head.kind == ("conv" if cv.chosen == "conv" else "logreg")
    assert "out-of-fold" in m.calibration.fitted_on and "nll_before" in m.calibration.details
    assert m.validation["n_images"] == n_train and "cross-validation" in m.validation["source"]
    splits = json.loads((bundle.path / "splits.json").read_text())
    assert sorted(splits["folds"]) == sorted(splits["sha256"]["train"])  # each training image: one fold
    assert Counter(splits["folds"].values()) == Counter({i: f["n_images"] for i, f in enumerate(cv.folds)})
    # The typed manifest round-trips, the CV record included; a choice outside the candidates is refused.
    again = Manifest.from_dict(m.to_dict())
    assert again.training.cv == cv
    bad = m.to_dict()
    bad["training"]["cv"]["chosen"] = "dense"
    with pytest.raises(RetinaLensError, match="not among its candidates"):
        Manifest.from_dict(bad)
    old = m.to_dict() | {"format": 1}
    del old["training"]["cv"]
    assert Manifest.from_dict(old).training.cv is None  # a format-1 manifest reads as before


def test_evaluate_on_the_training_data_scores_the_bundles_own_test_split(cv_bundle, feature_cache):
    bundle, data = cv_bundle
    test = json.loads((bundle.path / "splits.json").read_text())["sha256"]["test"]
    m = evaluate_bundle(load_bundle(bundle.path), data, cache=feature_cache, n_boot=0, progress=False)
    assert m["n_images"] == len(test) > 0 and m["overlap_with_training"] == 0
    assert m["data"]["scored"]["rule"].startswith("the bundle's own test split")
    assert m["data"]["scored"]["excluded_training"] == m["data"]["scored"]["n_in_data"] - len(test)
    everything = evaluate_bundle(bundle, data, cache=feature_cache, n_boot=0, progress=False, include_training=True)
    assert everything["n_images"] == m["data"]["scored"]["n_in_data"] and everything["overlap_with_training"] > 0


def test_cv_needs_zero_or_two_folds_or_more(tmp_path, small_dataset, monkeypatch):
    """(The image modes cross-validate too: tests/train/test_image_runs.py.)"""
    import retinalens
    from retinalens.train import ensemble

    with pytest.raises(RetinaLensError, match="--cv must be 0"):
        train_bundle(build_run_config(small_dataset, cv=-1), tmp_path / "m", progress=False)
    # The OCT default (two views, an ensemble) checks it too, before the images are screened.
    monkeypatch.setattr(ensemble, "prepare_data", lambda *a, **k: pytest.fail("screened before the check"))
    with pytest.raises(RetinaLensError, match="--cv must be 0"):
        retinalens.train(small_dataset, tmp_path / "m", cv=-1)
