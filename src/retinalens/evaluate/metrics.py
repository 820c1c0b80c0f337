"""Classification metrics with patient-clustered bootstrap confidence intervals.

Images of one patient are correlated (both eyes, several B-scans of one volume), so resampling
images as if they were independent gives intervals that are too narrow. We resample patients
instead. Every metric here is a function of patient-level counts, so one resample is just a
vector of patient multiplicities and a batch of resamples is a matrix product: 1000 resamples
over ~1000 images take a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from retinalens.errors import RetinaLensError

CI_METHOD = "patient-clustered bootstrap (percentile)"
URGENT_SCORE = "sum of probabilities of the positive classes"
_RATES = ("precision", "recall", "f1", "sensitivity", "specificity")
# Bounds the memory of one batch of resamples: (resamples x images) float64 entries.
_BATCH_ENTRIES = 2_000_000
# An interval from a handful of resamples (a metric undefined in most of them) would be noise.
_MIN_DEFINED_FRACTION = 0.1

_Key = tuple  # ("accuracy",), ("per_class", k, "f1"), ("urgent", "auc"), ...


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[str] | None = None,
    positive_classes: Sequence[str] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    threshold: float = 0.5,
    ordinal: bool = False,
) -> dict:
    """Accuracy, per-class rates, confusion matrix, ROC AUCs and the urgent-referral operating
    point, each with a patient-clustered percentile bootstrap CI.

    Predictions are the argmax of `probs`; the urgent-referral flag is `score >= threshold` where
    the score sums the probabilities of `positive_classes`. `groups` holds one patient id per image
    (None: every image is its own patient). Undefined values (e.g. precision of a class that is never
    predicted) are None, so the result is plain JSON. `ordinal` (classes in order, e.g. DR grades)
    adds the quadratic weighted kappa.
    """
    y, p, names = _check_inputs(y_true, probs, classes)
    patient, n_patients = _patient_index(groups, y.size)
    positives = _positive_indices(positive_classes, names)
    _check_bootstrap(n_boot, level, seed, threshold)

    problem = _Problem.build(y, p, patient, n_patients, positives, threshold, ordinal)
    point = {key: values[0] for key, values in problem.evaluate(np.ones((1, n_patients))).items()}
    boot = _bootstrap(problem, n_patients, y.size, n_boot, seed)

    def value(*key: object) -> float | None:
        return _num(point[key])

    def ci(*key: object) -> list[float] | None:
        return _percentile_ci(boot[key], n_boot, level) if key in boot else None

    per_class = {}
    for k, name in enumerate(names):
        entry: dict = {"support": int(np.sum(y == k))}
        for metric in (*_RATES, "auc"):
            entry[metric] = value("per_class", k, metric)
            entry[f"{metric}_ci"] = ci("per_class", k, metric)
        per_class[name] = entry

    urgent = None
    if positives:
        is_urgent = np.isin(y, positives)
        urgent = {
            "positive_classes": [names[k] for k in positives],
            "score": URGENT_SCORE,
            "threshold": float(threshold),
            "n_positive": int(is_urgent.sum()),
            "n_negative": int((~is_urgent).sum()),
        }
        for metric in ("sensitivity", "specificity", "auc"):
            urgent[metric] = value("urgent", metric)
            urgent[f"{metric}_ci"] = ci("urgent", metric)

    k = len(names)
    return {
        "classes": names,
        "n_images": int(y.size),
        "n_patients": n_patients,
        "accuracy": value("accuracy"),
        "accuracy_ci": ci("accuracy"),
        "roc_auc_macro": value("roc_auc_macro"),
        "roc_auc_macro_ci": ci("roc_auc_macro"),
        "per_class": per_class,
        "confusion_matrix": problem.patient_cm.sum(axis=0).reshape(k, k).astype(int).tolist(),
        "urgent_referral": urgent,
        **({"quadratic_kappa": value("quadratic_kappa"), "quadratic_kappa_ci": ci("quadratic_kappa")} if ordinal else {}),
        "ci": {"method": CI_METHOD, "n_boot": int(n_boot), "level": float(level), "seed": int(seed)},
    }


def roc_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive_classes: Sequence[str] | None = None,
) -> dict:
    """One-vs-rest ROC curves for plotting: {"classes": {name: {"fpr", "tpr"}}, "urgent": {...} | None}.

    A class without both positives and negatives in `y_true` has no curve and is left out.
    """
    from sklearn.metrics import roc_curve  # sklearn is slow to import; only plotting needs it

    y, p, names = _check_inputs(y_true, probs, classes)
    positives = _positive_indices(positive_classes, names)

    def curve(truth: np.ndarray, score: np.ndarray) -> dict | None:
        if truth.all() or not truth.any():
            return None
        fpr, tpr, _ = roc_curve(truth, score)
        return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}

    per_class = {name: curve(y == k, p[:, k]) for k, name in enumerate(names)}
    urgent = curve(np.isin(y, positives), p[:, positives].sum(axis=1)) if positives else None
    return {"classes": {n: c for n, c in per_class.items() if c is not None}, "urgent": urgent}


def _check_inputs(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = [str(c) for c in classes]
    if len(names) < 2 or len(set(names)) != len(names):
        raise RetinaLensError(f"classes must be at least two distinct names, got {names}")
    try:
        y = np.asarray(y_true)
        p = np.asarray(probs, dtype=float)
    except (TypeError, ValueError) as exc:
        raise RetinaLensError(f"y_true and probs must be numeric arrays: {exc}") from exc
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise RetinaLensError("y_true must be a non-empty 1-D array of integer class indices")
    if y.min() < 0 or y.max() >= len(names):
        raise RetinaLensError(f"y_true holds class indices outside 0..{len(names) - 1}")
    if p.shape != (y.size, len(names)):
        raise RetinaLensError(f"probs must have shape (N, K) = {(y.size, len(names))}, got {p.shape}")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise RetinaLensError("probs must be finite probabilities in [0, 1]")
    # Loose tolerance: float32/float16 softmax outputs are off by far more than float64 rounding.
    if not np.allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-3):
        raise RetinaLensError("each row of probs must sum to 1")
    return y.astype(np.intp), p, names


def _patient_index(groups: Sequence[str] | None, n_images: int) -> tuple[np.ndarray, int]:
    """Patient number (0..P-1) of each image, and P."""
    if groups is None:
        return np.arange(n_images), n_images
    ids = list(groups)
    if len(ids) != n_images:
        raise RetinaLensError(f"groups has {len(ids)} entries for {n_images} images")
    if any(g is None for g in ids):
        # Lumping all unknown ids into one "patient" would silently distort the intervals.
        raise RetinaLensError("groups holds a missing (None) patient id")
    _, inverse = np.unique(np.asarray([str(g) for g in ids]), return_inverse=True)
    inverse = inverse.ravel()
    return inverse, int(inverse.max()) + 1


def _positive_indices(positive_classes: Sequence[str] | None, names: list[str]) -> list[int]:
    if isinstance(positive_classes, str):
        positive_classes = [positive_classes]
    unknown = [c for c in positive_classes or () if c not in names]
    if unknown:
        raise RetinaLensError(f"positive classes {unknown} are not among the classes {names}")
    return sorted({names.index(c) for c in positive_classes or ()})


def _check_bootstrap(n_boot: int, level: float, seed: int, threshold: float) -> None:
    if not _is_int(n_boot) or n_boot < 0:
        raise RetinaLensError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not _is_int(seed):
        raise RetinaLensError(f"seed must be an integer, got {seed!r}")
    if not 0 < level < 1:
        raise RetinaLensError(f"level must lie strictly between 0 and 1, got {level!r}")
    if not np.isfinite(threshold):
        raise RetinaLensError(f"threshold must be a finite number, got {threshold!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN (undefined) where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _class_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class rates (B, K) from a batch of confusion matrices (B, K, K), rows = true class."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fn = cm.sum(axis=2) - tp
    fp = cm.sum(axis=1) - tp
    tn = cm.sum(axis=(1, 2))[:, None] - tp - fn - fp
    recall = _ratio(tp, tp + fn)
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        # 2TP / (2TP + FP + FN): defined (as 0) for a class with positives that is never predicted.
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp),
    }


def _quadratic_kappa(cm: np.ndarray) -> np.ndarray:
    """Cohen's kappa with quadratic weights (B,) from confusion matrices (B, K, K): 1 - observed
    over chance-expected squared grade distance (the Kaggle 2015 DR metric)."""
    k = cm.shape[1]
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / max(k - 1, 1) ** 2
    n = cm.sum(axis=(1, 2))
    expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / np.where(n > 0, n, 1)[:, None, None]
    return 1 - _ratio((w * cm).sum(axis=(1, 2)), (w * expected).sum(axis=(1, 2)))


@dataclass(frozen=True)
class _Ranked:
    """One score sorted once, so the ROC AUC under any weighting of the images is a few vector ops."""

    patient: np.ndarray  # patient of each image, in ascending score order
    positive: np.ndarray  # truth of each image, in ascending score order
    starts: np.ndarray  # first sorted position of each run of tied scores

    @classmethod
    def of(cls, score: np.ndarray, positive: np.ndarray, patient: np.ndarray) -> _Ranked:
        order = np.argsort(score, kind="stable")
        s = score[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        return cls(patient[order], positive[order], starts)

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """AUC for each row of patient multiplicities (B, P); NaN without positives or negatives."""
        w = weights[:, self.patient]
        pos = np.add.reduceat(w * self.positive, self.starts, axis=1)
        neg = np.add.reduceat(w * ~self.positive, self.starts, axis=1)
        # Mann-Whitney form: a positive beats every negative scored lower and half of those tied
        # with it; this equals the trapezoidal area under the ROC curve that sklearn reports.
        below = np.cumsum(neg, axis=1) - neg
        wins = np.sum(pos * (below + 0.5 * neg), axis=1)
        return _ratio(wins, pos.sum(axis=1) * neg.sum(axis=1))


@dataclass(frozen=True)
class _Problem:
    """Everything the metrics need, reduced to per-patient counts and pre-sorted scores."""

    patient_cm: np.ndarray  # (P, K*K) confusion counts of each patient's images
    class_scores: list[_Ranked]  # one-vs-rest score of each class
    macro_classes: list[int]  # classes with positives and negatives: the macro AUC averages these
    urgent_cm: np.ndarray | None  # (P, 4) counts of (truly urgent, flagged) pairs per patient
    urgent_score: _Ranked | None
    ordinal: bool = False

    @classmethod
    def build(
        cls,
        y: np.ndarray,
        p: np.ndarray,
        patient: np.ndarray,
        n_patients: int,
        positives: list[int],
        threshold: float,
        ordinal: bool = False,
    ) -> _Problem:
        k = p.shape[1]

        def counts(true: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
            cells = (patient * n + true) * n + pred
            return np.bincount(cells, minlength=n_patients * n * n).reshape(n_patients, n * n)

        support = np.bincount(y, minlength=k)
        urgent_cm = urgent_score = None
        if positives:
            is_urgent = np.isin(y, positives)
            score = p[:, positives].sum(axis=1)
            flagged = (score >= threshold).astype(np.intp)
            urgent_cm = counts(is_urgent.astype(np.intp), flagged, 2).astype(float)
            urgent_score = _Ranked.of(score, is_urgent, patient)
        return cls(
            patient_cm=counts(y, p.argmax(axis=1), k).astype(float),
            class_scores=[_Ranked.of(p[:, c], y == c, patient) for c in range(k)],
            # Fixed from the full data: a resample missing one of these classes has no macro AUC
            # (and is skipped) rather than a macro AUC over fewer classes.
            macro_classes=[c for c in range(k) if 0 < support[c] < y.size],
            urgent_cm=urgent_cm,
            urgent_score=urgent_score,
            ordinal=ordinal,
        )

    def evaluate(self, weights: np.ndarray) -> dict[_Key, np.ndarray]:
        """Every metric for a batch of patient multiplicities (B, P): arrays (B,), NaN = undefined."""
        k = len(self.class_scores)
        cm = (weights @ self.patient_cm).reshape(-1, k, k)
        out: dict[_Key, np.ndarray] = {
            ("accuracy",): _ratio(np.trace(cm, axis1=1, axis2=2), cm.sum(axis=(1, 2)))
        }
        for metric, values in _class_rates(cm).items():
            for c in range(k):
                out[("per_class", c, metric)] = values[:, c]
        aucs = [ranked.auc(weights) for ranked in self.class_scores]
        for c in range(k):
            out[("per_class", c, "auc")] = aucs[c]
        out[("roc_auc_macro",)] = (
            np.mean([aucs[c] for c in self.macro_classes], axis=0)
            if self.macro_classes
            else np.full(len(weights), np.nan)
        )
        if self.ordinal:
            out[("quadratic_kappa",)] = _quadratic_kappa(cm)
        if self.urgent_cm is not None and self.urgent_score is not None:
            # Class 1 of the 2x2 table is "urgent": its recall is the sensitivity, and the recall
            # of class 0 (non-urgent correctly not flagged) is the specificity.
            recall = _class_rates((weights @ self.urgent_cm).reshape(-1, 2, 2))["recall"]
            out[("urgent", "sensitivity")] = recall[:, 1]
            out[("urgent", "specificity")] = recall[:, 0]
            out[("urgent", "auc")] = self.urgent_score.auc(weights)
        return out


def _bootstrap(
    problem: _Problem, n_patients: int, n_images: int, n_boot: int, seed: int
) -> dict[_Key, np.ndarray]:
    """Every metric on `n_boot` patient resamples, in batches that bound memory."""
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_ENTRIES // n_images)
    results = []
    for start in range(0, n_boot, batch):
        b = min(batch, n_boot - start)
        draws = rng.integers(0, n_patients, size=(b, n_patients))
        # Multiplicity of each patient in each resample: a patient drawn twice counts twice.
        cells = (draws + n_patients * np.arange(b)[:, None]).ravel()
        weights = np.bincount(cells, minlength=b * n_patients).reshape(b, n_patients)
        results.append(problem.evaluate(weights.astype(float)))
    if not results:
        return {}
    return {key: np.concatenate([r[key] for r in results]) for key in results[0]}


def _percentile_ci(values: np.ndarray, n_boot: int, level: float) -> list[float] | None:
    defined = values[~np.isnan(values)]
    if defined.size == 0 or defined.size < _MIN_DEFINED_FRACTION * n_boot:
        return None
    lo, hi = np.quantile(defined, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
