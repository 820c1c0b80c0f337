"""Fundus referable DR: the squashed photo (the default input) against its field of view, on train's folds.

Rows, each EfficientNet-Lite0 at 224 px, traced, at the precision `auto` picks, `--head auto` on the
cached features (the conv head and logistic regression at C 0.01, 0.1, 1, chosen on mean fold
accuracy, as `train` chooses), and the logistic-regression baseline (C=0.1) on the same features:
- squash: the whole photo resized to 224x224 (Preprocessing.pixels: what `train --task referable` does);
- fov: the photo cropped to its field of view and padded to a square with the disc centred
  (data/fundus/crop.py prepare_image: what `retinalens prepare fundus` writes), then the same;
- fov+contrast: the same with Graham's contrast normalisation (`prepare fundus --contrast`).
A wide photo's disc (IDRiD: 4288x2848) fills more of the input once cropped, and is no longer squeezed
into an ellipse; Graham's normalisation evens out illumination. Whether either helps frozen ImageNet
features is what this measures.

Data and folds: bench_fundus_cv's split (IDRiD + the Kaggle sample, 108 test photos untouched until the
choice), the training photos and patient folds `train` makes (fundus_folds.py), near-duplicate pairs
found on the squashed photos' features (a default `train`'s), the same folds for every row.
The rule (bench_views'), written to disk before test is read: a variant replaces the squash when its
`--head auto` row beats the squash's on >= 4 of 5 folds (ROC-AUC of the referable class) with a mean
gain above sd(gains)/sqrt(5). Then test, once, for every row (`test_after_choice`: it chooses nothing).

`python benchmarks/bench_fundus_fov.py [DATA]`; RETINALENS_BENCH_WORK as bench_fundus_cv's (the
photo links and the feature caches, `cache-VARIANT`, are kept between runs); RETINALENS_THREADS.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_fundus_cv import (BASELINE_C, _decode_all, _fold_scores, _work, beats_baseline, logreg_oof,  # noqa: E402
                             logreg_test, summarise, test_auc)
from fundus_folds import auto_head, inputs, photos, training_folds  # noqa: E402

BACKBONE = "efficientnet_lite0"
VARIANTS: dict[str, bool | None] = {"squash": None, "fov": False, "fov+contrast": True}  # None: no crop; else contrast


def _pixels(img: Any, pre: Any, contrast: bool | None) -> tuple[torch.Tensor, bool]:
    """The model input of one decoded photo in a variant, and whether the crop fell back on the squash
    (a photo in which prepare_image finds no usable field of view)."""
    from retinalens.data.fundus.crop import UnusableFundusError, prepare_image

    if contrast is None:
        return pre.pixels(img), False
    try:
        return pre.pixels(prepare_image(img, size=pre.size, contrast=contrast)), False
    except UnusableFundusError:
        return pre.pixels(img), True


def extract(paths: list[Path], hashes: list[str], work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every variant's features into its own cache (the photos' sha256s key them: one cache per
    variant); returns the caches and, per variant, seconds and fallbacks."""
    from retinalens.features.extract import open_cache
    from retinalens.models.registry import create_backbone, resolve_precision

    precision, bb = resolve_precision("auto"), create_backbone(BACKBONE)
    caches = {v: open_cache(work / f"cache-{v}", bb, precision) for v in VARIANTS}
    report: dict[str, Any] = {"precision": precision}
    images = None
    for variant, contrast in VARIANTS.items():
        if not caches[variant].missing(hashes):
            continue
        images = images if images is not None else _decode_all(paths)
        t, fell_back, pooled, spatial = time.perf_counter(), 0, [], []
        for i in range(0, len(images), 16):
            done = [_pixels(img, bb.preprocessing, contrast) for img in images[i:i + 16]]
            fell_back += sum(f for _, f in done)
            s, p = bb.encode(torch.stack([x for x, _ in done]), precision)
            spatial.append(s.numpy())
            pooled.append(p.numpy())
        caches[variant].write_chunk(list(hashes), np.concatenate(pooled), np.concatenate(spatial))
        report[variant] = {"seconds": round(time.perf_counter() - t, 1), "fell_back_on_squash": fell_back}
        print(f"{variant}: {report[variant]}", flush=True)
    return caches, report


