"""Training on images vs on the feature cache, and the fundus models side by side.

- epoch_seconds: seconds per training epoch on oct-kermany/train, on images (frozen mode: decode,
  augment, backbone, head) vs on the feature cache (the original conv head on the cached maps), for
  the same images and backbone. The original work: 12 min vs 90 s per epoch on a GTX 1060.
- fundus_models: referable DR on one patient-grouped split of IDRiD + Kaggle, photos prepared at
  256 px: the EyeNet baseline trained from scratch, frozen-backbone training on images, and the
  default bottleneck pipeline, each beside the logistic-regression baseline.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import retinalens
from retinalens.data.discover import discover

SPLIT_SEED = 0


def fundus_split_csv(shared: Path, work: Path) -> tuple[Path, int]:
    """IDRiD + Kaggle in one labels CSV with a `split` column: a patient-grouped, stratified 20% test
    split on the referable task (val goes back to train: `train` carves its own). Images are linked
    under work/images so that the CSV names them relatively (as `prepare fundus` requires)."""
    from retinalens.data.splits import SplitConfig, make_splits
    from retinalens.data.tasks import TASKS, apply_task

    rows = []
    for folder, labels in (("fundus-kaggle-dr", "trainLabels.csv"), ("fundus-idrid", "labels.csv")):
        for s in discover(shared / folder / labels).samples:
            link = work / "images" / folder / s.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(s.path.resolve())
            rows.append((f"{folder}/{s.path.name}", s.label, f"{folder}:{s.patient}"))
    combined = work / "fundus.csv"
    with open(combined, "w", newline="") as f:
        csv.writer(f).writerows([("image", "level", "patient"), *rows])
    ds, _ = apply_task(discover(combined), TASKS["referable"])
    splits = make_splits(ds, SplitConfig(test_fraction=0.2, seed=SPLIT_SEED))
    which = {i: name for name in ("train", "val", "test") for i in splits.indices(name)}
    with open(combined, "w", newline="") as f:
        csv.writer(f).writerows([("image", "level", "patient", "split"),
                                 *((img, g, pt, "test" if which.get(i) == "test" else "train")
                                   for i, (img, g, pt) in enumerate(rows) if i in which)])
    return combined, len(rows)


def referable_summary(bundle, data: Path, cache: Path, seconds: float) -> dict:
    m = retinalens.evaluate(bundle, data, split="test", cache=cache)
    sel = bundle.manifest.to_dict()["training"]["head_selection"]
    ref = m["per_class"]["referable"]
    return {"test_accuracy": m["accuracy"], "test_accuracy_ci": m["accuracy_ci"],
            "test_precision_referable": ref["precision"], "test_recall_referable": ref["recall"],
            "test_auc": m["auc"], "test_auc_ci": m["auc_ci"], "test_specificity": m["specificity"],
            "threshold": 0.5, "n_test_images": m["n_images"], "n_test_patients": m["n_patients"],
            "val_accuracy": bundle.manifest.to_dict()["validation"]["accuracy"], "head": sel["chosen"],
            "baseline_logistic_regression_val_acc": bundle.manifest.to_dict()["training"]["baseline_logistic_regression"]["val_acc"],
            "train_seconds": round(seconds, 1)}


def fundus_models(shared: Path, work: Path) -> dict:
    from retinalens.data.fundus import prepare_fundus

    combined, n = fundus_split_csv(shared, work)
    prepared = work / "fundus256"
    report = prepare_fundus(combined, prepared, size=256, progress=False)
    data = prepared / "labels.csv"
    out: dict = {"data": f"IDRiD + Kaggle DR sample ({n} photos, {report.kept} kept by prepare fundus at 256 px), "
                         "referable = grade >= 2, patient-grouped stratified 20% test split"}
    runs = {"eyenet_scratch": {"mode": "scratch", "backbone": "eyenet", "balance": "oversample", "epochs": 30},
            "frozen_efficientnet_lite0_images": {"mode": "frozen", "epochs": 20},
            "bottleneck_efficientnet_lite0": {}}
    for name, kw in runs.items():
        t = time.perf_counter()
        bundle = retinalens.train(data, work / name, task="referable", cache=work / "cache", **kw)
        out[name] = referable_summary(bundle, data, work / "cache", time.perf_counter() - t) | {"options": kw}
        print(name, out[name], flush=True)
    return out


def epoch_seconds(oct_train: Path, work: Path, backbone: str = "inception_v3") -> dict:
    """Steady-state seconds per epoch, (time of 3 epochs - time of 1) / 2, on images and on the cache."""
    from retinalens.models.heads import HeadConfig
    from retinalens.train.trainer import TrainConfig, train_head

    common = {"backbone": backbone, "pretrained": backbone != "inception_v3", "cache": work / "cache", "seed": 0}
    timed = {}
    for run, epochs in enumerate((1, 1, 3)):  # the first run fills the feature cache (for the baseline)
        t = time.perf_counter()
        retinalens.train(oct_train, work / f"img{run}", mode="frozen", epochs=epochs, batch_size=32, **common)
        timed[epochs] = time.perf_counter() - t
    images = (timed[3] - timed[1]) / 2
    bundle = retinalens.load(work / "img0").bundle
    n = bundle.manifest.to_dict()["training"]["splits"]["train"]["n_images"]  # both epochs go over the same images
    c, h, w = bundle.backbone.feature_shape()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, h, w, c)).astype(np.float16), rng.integers(0, 4, n)
    for epochs in (1, 1, 3):  # the first run warms up
        t = time.perf_counter()
        train_head(x, y, x[:64], y[:64], num_classes=4, feature_shape=(c, h, w), progress=False,
                   cfg=TrainConfig(head=HeadConfig(kind="conv"), epochs=epochs, early_stopping=0, batch_size=64))
        timed[f"cache{epochs}"] = time.perf_counter() - t
    cache = (timed["cache3"] - timed["cache1"]) / 2
    return {"data": f"oct-kermany/train, the {n} images of its train split (validation carved by patient)",
            "backbone": backbone, "weights": "random (timing only)" if backbone == "inception_v3" else "ImageNet",
            "images_frozen_mode_s_per_epoch": round(images, 2),
            "cache_conv_head_s_per_epoch": round(cache, 3),
            "ratio": round(images / cache, 1),
            "original_work_gtx1060": {"images_s_per_epoch": 720, "cache_s_per_epoch": 90}}


def run(shared_data: Path | None) -> dict:
    shared = Path(shared_data or os.environ.get("RETINALENS_SHARED_DATA", "../shared/data"))
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        res["epoch_seconds_images_vs_cache"] = [epoch_seconds(shared / "oct-kermany" / "train", Path(d) / b, b)
                                                for b in ("inception_v3", "efficientnet_lite0")]
        if (shared / "fundus-idrid").is_dir() and (shared / "fundus-kaggle-dr").is_dir():
            res["fundus_models_referable_dr"] = fundus_models(shared, Path(d) / "fundus")
    return res


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=2))
