"""Fine-tuning recipes against the frozen features, on the same patient folds as bench_cv.

oct-kermany/train (619 scans) is cut into the 5 patient-grouped, stratified folds of bench_cv
(train/cv.make_folds, seed 0; the folds' digest is recorded and checked against bench_cv's). Rows:

- logreg C=0.1: the logistic-regression baseline on pooled EfficientNet-Lite0 features (all 5 folds;
  each fold's accuracy is also the baseline of the per-fold gains below);
- the conv head on cached spatial features, as bench_cv trains it (60 epochs at most, the epoch count
  chosen on the mean held-out loss), for its per-fold accuracies;
- `--mode finetune --recipe classic` (BatchNorm frozen) and `--recipe adamw-ema-cpu` with BatchNorm frozen
  and re-estimated, each trained FT_EPOCHS epochs on a fold's training patients and scored on its
  held-out patients after the last epoch (no epoch is chosen on the held-out fold: select=False).

Image training costs minutes per fold on
a CPU, so only the first FT_FOLDS folds are run, the same ones for every fine-tuning row, fold by fold
(an interrupted run leaves every row with the same folds). Then, once, the row with the best CV mean is
trained on all of train and scored on oct-kermany/test with its patient-bootstrap CI (test is passed
as the validation split only to record its curve; nothing is chosen on it).

`python benchmarks/bench_finetune.py` merges its section into benchmarks/results.json after every fold
(`benchmarks/run.py --only finetune` writes it at the end). FT_FOLDS, FT_EPOCHS and FT_BATCH override
the defaults below.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from retinalens.bundle.network import Network
from retinalens.config import ImageTrainConfig, given
from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.evaluate.metrics import classification_metrics
from retinalens.features.extract import extract_features, head_inputs, open_cache
from retinalens.models.heads import HeadConfig
from retinalens.models.registry import create_backbone, resolve_precision
from retinalens.train.cv import BASELINE_C, Candidate, CVResult, Folds, cross_validate, make_folds
from retinalens.train.images import train_on_images
from retinalens.train.recipes import get_recipe
from retinalens.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
K, SEED = 5, 0
FOLDS, EPOCHS, BATCH = (int(os.environ.get(k, d)) for k, d in (("FT_FOLDS", 2), ("FT_EPOCHS", 5), ("FT_BATCH", 32)))
ROWS = {"finetune classic, BN frozen": ("classic", "frozen"),
        "finetune adamw-ema-cpu, BN frozen": ("adamw-ema-cpu", "frozen"),
        "finetune adamw-ema-cpu, BN re-estimated": ("adamw-ema-cpu", "reestimate")}


def _finetune(bb, recipe: str, batchnorm: str, paths, y, val_paths, y_val, scratch: Path, *, epochs: int = EPOCHS,
              augment: str | None = None, lr: float | None = None):
    """`augment` None: what `--augment auto` picks for OCT (the recipe's); `lr` None: TrainConfig's."""
    images = ImageTrainConfig(recipe=recipe, batchnorm=batchnorm)
    augment = augment or get_recipe(recipe).oct_augment
    t = time.perf_counter()
    r = train_on_images(bb, HeadConfig(kind="linear", hidden=64), mode="finetune", paths=paths, y_train=y,
                        val_paths=val_paths, y_val=y_val, num_classes=4, images=images, augment=augment,
                        train=TrainConfig(epochs=epochs, batch_size=BATCH, **given(lr=lr)), checkpoint_dir=scratch,
                        fingerprint={"recipe": recipe, "bn": batchnorm, "n": len(paths), "t": time.time()},
                        progress=False, select=False)
    (scratch / "last.pt").unlink(missing_ok=True)
    return r, time.perf_counter() - t


@torch.no_grad()
def _probabilities(r, bb, paths: list[Path]) -> np.ndarray:
    net = Network(r.backbone.model, r.result.head, bb.preprocessing, HeadConfig(kind="linear", hidden=64)).eval()
    out = []
    for s in range(0, len(paths), 32):
        x = torch.stack([bb.preprocessing.load(p) for p in paths[s:s + 32]])
        out.append(torch.softmax(net(x)[0].float(), 1).numpy())
    return np.concatenate(out)


@dataclass
class Prepared:
    """The data, the folds and the heads on cached features that every fine-tuning row is measured against."""

    classes: list[str]
    paths: list[Path]
    y: np.ndarray
    folds: Folds
    test_ds: Any
    y_test: np.ndarray
    bb: Any
    logreg: CVResult
    conv: CVResult
    cache: Any  # the feature cache (pooled and spatial features of every scan extracted so far)
    inputs: Callable[[str], np.ndarray]  # input kind -> the training scans' cached features (cv.Inputs)
    section: dict[str, Any]  # data, folds digest, settings, the baseline's and the conv head's rows


def prepare(shared: Path) -> Prepared:
    oct_root = shared / "oct-kermany"
    train_ds, test_ds = discover(oct_root / "train"), discover(oct_root / "test")
    classes = train_ds.classes
    labels, patients = [s.label for s in train_ds.samples], [s.patient for s in train_ds.samples]
    paths = [s.path for s in train_ds.samples]
    y = np.array([classes.index(c) for c in labels])
    y_test = np.array([classes.index(s.label) for s in test_ds.samples])
    folds = make_folds(labels, patients, K, seed=SEED)
    bb = create_backbone()
    precision = resolve_precision("auto")
    cache = open_cache(None, bb, precision)
    hashes = sha256_files(paths)
    extract_features(paths, hashes, bb, cache, precision=precision, progress=False)
    feats = {kind: head_inputs(cache, hashes, kind) for kind in ("pooled", "spatial")}
    logreg, conv = (cross_validate(c, feats.__getitem__, y, folds, num_classes=len(classes),
                                   feature_shape=cache.key.feature_shape, train=TrainConfig())
                    for c in (Candidate(HeadConfig(kind="logreg"), c=BASELINE_C), Candidate(HeadConfig(kind="conv"))))
    base, conv_acc = [float(a) for a in logreg.fold_accuracy], [float(a) for a in conv.fold_accuracy]
    digest = folds.record(labels, patients)["digest"]
    res: dict[str, Any] = {
        "data": f"oct-kermany: {len(y)} train scans in {K} patient-grouped stratified folds (seed {SEED}); "
                f"fine-tuning rows on folds 1-{FOLDS} only; test {len(y_test)} scans, scored once",
        "folds_digest": digest, "same_folds_as_bench_cv": _bench_cv_digest() == digest,
        "settings": {"backbone": bb.name, "input": bb.preprocessing.size, "epochs": EPOCHS, "batch_size": BATCH,
                     "precision": precision, "threads": torch.get_num_threads()},
        "rows": {f"logreg C={BASELINE_C} (baseline)": {"fold_accuracy": base, "cv_accuracy_mean": round(float(np.mean(base)), 4),
                                                       "cv_accuracy_sd": round(float(np.std(base, ddof=1)), 4),
                                                       "first_folds_mean": round(float(np.mean(base[:FOLDS])), 4)},
                 "conv head (same folds, cached features)": {
                     "fold_accuracy": conv_acc, "epochs": conv.epochs, "cv_accuracy_mean": round(float(np.mean(conv_acc)), 4),
                     "cv_accuracy_sd": round(float(np.std(conv_acc, ddof=1)), 4),
                     "first_folds_mean": round(float(np.mean(conv_acc[:FOLDS])), 4)}}}
    return Prepared(classes, paths, y, folds, test_ds, y_test, bb, logreg, conv, cache, feats.__getitem__, res)


def run(shared: Path, save: Callable[[dict[str, Any]], None] = lambda d: None) -> dict[str, Any]:
    p = prepare(shared)
    classes, paths, y, folds, test_ds, y_test, bb, res = p.classes, p.paths, p.y, p.folds, p.test_ds, p.y_test, p.bb, p.section
    base, conv_acc = p.logreg.fold_accuracy, p.conv.fold_accuracy
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-finetune"
    scratch.mkdir(parents=True, exist_ok=True)
    for f in range(FOLDS):
        fit, held = folds.split(f)
        for name, (recipe, bn) in ROWS.items():
            r, seconds = _finetune(bb, recipe, bn, [paths[i] for i in fit], y[fit], [paths[i] for i in held], y[held],
                                   scratch)
            row = res["rows"].setdefault(name, {"fold_accuracy": [], "fold_seconds": [], "fold_curves": []})
            row["fold_accuracy"].append(round(r.result.history[-1]["val_acc"], 4))
            row["fold_seconds"].append(round(seconds, 1))
            row["fold_curves"].append([round(h["val_acc"], 4) for h in r.result.history])
            acc = np.asarray(row["fold_accuracy"])
            row |= {"cv_accuracy_mean": round(float(acc.mean()), 4),
                    "cv_accuracy_sd": round(float(acc.std(ddof=1)), 4) if len(acc) > 1 else None,
                    "gain_over_baseline_per_fold": [round(a - b, 4) for a, b in zip(acc, base)],
                    "gain_over_conv_head_per_fold": [round(a - b, 4) for a, b in zip(acc, conv_acc)],
                    "seconds_per_fold_mean": round(float(np.mean(row["fold_seconds"])), 1)}
            print(name, f"fold {f + 1}", json.dumps(row), flush=True)
            save(res)
    chosen = max(ROWS, key=lambda n: res["rows"][n]["cv_accuracy_mean"])
    recipe, bn = ROWS[chosen]
    test_paths = [s.path for s in test_ds.samples]
    r, seconds = _finetune(bb, recipe, bn, paths, y, test_paths, y_test, scratch)
    m = classification_metrics(y_test, _probabilities(r, bb, test_paths), classes,
                               [s.patient for s in test_ds.samples], positive_classes=["CNV", "DME"], n_boot=1000, seed=0)
    res["test"] = {"row": chosen, "chosen_by": "the best CV mean over the fine-tuning rows' folds",
                   "test_accuracy": round(m["accuracy"], 4), "test_accuracy_ci": [round(v, 4) for v in m["accuracy_ci"]],
                   "drusen_recall": round(m["per_class"]["DRUSEN"]["recall"], 4),
                   "seconds_train_all_619": round(seconds, 1)}
    save(res)
    return res


def _bench_cv_digest() -> str | None:
    """The digest of bench_cv's folds in results.json, if it is there."""
    try:
        return json.loads((ROOT / "benchmarks" / "results.json").read_text())["cv"]["folds"].get("digest")
    except (OSError, KeyError, ValueError):
        return None


def _save(section: dict[str, Any]) -> None:
    out = ROOT / "benchmarks" / "results.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    res["finetune"] = section
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("RETINALENS_SHARED_DATA",
                                                                          ROOT.parent / "shared" / "data"))
    print(json.dumps(run(data, _save), indent=2))