def run(shared: Path) -> dict[str, Any]:
    from retinalens.models.heads import head_probabilities
    from retinalens.train.cv import refit
    from retinalens.train.trainer import TrainConfig

    torch.set_num_threads(int(os.environ.get("RETINALENS_THREADS", "2")))
    work = _work()
    _, n_photos, ds, hashes = photos(shared, work)
    load0 = os.getloadavg()[0]
    caches, report = extract([s.path for s in ds.samples], hashes, work)
    data, tr, te, y, y_test, patients, test_patients, folds = training_folds(ds, hashes, caches["squash"])
    keys, test_keys = [hashes[i] for i in tr], [hashes[i] for i in te]
    shape = caches["squash"].key.feature_shape
    rows: dict[str, Any] = {}
    fitted: dict[str, Any] = {}
    base = None  # the squash's --head auto fold scores: every other row's gain is against them
    for variant in VARIANTS:
        cache = caches[variant]
        t = time.perf_counter()
        _, auto = auto_head(cache, keys, y, folds, shape)
        name = f"{variant}: --head auto (chose {auto.candidate.name})"
        rows[name] = summarise(auto.oof[:, 1], y, folds, patients, base, time.perf_counter() - t)
        if base is None:
            base = _fold_scores(auto.oof[:, 1], y, folds)
        fitted[name] = ("auto", variant, auto)
        print(name, json.dumps(rows[name]), flush=True)
        pooled = cache.pooled(keys)
        name = f"{variant}: logistic-regression baseline C={BASELINE_C:g}"
        rows[name] = summarise(logreg_oof(pooled, None, y, folds, BASELINE_C), y, folds, patients, base, 0.0)
        fitted[name] = ("logreg", variant, None)
        print(name, json.dumps(rows[name]), flush=True)
    auto_rows = [n for n in rows if "--head auto" in n]
    winners = [n for n in auto_rows[1:] if beats_baseline(rows[n])]
    chosen = max(winners, key=lambda n: rows[n]["cv_auc_mean"]) if winners else auto_rows[0]
    result: dict[str, Any] = {
        "data": f"IDRiD + Kaggle DR sample ({n_photos} photos), referable = grade >= 2; train {len(tr)} photos "
                f"({len(set(patients))} patients, near-duplicates of test photos removed) in {folds.k} patient folds; "
                f"test {len(te)} photos ({len(set(test_patients))} patients)",
        "folds": folds.record([ds.samples[i].label for i in tr], patients), "features": report,
        "removed_near_duplicates_of_test": len(data.splits.removed), "linked_patients": len(data.linked),
        "load_average_1min_at_start": round(load0, 2), "rows": rows, "chosen": chosen,
        "rule": "a variant's --head auto row replaces the squash's when it wins >= 4 of 5 folds (AUC) with a mean "
                "gain above sd/sqrt(5); every row's gain_vs_baseline is against the squash's --head auto row"}
    (work / "fov-rows.json").write_text(json.dumps(result, indent=1))  # the choice is on disk before test is read

    def test_probs(name: str) -> np.ndarray:
        kind, variant, auto = fitted[name]
        cache = caches[variant]
        if kind == "logreg":
            return logreg_test(cache.pooled(keys), None, y, cache.pooled(test_keys), None, BASELINE_C)
        head = refit(auto, inputs(cache, keys), y, num_classes=2, feature_shape=shape, train=TrainConfig()).head
        x = cache.pooled(test_keys) if auto.candidate.head.input_kind == "pooled" else cache.spatial(test_keys)
        return head_probabilities(head, x)[:, 1]

    result["test_after_choice"] = {name: test_auc(y_test, test_probs(name), test_patients) for name in rows}
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return result


if __name__ == "__main__":
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("RETINALENS_SHARED_DATA",
                                                                          ROOT.parent / "shared" / "data"))
    text = json.dumps(run(data), indent=1)
    print(text)
    (_work() / "result-fov.json").write_text(text)
