"""Calibration, the referral operating point and the quality gate, measured on the real data.

- an OCT bundle trained on oct-kermany/train (default pipeline), evaluated on oct-kermany/test: ECE
  before/after temperature scaling, sensitivity/specificity at the validation-fitted threshold, the
  in-distribution rejection rate; then fed every fundus photo (Kaggle + IDRiD), a natural photograph
  and corrupted test scans (blur, darkening, noise, overexposure);
- a fundus bundle (--task referable) trained on fundus-kaggle-dr/trainLabels.csv with a patient-grouped
  20% test split: the same on its test split, fed every OCT scan, and fed IDRiD (another fundus set).

`python benchmarks/bench_trust.py` prints the JSON; `run(shared_data)` returns it.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageFilter

import retinalens
from retinalens.data.discover import discover
from retinalens.trust import summarize
from retinalens.predict.model import Model

ROOT = Path(__file__).resolve().parents[1]
NATURAL_PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _corrupt(src: Path, dst: Path, how: str, level: float, rng: np.random.Generator) -> Path:
    """Corruptions at the file's own resolution; blur radius in model pixels (the scan is resized to 224)."""
    img = Image.open(src).convert("L")
    if how == "blur":
        out = np.asarray(img.filter(ImageFilter.GaussianBlur(level * img.width / 224)), dtype=np.float64)
    else:
        x = np.asarray(img, dtype=np.float64)
        out = {"dark": lambda: x * level, "noise": lambda: x + rng.normal(0, level, x.shape),
               "overexpose": lambda: x * level + 60}[how]()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(dst)
    return dst


def _gate_of(model: Model, paths: list[Path]) -> dict[str, Any]:
    results = model.predict_many(paths, batch_size=16)
    return summarize([r["gate"] for r in results if "gate" in r]) | {"unreadable": sum("error" in r for r in results)}


def _trust_figures(bundle: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    cal, op, ref = metrics["calibration"], metrics["operating_point"], bundle.manifest.to_dict()["thresholds"]["referral"]
    return {
        "temperature": cal["temperature"],
        "validation_ece_before_after": [bundle.manifest.to_dict()["calibration"]["ece_before"], bundle.manifest.to_dict()["calibration"]["ece_after"]],
        "test_ece_before_after": [cal["ece_before"], cal["ece_after"]],
        "referral_threshold": ref["threshold"], "target_sensitivity": ref["target_sensitivity"],
        "validation_sensitivity_specificity": [ref["val_sensitivity"], ref["val_specificity"]],
        "test_sensitivity": op["sensitivity"], "test_sensitivity_ci": op["sensitivity_ci"],
        "test_specificity": op["specificity"], "test_specificity_ci": op["specificity_ci"],
        "test_accuracy": metrics["accuracy"], "n_test_images": metrics["n_images"],
        "validation_gate_rejection": bundle.manifest.to_dict()["gate"]["validation"],
        "test_gate_rejection": metrics["gate"],
    }


def bench_oct(shared: Path, work: Path) -> dict[str, Any]:
    oct_root = shared / "oct-kermany"
    bundle = retinalens.train(oct_root, work / "oct-bundle", cache=work / "cache", resize="squash")  # one network
    metrics = retinalens.evaluate(bundle, oct_root, split="test", cache=work / "cache", n_boot=1000)
    model = Model(bundle, runtime="torch")
    out = {"data": "trained on oct-kermany/train (val carved by patient), evaluated on oct-kermany/test",
           **_trust_figures(bundle, metrics)}
    fundus = sorted((shared / "fundus-kaggle-dr" / "images").glob("*.jpeg")) + sorted((shared / "fundus-idrid" / "images").glob("*"))
    out["fundus_photos_to_oct_bundle"] = _gate_of(model, fundus)
    out["natural_photo_to_oct_bundle"] = model.predict(NATURAL_PHOTO)["gate"]["reason"]
    test_scans = sorted((oct_root / "test").glob("*/*.jpeg"))
    rng = np.random.default_rng(0)
    corruptions = {}
    for how, levels in (("blur", (1, 2, 4)), ("dark", (0.3, 0.15, 0.05)), ("noise", (25, 50, 100)), ("overexpose", (2, 4))):
        for level in levels:
            folder = work / f"{how}-{level}"
            folder.mkdir()
            paths = [_corrupt(p, folder / f"{p.stem}.png", how, level, rng) for p in test_scans]
            corruptions[f"{how} {level}"] = _gate_of(model, paths)
    out["corrupted_test_scans"] = corruptions
    out["corruptions"] = ("blur: Gaussian, radius in model-input pixels (224 px); dark: pixel values x level; "
                          "noise: Gaussian of that SD (0-255) at the file's resolution; overexpose: x level + 60")
    return out


def bench_fundus(shared: Path, work: Path) -> dict[str, Any]:
    """Kaggle sample with a patient-grouped stratified 20% test split written into its labels CSV."""
    from retinalens.data.splits import SplitConfig, make_splits

    ds = discover(shared / "fundus-kaggle-dr" / "trainLabels.csv")  # grades 0-4: stratified by grade
    test = set(make_splits(ds, SplitConfig(test_fraction=0.2, seed=0)).indices("test"))
    labels = work / "kaggle.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("image", "level", "patient", "split"),
                                 *((str(s.path), s.label, s.patient, "test" if i in test else "train")
                                   for i, s in enumerate(ds.samples))])
    bundle = retinalens.train(labels, work / "fundus-bundle", task="referable", cache=work / "cache")
    metrics = retinalens.evaluate(bundle, labels, split="test", cache=work / "cache", n_boot=1000)
    model = Model(bundle, runtime="torch")
    oct_scans = sorted((shared / "oct-kermany").glob("*/*/*.jpeg"))
    return {"data": "fundus-kaggle-dr (130 photos), referable DR, patient-grouped stratified 20% test split",
            **_trust_figures(bundle, metrics),
            "oct_scans_to_fundus_bundle": _gate_of(model, oct_scans),
            "idrid_photos_to_fundus_bundle": _gate_of(model, sorted((shared / "fundus-idrid" / "images").glob("*"))),
            "natural_photo_to_fundus_bundle": model.predict(NATURAL_PHOTO)["gate"]["reason"]}


def run(shared_data: Path | None) -> dict[str, Any]:
    shared = Path(shared_data or os.environ.get("RETINALENS_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (shared / "oct-kermany").is_dir() or not (shared / "fundus-kaggle-dr").is_dir():
        return {"skipped": f"needs oct-kermany and fundus-kaggle-dr under {shared}"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        out["oct"] = bench_oct(shared, Path(d))
        out["fundus"] = bench_fundus(shared, Path(d))
        out["seconds"] = round(time.perf_counter() - t, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]) if len(sys.argv) > 1 else None), indent=2))
