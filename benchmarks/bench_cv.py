"""Cross-validated selection on the real OCT data: one table, the same patient folds for every row.

oct-kermany/train (619 scans) is cut into 5 patient-grouped, stratified folds (train/cv.py, the folds
`retinalens train` makes by default); every row is cross-validated on them, refitted on all 619 and
scored once on the untouched oct-kermany/test (129 scans): CV accuracy mean +- sd over folds, test
accuracy with its patient-bootstrap CI, urgent-referral (CNV + DME) sensitivity / specificity at the
threshold fitted out of fold for 0.95, DRUSEN recall, and the time to cross-validate and refit (the
features are cached first: extraction is not counted). The row the default (`--head auto`) chooses
is marked; it is chosen on the CV column only. Also: the near-duplicate rule's false positives over
every train x test pair (data/near_duplicates.py).

`python benchmarks/bench_cv.py` prints the JSON (`benchmarks/run.py --only cv` writes it into
results.json); RETINALENS_CACHE points the feature cache somewhere reusable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.data.near_duplicates import near_duplicate_pairs
from retinalens.evaluate.metrics import classification_metrics
from retinalens.features.extract import extract_features, head_inputs, open_cache
from retinalens.models.heads import HeadConfig, head_probabilities
from retinalens.models.registry import create_backbone, resolve_precision
from retinalens.train.cv import Candidate, cross_validate, default_candidates, make_folds, refit, select
from retinalens.train.trainer import TrainConfig
from retinalens.trust.calibration import calibrated, fit_calibration, positive_score, referral_threshold

ROOT = Path(__file__).resolve().parents[1]
K, SEED, TARGET = 5, 0, 0.95
URGENT = ["CNV", "DME"]


def test_scores(oof: np.ndarray, test_probs: np.ndarray, y: np.ndarray, fold: np.ndarray, y_test: np.ndarray,
                classes: list[str], test_patients: list[str]) -> dict[str, Any]:
    """The temperature and the urgent threshold fitted on out-of-fold probabilities, then the test
    probabilities (uncalibrated, as the head gives them) scored once with them."""
    cal = fit_calibration(oof, y, fold)
    is_pos = np.isin(y, [classes.index(c) for c in URGENT])
    threshold = referral_threshold(positive_score(calibrated(oof, cal["temperature"]), classes, URGENT), is_pos, TARGET)
    m = classification_metrics(y_test, calibrated(test_probs, cal["temperature"]), classes, test_patients,
                               positive_classes=URGENT, n_boot=1000, seed=0, threshold=threshold["threshold"])
    u = m["urgent_referral"]
    return {"test_accuracy": round(m["accuracy"], 4), "test_accuracy_ci": [round(v, 4) for v in m["accuracy_ci"]],
            "urgent_threshold": round(threshold["threshold"], 4),
            "urgent_sensitivity": round(u["sensitivity"], 4), "urgent_sensitivity_ci": u["sensitivity_ci"],
            "urgent_specificity": round(u["specificity"], 4), "urgent_specificity_ci": u["specificity_ci"],
            "drusen_recall": round(m["per_class"]["DRUSEN"]["recall"], 4),
            "drusen_recall_ci": m["per_class"]["DRUSEN"]["recall_ci"],
            "temperature": round(cal["temperature"], 3), "temperature_kept": cal["kept"],
            "oof_nll_before_after_T": [round(cal["nll_before"], 4), round(cal["nll_after"], 4)]}


def _row(r, inputs, y, y_test, test_inputs, folds, classes, test_patients, seconds_cv, shape, cfg) -> dict[str, Any]:
    t = time.perf_counter()
    final = refit(r, inputs, y, num_classes=len(classes), feature_shape=shape, train=cfg)
    seconds_refit = time.perf_counter() - t
    probs = head_probabilities(final.head, test_inputs(r.candidate.head.input_kind))
    s = r.summary(y)
    return {"cv_accuracy_mean": round(s["accuracy_mean"], 4), "cv_accuracy_sd": round(s["accuracy_sd"], 4),
            "oof_nll": round(s["oof_nll"], 4), **({"epochs": r.epochs} if r.epochs else {}),
            **test_scores(r.oof, probs, y, folds.fold, y_test, classes, test_patients),
            "seconds_cv": round(seconds_cv, 1), "seconds_refit": round(seconds_refit, 1)}


def run(shared: Path) -> dict[str, Any]:
    oct_root = shared / "oct-kermany"
    train_ds, test_ds = discover(oct_root / "train"), discover(oct_root / "test")
    classes = train_ds.classes
    bb = create_backbone()
    precision = resolve_precision("auto")
    cache = open_cache(None, bb, precision)
    paths = [s.path for s in train_ds.samples] + [s.path for s in test_ds.samples]
    hashes = sha256_files(paths)
    extract_features(paths, hashes, bb, cache, precision=precision, progress=False)
    n = len(train_ds.samples)
    keys, test_keys = hashes[:n], hashes[n:]
    y = np.array([classes.index(s.label) for s in train_ds.samples])
    y_test = np.array([classes.index(s.label) for s in test_ds.samples])
    folds = make_folds([s.label for s in train_ds.samples], [s.patient for s in train_ds.samples], K, seed=SEED)
    feats = {kind: head_inputs(cache, keys, kind) for kind in ("pooled", "spatial")}
    test_feats = {kind: head_inputs(cache, test_keys, kind) for kind in ("pooled", "spatial")}
    shape = cache.key.feature_shape
    cfg = TrainConfig()  # the defaults `train` uses (60 epochs at most, Adam 1e-3)
    candidates = default_candidates(HeadConfig(kind="auto"), auto=True) + [Candidate(HeadConfig(kind="linear"))]
    test_patients = [s.patient for s in test_ds.samples]
    rows, results = {}, []
    for cand in candidates:
        t = time.perf_counter()
        r = cross_validate(cand, feats.__getitem__, y, folds, num_classes=len(classes), feature_shape=shape, train=cfg)
        seconds = time.perf_counter() - t
        results.append(r)
        rows[cand.name] = _row(r, feats.__getitem__, y, y_test, test_feats.__getitem__, folds, classes, test_patients,
                               seconds, shape, cfg)
        print(cand.name, json.dumps(rows[cand.name]), flush=True)
    auto = select([r for r in results if r.candidate.head.kind in ("conv", "logreg")], y)
    pooled = {k: v.astype(np.float64) for k, v in (("train", feats["pooled"]), ("test", test_feats["pooled"]))}
    t = time.perf_counter()
    pairs = near_duplicate_pairs([s.path for s in train_ds.samples], pooled["train"], [s.path for s in test_ds.samples],
                                 pooled["test"])
    return {"data": f"oct-kermany: {n} train scans ({len(set(s.patient for s in train_ds.samples))} patients) in "
                    f"{K} patient-grouped stratified folds (seed {SEED}); test {len(y_test)} scans "
                    f"({len(set(test_patients))} patients), scored once",
            "folds": folds.record([s.label for s in train_ds.samples], [s.patient for s in train_ds.samples]),
            "rows": rows, "default_head_auto_chooses": auto.candidate.name,
            "baseline": "logreg C=0.1",
            "near_duplicates_train_x_test": {"pairs_checked": n * len(y_test), "flagged": len(pairs),
                                             "seconds": round(time.perf_counter() - t, 1)}}


if __name__ == "__main__":
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("RETINALENS_SHARED_DATA",
                                                                          ROOT.parent / "shared" / "data"))
    print(json.dumps(run(data), indent=2))
