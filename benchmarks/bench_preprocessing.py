"""OCT-aware preprocessing, measured: does any input geometry beat squashing the scan to 224x224?

Kermany B-scans are 512-1536 px wide and 496 px high; squashing them to 224x224 shrinks a 1536-px
scan 7x across and 2x down, and the retina is a band in a mostly dark frame. Variants, each giving
the backbone's pooled features (EfficientNet-Lite0, ImageNet weights, fp32; several crops of one
scan are averaged):

- squash224: the current default (the whole scan resized to 224x224);
- squash320: a larger input, same geometry;
- letterbox224: the aspect ratio kept, the scan padded to a square with black;
- tiles224: resized to 224 px high with the aspect kept, three 224x224 tiles (left, centre, right);
- band224 / bandtiles224: first cropped to the retinal band (below), then squashed or tiled.

The band is found from the image itself (`retinalens.data.retinal_band`, where the product's
`resize="squash+band"` input uses it): the bright, column-wise top and bottom of the tissue,
robust to tilt (per-column extents, 5th/95th percentiles across columns), to the white padding some
scans carry (saturated rows and columns are ignored) and to speckle (a blurred copy is used), with a
margin of 15% of the scan height each way. A crop shorter than 25% of the height or a scan where no
column finds tissue falls back to the whole scan; every such fallback is counted and reported.

Selection is on cross-validation inside oct-kermany/train only (the 5 patient-grouped, stratified
folds `retinalens train` makes, seed 0), with the logistic-regression baseline (standardised pooled
features, C=0.1) as the probe: the same probe for every variant, so the differences are those of the
input. Test (oct-kermany/test, untouched until then) is scored once per variant after refitting on
all of train, with its patient-bootstrap CI, for information only.

`python benchmarks/bench_preprocessing.py [--out FILE] [--sheet PNG]` prints the JSON; --sheet writes
a contact sheet of band crops (the first scan of every size and the tallest and thinnest crops).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retinalens.data.decode import decode_image
from retinalens.data.discover import discover
from retinalens.data.retinal_band import MARGIN, MIN_BAND, retinal_band
from retinalens.evaluate.metrics import classification_metrics
from retinalens.models.registry import create_backbone
from retinalens.train.cv import make_folds

ROOT = Path(__file__).resolve().parents[1]


def squash(size: int) -> Callable[[Image.Image], list[Image.Image]]:
    return lambda img: [img.resize((size, size), Image.Resampling.BICUBIC)]


def letterbox(size: int) -> Callable[[Image.Image], list[Image.Image]]:
    def f(img: Image.Image) -> list[Image.Image]:
        s = size / max(img.size)
        w, h = max(1, round(img.width * s)), max(1, round(img.height * s))
        out = Image.new(img.mode, (size, size))
        out.paste(img.resize((w, h), Image.Resampling.BICUBIC), ((size - w) // 2, (size - h) // 2))
        return [out]
    return f


def tiles(size: int, n: int = 3) -> Callable[[Image.Image], list[Image.Image]]:
    def f(img: Image.Image) -> list[Image.Image]:
        w = max(size, round(img.width * size / img.height))
        r = img.resize((w, size), Image.Resampling.BICUBIC)
        xs = np.linspace(0, w - size, n).round().astype(int)
        return [r.crop((x, 0, x + size, size)) for x in xs]
    return f


def banded(inner: Callable[[Image.Image], list[Image.Image]], fallbacks: list[str]) -> Callable[..., list[Image.Image]]:
    def f(img: Image.Image, name: str = "") -> list[Image.Image]:
        band = retinal_band(img)
        if band is None:
            fallbacks.append(name)
            return inner(img)
        return inner(img.crop((0, band[0], img.width, band[1])))
    return f


@torch.inference_mode()
def pooled_features(model: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, images: list[Image.Image],
                    variant: Callable[..., list[Image.Image]], names: list[str]) -> np.ndarray:
    out = []
    for img, name in zip(images, names):
        crops = variant(img, name) if "name" in variant.__code__.co_varnames else variant(img)
        x = torch.from_numpy(np.stack([np.asarray(c.convert("RGB")) for c in crops])).permute(0, 3, 1, 2).float()
        f = model.forward_features((x / 255.0 - mean) / std).mean(dim=(2, 3))
        out.append(f.mean(dim=0).numpy())
    return np.stack(out)


def probe(x: np.ndarray, y: np.ndarray, folds: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities on train, and test probabilities after a refit on all of train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(a: np.ndarray, b: np.ndarray):
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(a, b)

    oof = np.zeros((len(y), int(y.max()) + 1))
    for f in np.unique(folds):
        held = folds == f
        oof[held] = fit(x[~held], y[~held]).predict_proba(x[held])
    return oof, fit(x, y).predict_proba(x_test)


def run(shared: Path, sheet: Path | None = None, only: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(int(os.environ.get("RETINALENS_THREADS", "2")))
    root = shared / "oct-kermany"
    train, test = discover(root / "train"), discover(root / "test")
    classes = train.classes
    samples = train.samples + test.samples
    images = [decode_image(s.path, keep_grey=True) for s in samples]
    names = [str(s.path) for s in samples]
    n = len(train.samples)
    y = np.array([classes.index(s.label) for s in samples])
    folds = make_folds([s.label for s in train.samples], [s.patient for s in train.samples], 5, seed=0).fold
    bb = create_backbone()
    mean = torch.tensor(bb.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.preprocessing.std).view(1, 3, 1, 1)
    fallbacks: dict[str, list[str]] = {"band224": [], "bandtiles224": []}
    variants = {"squash224": squash(224), "squash320": squash(320), "letterbox224": letterbox(224),
                "tiles224": tiles(224), "band224": banded(squash(224), fallbacks["band224"]),
                "bandtiles224": banded(tiles(224), fallbacks["bandtiles224"])}
    variants = {k: v for k, v in variants.items() if not only or k in only}
    rows: dict[str, Any] = {}
    test_patients = [s.patient for s in test.samples]
    for name, variant in variants.items():
        t = time.perf_counter()
        x = pooled_features(bb.model.eval(), mean, std, images, variant, names)
        seconds = time.perf_counter() - t
        oof, p_test = probe(x[:n], y[:n], folds, x[n:])
        fold_acc = [float((oof[folds == f].argmax(1) == y[:n][folds == f]).mean()) for f in range(5)]
        m = classification_metrics(y[n:], p_test, classes, test_patients, positive_classes=["CNV", "DME"],
                                   n_boot=1000, seed=0)
        rows[name] = {"cv_accuracy_mean": round(float(np.mean(fold_acc)), 4),
                      "cv_accuracy_sd": round(float(np.std(fold_acc, ddof=1)), 4),
                      "cv_fold_accuracy": [round(a, 4) for a in fold_acc],
                      "cv_drusen_recall": round(float((oof[y[:n] == classes.index("DRUSEN")].argmax(1)
                                                       == classes.index("DRUSEN")).mean()), 4),
                      "test_accuracy": round(m["accuracy"], 4),
                      "test_accuracy_ci": [round(v, 4) for v in m["accuracy_ci"]],
                      "feature_seconds": round(seconds, 1), "ms_per_scan": round(1000 * seconds / len(images), 1)}
        if name in fallbacks:
            rows[name]["band_fallbacks"] = len(fallbacks[name])
        print(name, rows[name], flush=True)
    if sheet is not None:
        contact_sheet(images, names, sheet)
    if "squash224" in rows:  # the same folds for every variant: the gain per fold is what to read
        base = np.array(rows["squash224"]["cv_fold_accuracy"])
        for r in rows.values():
            gain = np.array(r["cv_fold_accuracy"]) - base
            r["cv_gain_vs_squash224"] = {"mean": round(float(gain.mean()), 4), "sd": round(float(gain.std(ddof=1)), 4),
                                         "folds_won_lost": [int((gain > 0).sum()), int((gain < 0).sum())]}
    best = max(rows, key=lambda k: rows[k]["cv_accuracy_mean"])
    return {"data": "oct-kermany train (619, 5 patient folds, seed 0) / test (129)", "backbone": bb.name,
            "probe": "logistic regression C=0.1 on standardised pooled features (fp32)", "variants": rows,
            "band_margin": MARGIN, "band_min_fraction": MIN_BAND, "best_on_cv": best,
            "band_fallback_files": sorted(set(fallbacks["band224"]))[:20]}


def contact_sheet(images: list[Image.Image], names: list[str], path: Path) -> None:
    """Band crops drawn on scans: the first scan of each size and the tallest and thinnest bands."""
    bands = [(i, retinal_band(img)) for i, img in enumerate(images)]
    found = [(i, b) for i, b in bands if b is not None]
    by_frac = sorted(found, key=lambda ib: (ib[1][1] - ib[1][0]) / images[ib[0]].height)
    firsts = {images[i].size: i for i, _ in reversed(found)}
    pick = list(dict.fromkeys(list(firsts.values()) + [i for i, _ in by_frac[:3] + by_frac[-3:]]))
    pick += [i for i, b in bands if b is None][:4]
    w = 512
    tiles_ = []
    for i in pick:
        img = images[i].convert("RGB")
        b = retinal_band(images[i])
        if b is not None:
            from PIL import ImageDraw
            d = ImageDraw.Draw(img)
            d.rectangle((0, b[0], img.width - 1, b[1] - 1), outline=(255, 0, 0), width=4)
        tiles_.append(img.resize((w, round(img.height * w / img.width))))
    out = Image.new("RGB", (w * 2, sum(t.height for t in tiles_[::2]) + 10))
    y = [0, 0]
    for k, t in enumerate(tiles_):
        out.paste(t, ((k % 2) * w, y[k % 2]))
        y[k % 2] += t.height
    out.save(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("RETINALENS_SHARED_DATA", ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sheet", type=Path)
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    a = ap.parse_args()
    result = run(a.shared, a.sheet, a.only)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
