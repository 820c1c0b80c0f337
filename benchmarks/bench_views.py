"""Two views of one OCT scan: the conv head on the squashed scan and on its retinal band in tiles, averaged.

bench_preprocessing.py measured input geometries with the logistic-regression probe; this measures
them with the default head (the conv head on cached spatial maps), on the folds `retinalens train`
itself makes, and asks whether one view is enough:

- squash: the default input, the whole scan resized to 224x224 (a 7x7 map);
- bandtiles: the retinal band (bench_preprocessing.retinal_band: found from the image, 15% margin,
  the whole scan where none is found), resized to 224 px high with its aspect kept, then three
  224x224 tiles (left, centre, right) side by side: one 224x672 input, a 7x21 map;
- bandtiles-mean: the same tiles' maps averaged position by position (one 7x7 map);
- the mean of several heads' probabilities: two views (seed 0 each, or seeds 0-2 each), and (the
  control) two or three seeds of one view.

Folds: a default bundle is trained first (`retinalens.train`, seed 0), and its `splits.json` folds
are used: patient-grouped, stratified, near-duplicate pairs kept together, exactly what `train`
cross-validates on. Every head is trained as `train` trains it (TrainConfig's defaults, the epoch
count with the lowest mean held-out loss); features are the traced bf16 EfficientNet-Lite0's, as
the cache holds them. The rule, fixed before test was scored: a row replaces the default when it
beats the default conv head on at least 4 of 5 folds with a mean gain above sd(gains)/sqrt(5).
Test (oct-kermany/test) is scored once, for the best row by that rule and for the default, after
refitting on all 619 training scans: accuracy with its patient-bootstrap CI, urgent (CNV+DME)
sensitivity / specificity at the threshold fitted out of fold for 0.95, DRUSEN recall.

`python benchmarks/bench_views.py [--out FILE]` prints the JSON; `run(shared_data)` returns it
(`benchmarks/run.py --only views`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import retinalens
from retinalens.data.decode import decode_image
from retinalens.data.discover import discover
from retinalens.data.hashing import sha256_files
from retinalens.models.heads import HeadConfig, head_probabilities
from retinalens.models.registry import create_backbone
from retinalens.train.cv import Candidate, Folds, cross_validate, fold_accuracy, refit, spread
from retinalens.train.trainer import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cv import test_scores  # noqa: E402  (the out-of-fold fit and the one test scoring, shared)
from bench_preprocessing import banded, tiles  # noqa: E402  (the band finder and tiles measured there)

ROOT = Path(__file__).resolve().parents[1]
SEEDS, TILES, SIZE = (0, 1, 2), 3, 224
CONV = Candidate(HeadConfig(kind="conv"))


def bandtiles(img: Image.Image, fallbacks: list[str], name: str) -> Image.Image:
    """bench_preprocessing's band-then-tiles crops, pasted side by side into one input."""
    out = Image.new(img.mode, (TILES * SIZE, SIZE))
    for k, tile in enumerate(banded(tiles(SIZE, TILES), fallbacks)(img, name)):
        out.paste(tile, (k * SIZE, 0))
    return out


