"""Calibration (temperature scaling, ECE, reliability) and the referral operating point.

A head's softmax is usually over-confident. Temperature scaling (Guo et al., ICML 2017) divides the
logits by one T > 0 fitted on validation; it changes no argmax, so accuracy is untouched. The heads
give probabilities, and log-probabilities are the logits up to a per-row constant that softmax
ignores, so `calibrated` works from probabilities alone (any head, any runtime).

The referral decision ("refer": CNV or DME for OCT, referable DR for fundus) is P(positive) = the sum
of the positive classes' probabilities against a threshold fitted on validation to reach a target
sensitivity: in screening a missed referral costs more than a needless one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import RunConfigBase, default
from ..errors import RetinaLensError

ECE_BINS = 15
DEFAULT_TARGET_SENSITIVITY = default(RunConfigBase, "target_sensitivity")  # written once, in the run config
_T_RANGE = (0.05, 20.0)  # a fitted T outside this means a degenerate validation set, not a calibration
_TINY = 1e-300  # log(0) guard: a probability that underflowed stays the least likely class


def calibrated(probs: np.ndarray, temperature: float | None) -> np.ndarray:
    """Probabilities (N, K) -> temperature-scaled probabilities (float64). None or 1: unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature is None or temperature == 1.0 or p.size == 0:
        return p
    z = np.log(np.clip(p, _TINY, None)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, dtype=np.float64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _TINY, None))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 minimising the NLL of `calibrated(probs, T)` on labelled (validation) data."""
    from scipy.optimize import minimize_scalar

    p, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise RetinaLensError(f"temperature fitting needs probabilities (N, K) and N labels, got {p.shape} and {len(y)}")
    lo, hi = np.log(_T_RANGE)
    res = minimize_scalar(lambda log_t: nll(calibrated(p, float(np.exp(log_t))), y), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    return t if nll(calibrated(p, t), y) < nll(p, y) else 1.0  # never worse than no scaling on its own data


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Reliability diagram data: per equal-width confidence bin (lo, hi], the mean confidence (of the
    argmax), the accuracy and the count. Empty bins have count 0 and confidence/accuracy None."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    return {"confidence": [float(s / n) if n else None for s, n in zip(conf_sum, count)],
            "accuracy": [float(s / n) if n else None for s, n in zip(acc_sum, count)],
            "count": [int(n) for n in count]}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    r = reliability(probs, y, bins)
    n = sum(r["count"])
    return float(sum(c * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c) / max(n, 1))


def fit_calibration(probs: np.ndarray, y: np.ndarray, folds: np.ndarray | None = None) -> dict[str, Any]:
    """The manifest's `calibration` section, fitted on validation probabilities, or on out-of-fold
    predictions when `folds` (each row's cross-validation fold) is given.

    Out of fold, the temperature is itself judged out of fold: each fold's predictions are scaled by
    the T fitted on the other folds' (cross-fitting), and T is kept (refitted on them all) only when
    that lowers the NLL; otherwise the bundle keeps T = 1. On one validation split T is fitted and
    measured on the same images, so it never raises their NLL but may raise their ECE (issue seen
    in practice: ECE is measured in bins, NLL is what T minimises)."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    if folds is None:
        t = fit_temperature(p, y)
        after, fitted_on = calibrated(p, t), "validation"
    else:
        folds = np.asarray(folds)
        after = np.empty_like(p)
        for f in np.unique(folds):
            rest = folds != f
            after[~rest] = calibrated(p[~rest], fit_temperature(p[rest], y[rest]))
        t = fit_temperature(p, y) if nll(after, y) < nll(p, y) else 1.0
        after = after if t != 1.0 else p
        fitted_on = f"out-of-fold predictions ({len(np.unique(folds))}-fold cross-validation; T cross-fitted)"
    before_bins, after_bins = reliability(p, y), reliability(after, y)
    return {"method": "temperature scaling", "fitted_on": fitted_on, "temperature": t, "kept": t != 1.0,
            "n_images": len(y), "nll_before": nll(p, y), "nll_after": nll(after, y),
            "ece_before": expected_calibration_error(p, y), "ece_after": expected_calibration_error(after, y),
            "ece_bins": ECE_BINS, "bin_counts_before": before_bins["count"], "bin_counts_after": after_bins["count"]}


def positive_score(probs: np.ndarray, classes: Sequence[str], positive_classes: Sequence[str]) -> np.ndarray:
    """P(referral): the summed probabilities of the positive classes, one per row."""
    cols = [list(classes).index(c) for c in positive_classes]
    return np.asarray(probs, dtype=np.float64)[:, cols].sum(axis=1)


def referral_threshold(score: np.ndarray, positive: np.ndarray,
                       target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> dict[str, float]:
    """The highest threshold t with sensitivity(score >= t) >= target on these (validation) data."""
    if not 0 < target_sensitivity <= 1:
        raise RetinaLensError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any():
        raise RetinaLensError("no positive (referable) image to fit a referral threshold on")
    pos = np.sort(score[positive])[::-1]
    need = int(np.ceil(target_sensitivity * len(pos) - 1e-9))  # positives that must score >= t
    t = float(pos[max(need, 1) - 1])
    flagged = score >= t
    neg = ~positive
    return {"threshold": t, "target_sensitivity": float(target_sensitivity),
            "val_sensitivity": float(flagged[positive].mean()),
            "val_specificity": float((~flagged[neg]).mean()) if neg.any() else None}  # type: ignore[dict-item]
