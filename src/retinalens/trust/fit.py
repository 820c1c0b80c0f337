"""Everything a bundle needs to be trusted in use, fitted on its validation split in one call:
calibration (temperature), the referral operating point and the quality / out-of-distribution gate.
Both training paths (bottleneck and image modes) call `fit_trust` just before saving the bundle."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._console import console
from ..data.transforms import Preprocessing
from .calibration import (
    DEFAULT_TARGET_SENSITIVITY,
    calibrated,
    fit_calibration,
    positive_score,
    referral_threshold,
)
from .gate import MIN_VALIDATION, fit_gate
from .statistics import ALL_STATISTICS, file_statistics

MAX_STATISTICS_IMAGES = 2000  # validation images decoded again for the statistics (evenly spaced beyond this)


def fit_trust(*, val_probs: np.ndarray, val_y: np.ndarray, classes: Sequence[str], positive_classes: Sequence[str],
              train_pooled: np.ndarray, val_pooled: np.ndarray, val_paths: Sequence[Path],
              preprocessing: Preprocessing, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
              workers: int = 0, seed: int = 0, folds: np.ndarray | None = None,
              ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Manifest sections {"calibration", "thresholds", "gate"} and the bundle files they need.

    val_probs: the head's (uncalibrated) probabilities on validation; val_y: class indices;
    train_pooled / val_pooled: the bundle backbone's pooled features; val_paths: the validation
    images (decoded again for the image statistics), in the order of the other validation arrays.
    With cross-validation, val_probs / val_y are the out-of-fold predictions of every training image
    and `folds` their folds (calibration and the referral threshold are fitted on them), and the
    gate's arrays are one fold's held-out images against the rest.
    """
    say = console()
    val_y = np.asarray(val_y)
    if len(val_y) == 0:
        say.print("[yellow]note: no validation images, so no calibration, referral threshold or quality gate[/]")
        return {}, {}
    calibration = fit_calibration(val_probs, val_y, folds)
    probs = calibrated(val_probs, calibration["temperature"])
    where = "validation" if folds is None else "out-of-fold"
    ece = (f"{where} NLL {calibration['nll_before']:.3f} -> {calibration['nll_after']:.3f}, "
           f"ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f} ({calibration['ece_bins']} bins)")
    kept = "" if calibration["kept"] or folds is None else ", dropped: it did not lower the out-of-fold NLL"
    notes = [f"calibration T={calibration['temperature']:.2f} ({ece}{kept})"]

    thresholds: dict[str, Any] = {}
    positives = [list(classes).index(c) for c in positive_classes]
    is_pos = np.isin(val_y, positives)
    if positives and is_pos.any():
        thresholds["referral"] = referral_threshold(positive_score(probs, classes, positive_classes), is_pos,
                                                    target_sensitivity) | {"positive_classes": list(positive_classes)}
        r = thresholds["referral"]
        notes.append(f"referral threshold {r['threshold']:.3f} ({where} sensitivity {r['val_sensitivity']:.3f}"
                     + (f", specificity {r['val_specificity']:.3f})" if r["val_specificity"] is not None else ")"))
    elif positives:
        notes.append("no referral threshold (no referable image in validation)")

    sections: dict[str, Any] = {"calibration": calibration, "thresholds": thresholds}
    files: dict[str, bytes] = {}
    stats = _validation_statistics(list(val_paths), preprocessing, workers)
    fitted = fit_gate(stats, train_pooled, val_pooled, seed=seed)
    if fitted is None:
        notes.append(f"no quality gate (it needs at least {MIN_VALIDATION} readable validation images)")
    else:
        sections["gate"], files = fitted
        v = sections["gate"]["validation"]
        notes.append(f"quality gate: {v['n_rejected']} of {v['n_checked']} validation images ungradable")
    say.print("; ".join(notes))
    return sections, files


def _validation_statistics(paths: list[Path], preprocessing: Preprocessing, workers: int) -> dict[str, np.ndarray]:
    """Image statistics of the validation images (NaN rows beyond the evenly spaced sample)."""
    n = len(paths)
    rows = np.arange(n) if n <= MAX_STATISTICS_IMAGES else np.linspace(0, n - 1, MAX_STATISTICS_IMAGES).round().astype(int)
    sample, _ = file_statistics([paths[i] for i in rows], preprocessing, workers=workers)
    out = {k: np.full(n, np.nan) for k in ALL_STATISTICS}
    for k in ALL_STATISTICS:
        out[k][rows] = sample[k]
    return out