def features(bbs: dict[str, Any], paths: list[Path], fallbacks: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """view -> {"spatial": (N, H, W, C) float16, "pooled": (N, C)}: the traced bf16 backbone's output.
    Each view has its own backbone object, so each graph is traced on its own input shape."""
    bb = bbs["squash"]
    pixels: dict[str, list[torch.Tensor]] = {"squash": [], "bandtiles": []}
    for p in paths:
        img = decode_image(p, keep_grey=True)
        pixels["squash"].append(bb.preprocessing.pixels(img))
        pixels["bandtiles"].append(torch.from_numpy(np.array(bandtiles(img, fallbacks, p.name).convert("RGB"))))
    out = {}
    for view, px in pixels.items():
        sp, po = zip(*[bbs[view].encode(torch.stack(px[a:a + 16]), "bf16") for a in range(0, len(px), 16)])
        out[view] = {"spatial": torch.cat(sp).numpy(), "pooled": torch.cat(po).numpy()}
    s = out["bandtiles"]["spatial"]
    n, h, w, c = s.shape
    mean = s.astype(np.float32).reshape(n, h, TILES, w // TILES, c).mean(axis=2).astype(np.float16)
    out["bandtiles-mean"] = {"spatial": mean, "pooled": out["bandtiles"]["pooled"]}
    return out


def run(shared: Path) -> dict[str, Any]:
    root = shared / "oct-kermany"
    train_ds, test_ds = discover(root / "train"), discover(root / "test")
    classes = train_ds.classes
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        retinalens.train(root, Path(tmp) / "default", resize="squash")  # its folds: the same for either input
        default_s = time.perf_counter() - t
        fmap = json.loads((Path(tmp) / "default" / "splits.json").read_text())["folds"]
    hashes = sha256_files([s.path for s in train_ds.samples])
    keep = [i for i, h in enumerate(hashes) if h in fmap]
    samples = [train_ds.samples[i] for i in keep]
    fold = np.array([fmap[hashes[i]] for i in keep])
    folds = Folds(fold, int(fold.max()) + 1)
    y = np.array([classes.index(s.label) for s in samples])
    y_test = np.array([classes.index(s.label) for s in test_ds.samples])
    bbs = {"squash": create_backbone(), "bandtiles": create_backbone()}
    fallbacks: list[str] = []
    t = time.perf_counter()
    feats = features(bbs, [s.path for s in samples], fallbacks)
    test_feats = features(bbs, [s.path for s in test_ds.samples], fallbacks)
    feature_s = time.perf_counter() - t
    heads: dict[str, Any] = {}
    for view in feats:
        shape = tuple(int(v) for v in np.array(feats[view]["spatial"].shape)[[3, 1, 2]])
        for seed in SEEDS if view != "bandtiles-mean" else (0,):
            cfg = replace(TrainConfig(), seed=seed)
            t = time.perf_counter()
            r = cross_validate(CONV, feats[view].__getitem__, y, folds, num_classes=len(classes),
                               feature_shape=shape, train=cfg)
            heads[f"{view} seed {seed}"] = {"r": r, "shape": shape, "cfg": cfg, "view": view,
                                            "seconds": round(time.perf_counter() - t, 1)}
            print(f"{view} seed {seed}", [round(a, 4) for a in r.fold_accuracy], r.epochs, file=sys.stderr, flush=True)
    rows_of = {name: [name] for name in heads} | {
        "squash + bandtiles (seed 0 each)": ["squash seed 0", "bandtiles seed 0"],
        "squash + bandtiles-mean (seed 0 each)": ["squash seed 0", "bandtiles-mean seed 0"],
        "squash seeds 0 + 1 (control: two heads, one view)": ["squash seed 0", "squash seed 1"],
        "squash seeds 0 + 1 + 2": ["squash seed 0", "squash seed 1", "squash seed 2"],
        "squash + bandtiles, seeds 0-2 each": [f"{v} seed {s}" for v in ("squash", "bandtiles") for s in SEEDS]}
    default = np.array(fold_accuracy(heads["squash seed 0"]["r"].oof, y, fold))
    rows: dict[str, Any] = {}
    for name, members in rows_of.items():
        oof = np.mean([heads[m]["r"].oof for m in members], axis=0)
        acc = np.array(fold_accuracy(oof, y, fold))
        gain, s = acc - default, spread(acc)
        mean_gain, se_gain = float(gain.mean()), float(gain.std(ddof=1) / np.sqrt(len(gain)))
        rows[name] = {"fold_accuracy": acc.round(4).tolist(), "cv_mean": round(s["accuracy_mean"], 4),
                      "cv_sd": round(s["accuracy_sd"], 4), "gain_per_fold": gain.round(4).tolist(),
                      "folds_won": int((gain > 0).sum()), "folds_lost": int((gain < 0).sum()),
                      "gain_mean": round(mean_gain, 4), "gain_se": round(se_gain, 4),
                      "epochs": [heads[m]["r"].epochs for m in members],
                      "cv_seconds": round(sum(heads[m]["seconds"] for m in members), 1)}
        rows[name]["wins"] = name != "squash seed 0" and rows[name]["folds_won"] >= 4 and mean_gain > se_gain
    winners = [n for n in rows if rows[n]["wins"]]
    best = max(winners, key=lambda n: rows[n]["cv_mean"]) if winners else None
    patients = [s.patient for s in test_ds.samples]
    for name in ["squash seed 0"] + ([best] if best else []):
        probs, oofs = [], []
        for m in rows_of[name]:
            h = heads[m]
            final = refit(h["r"], feats[h["view"]].__getitem__, y, num_classes=len(classes),
                          feature_shape=h["shape"], train=h["cfg"])
            probs.append(head_probabilities(final.head, test_feats[h["view"]]["spatial"]))
            oofs.append(h["r"].oof)
        rows[name] |= test_scores(np.mean(oofs, axis=0), np.mean(probs, axis=0), y, fold, y_test, classes, patients)
    return {"data": f"oct-kermany: {len(y)} train scans ({len({s.patient for s in samples})} patients) in the "
                    f"{folds.k} folds of a default `retinalens.train` run (seed 0); test {len(y_test)} scans "
                    f"({len(set(patients))} patients), scored once for the default and the best winning row",
            "folds": folds.record([s.label for s in samples], [s.patient for s in samples]),
            "band_fallbacks": {"n": len(fallbacks), "of": len(samples) + len(y_test), "scans": fallbacks},
            "rule": "beats the default conv head (squash seed 0) on >= 4 of 5 folds, mean gain > sd/sqrt(5)",
            "chosen": best, "rows": rows,
            "seconds": {"default_train": round(default_s, 1), "features_both_views_748_scans": round(feature_s, 1)},
            "load_average_1min_after": round(os.getloadavg()[0], 2)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("RETINALENS_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = json.dumps(run(Path(args.data)), indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
