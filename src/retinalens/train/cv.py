"""Cross-validated selection inside the training data, then a refit on all of it.

One validation split of ~90 scans moves 1.1 points per scan, so choosing a head on it is mostly
noise. Here every training image is held out once: patient-grouped, stratified k-fold
(scikit-learn's StratifiedGroupKFold), the same folds for every candidate. Each candidate (a head
and its hyperparameter: C for logistic regression, the epoch count for a trained head) gets
out-of-fold (OOF) probabilities for every training image; the one with the best mean fold accuracy
(then the lower OOF NLL) is chosen and refitted on every training image with what was chosen, as
GridSearchCV(refit=True) does. Calibration and the referral threshold are then fitted on the
chosen candidate's OOF probabilities (trust/fit.py). The test split is never seen here.

A trained head's epoch count: each fold trains cfg.epochs epochs with the LR schedule on its
training loss (no early stopping; train/loop.py select=False) and records its held-out
probabilities after every epoch; the epoch count with the best mean held-out score (cfg.monitor)
is chosen, its OOF probabilities are those of that epoch, and the refit trains exactly that many
epochs on the same schedule.

The API the rest of the package uses: `make_folds` (the folds and their record), `Candidate`,
`default_candidates`, `cross_validate` (OOF results of one candidate), `select` and `refit`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import RetinaLensError
from ..models.heads import HeadConfig, head_probabilities
from ..trust.calibration import nll
from .trainer import TrainConfig, TrainResult, fit_logistic, train_head

LOGREG_CS = (0.01, 0.1, 1.0)  # the C grid of the logistic head
BASELINE_C = 0.1  # the logistic-regression baseline every run is measured against


@dataclass(frozen=True)
class Folds:
    """fold[i]: the fold in which training image i is held out (0 .. k-1)."""

    fold: np.ndarray
    k: int

    def split(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(fit indices, held-out indices) of fold f."""
        return np.flatnonzero(self.fold != f), np.flatnonzero(self.fold == f)

    def record(self, labels: Sequence[str], patients: Sequence[str]) -> dict[str, Any]:
        """What the manifest keeps of the folds: sizes, classes, and a digest of each fold's patients
        (sha256 of the sorted patient ids), so that two bundles can be shown to share folds."""
        folds = []
        for f in range(self.k):
            idx = np.flatnonzero(self.fold == f)
            ids = sorted({patients[i] for i in idx})
            folds.append({"n_images": int(len(idx)), "n_patients": len(ids),
                          "per_class": dict(sorted(Counter(labels[i] for i in idx).items())),
                          "patients_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()})
        digest = hashlib.sha256("\n".join(f["patients_sha256"] for f in folds).encode()).hexdigest()
        return {"k": self.k, "grouped_by": "patient", "stratified_by": "label", "folds": folds, "digest": digest}


def make_folds(labels: Sequence[str], groups: Sequence[str], k: int, seed: int = 0) -> Folds:
    """Patient-grouped, stratified k folds of the training images (`groups`: one patient id each;
    images that must stay together, such as near-duplicates, share one)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    if k < 2:
        raise RetinaLensError(f"cross-validation needs at least 2 folds, got {k}")
    if n_groups < k:
        raise RetinaLensError(f"{k}-fold cross-validation needs at least {k} patients; the training data has "
                              f"{n_groups} (use --cv 0 for one validation split)")
    fold = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), np.asarray(labels), np.asarray(groups))):
        fold[held] = f
    if (np.bincount(fold, minlength=k) == 0).any():
        raise RetinaLensError(f"{k}-fold cross-validation left a fold empty: too few patients (use a smaller --cv)")
    return Folds(fold, k)


@dataclass(frozen=True)
class Candidate:
    """A head and its hyperparameters. `c`: logistic regression's C; a trained head chooses its epochs."""

    head: HeadConfig
    c: float | None = None

    @property
    def name(self) -> str:
        return f"logreg C={self.c:g}" if self.head.kind == "logreg" else self.head.kind


def default_candidates(head: HeadConfig, auto: bool) -> list[Candidate]:
    """`--head auto`: the conv head and the logistic head at each C (the baseline's C among them, so
    the chosen model is never below the baseline on the CV score); otherwise the head asked for."""
    kinds = ("conv", "logreg") if auto else (head.kind,)
    out: list[Candidate] = []
    for kind in kinds:
        if kind == "logreg":
            out += [Candidate(replace(head, kind="logreg", dropout=0.0), c) for c in LOGREG_CS]
        else:
            out.append(Candidate(replace(head, kind=kind)))
    return out


@dataclass
class CVResult:
    """One candidate's cross-validation: OOF probabilities of every training image and the scores."""

    candidate: Candidate
    oof: np.ndarray  # (N, K) probabilities, each row from the fold that held the image out
    fold_accuracy: list[float]
    epochs: int | None = None  # a trained head's chosen epoch count
    fold_best_epochs: list[int] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: mean held-out loss / accuracy

    def summary(self, y: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.candidate.name, "head": self.candidate.head.kind,
                               **spread(self.fold_accuracy), "fold_accuracy": [float(a) for a in self.fold_accuracy],
                               "oof_accuracy": float((self.oof.argmax(1) == y).mean()), "oof_nll": nll(self.oof, y)}
        if self.candidate.c is not None:
            out["C"] = self.candidate.c
        if self.epochs is not None:
            out |= {"epochs": self.epochs, "fold_best_epochs": self.fold_best_epochs}
        return out


Inputs = Callable[[str], np.ndarray]  # input kind ("pooled" | "spatial") -> features of every training image


def cross_validate(candidate: Candidate, inputs: Inputs, y: np.ndarray, folds: Folds, *, num_classes: int,
                   feature_shape: tuple[int, int, int], train: TrainConfig, progress: bool = False) -> CVResult:
    """Out-of-fold probabilities and fold accuracies of one candidate on these folds."""
    x = inputs(candidate.head.input_kind)
    oof = np.zeros((len(y), num_classes))
    if candidate.head.kind == "logreg":
        for f in range(folds.k):
            fit, held = folds.split(f)
            head, _ = fit_logistic(x[fit], y[fit], float(candidate.c), num_classes=num_classes,  # type: ignore[arg-type]
                                   feature_shape=feature_shape, seed=train.seed)
            oof[held] = head_probabilities(head, x[held])
        return CVResult(candidate, oof, fold_accuracy(oof, y, folds.fold))
    cfg = replace(train, head=candidate.head, early_stopping=0)
    per_fold: list[list[np.ndarray]] = []
    histories = []
    for f in range(folds.k):
        fit, held = folds.split(f)
        record: list[np.ndarray] = []
        r = train_head(x[fit], y[fit], x[held], y[held], num_classes=num_classes, feature_shape=feature_shape,
                       cfg=cfg, progress=progress, select=False, record=record)
        per_fold.append(record)
        histories.append(r.history)
    n_epochs = min(len(h) for h in histories)
    curve = [{"epoch": e + 1, "val_loss": float(np.mean([h[e]["val_loss"] for h in histories])),
              "val_acc": float(np.mean([h[e]["val_acc"] for h in histories]))} for e in range(n_epochs)]
    # Ties go to the fewer epochs (cheaper, and what the plateau would have reached first).
    key = (lambda e: curve[e]["val_loss"]) if train.monitor == "val_loss" else (lambda e: -curve[e]["val_acc"])
    best = min(range(n_epochs), key=key)
    for f in range(folds.k):
        oof[folds.split(f)[1]] = per_fold[f][best]
    fold_best = [int(min(range(len(h)), key=lambda e, h=h: h[e]["val_loss"] if train.monitor == "val_loss"
                         else -h[e]["val_acc"])) + 1 for h in histories]
    return CVResult(candidate, oof, fold_accuracy(oof, y, folds.fold), best + 1, fold_best, curve)


def fold_accuracy(oof: np.ndarray, y: np.ndarray, fold: np.ndarray) -> list[float]:
    """Accuracy of out-of-fold probabilities within each fold present (fold[i]: the fold that held image i
    out), in fold order: how every candidate, image-mode run and ensemble is scored."""
    return [float((oof[fold == f].argmax(1) == y[fold == f]).mean()) for f in np.unique(fold)]


def spread(fold_acc: Sequence[float]) -> dict[str, float]:
    """Mean and sd (ddof 1; 0 for one fold) of fold accuracies: what the comparison rule reads."""
    acc = np.asarray(fold_acc, dtype=float)
    return {"accuracy_mean": float(acc.mean()), "accuracy_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0}


def select(results: Sequence[CVResult], y: np.ndarray) -> CVResult:
    """The best mean fold accuracy, then the lower OOF NLL (never the test split: it is not here)."""
    return max(results, key=lambda r: (float(np.mean(r.fold_accuracy)), -nll(r.oof, y)))


def refit(chosen: CVResult, inputs: Inputs, y: np.ndarray, *, num_classes: int, feature_shape: tuple[int, int, int],
          train: TrainConfig, progress: bool = False) -> TrainResult:
    """The chosen candidate fitted on every training image (each exactly once), with its chosen C or
    epoch count. Its history's validation columns are the folds' mean held-out curve."""
    cand = chosen.candidate
    x = inputs(cand.head.input_kind)
    if cand.head.kind == "logreg":
        head, train_acc = fit_logistic(x, y, float(cand.c), num_classes=num_classes,  # type: ignore[arg-type]
                                       feature_shape=feature_shape, seed=train.seed)
        row = {"epoch": 1, "train_loss": float("nan"), "train_acc": train_acc, "val_loss": nll(chosen.oof, y),
               "val_acc": float((chosen.oof.argmax(1) == y).mean()), "lr": 0.0}
        return TrainResult(head, 1, [row], {"val_loss": row["val_loss"], "val_acc": row["val_acc"], "C": cand.c})
    cfg = replace(train, head=cand.head, epochs=int(chosen.epochs or train.epochs), early_stopping=0)
    r = train_head(x, y, None, None, num_classes=num_classes, feature_shape=feature_shape, cfg=cfg,
                   progress=progress, select=False)
    for row, cv_row in zip(r.history, chosen.curve):
        row["val_loss"], row["val_acc"] = cv_row["val_loss"], cv_row["val_acc"]
    return TrainResult(r.head, r.best_epoch, r.history,
                       {"val_loss": nll(chosen.oof, y), "val_acc": float((chosen.oof.argmax(1) == y).mean())})


def baseline_summary(base: CVResult, y: np.ndarray, k: int) -> dict[str, Any]:
    """The manifest's training.baseline_logistic_regression from the baseline's CV result."""
    b = base.summary(y)
    return {"val_acc": b["accuracy_mean"], "val_loss": b["oof_nll"], "C": BASELINE_C, "accuracy_sd": b["accuracy_sd"],
            "source": f"{k}-fold cross-validation, mean over folds"}


@dataclass
class Selection:
    """Cross-validated selection and its refit: what `train` keeps of it."""

    chosen: CVResult
    results: list[CVResult]
    refit: TrainResult
    baseline: dict[str, Any]  # the logistic-regression baseline (C=BASELINE_C) on the same folds
    record: dict[str, Any]  # the manifest's training.cv: folds, every candidate's CV mean and spread, the choice


def select_and_refit(candidates: Sequence[Candidate], inputs: Inputs, y: np.ndarray, folds: Folds, *,
                     labels: Sequence[str], patients: Sequence[str], num_classes: int,
                     feature_shape: tuple[int, int, int], train: TrainConfig, progress: bool = False) -> Selection:
    """Cross-validate every candidate on the same folds, choose (`select`), refit on all (`refit`)."""
    results = [cross_validate(c, inputs, y, folds, num_classes=num_classes, feature_shape=feature_shape, train=train,
                              progress=progress) for c in candidates]
    base = next((r for r in results if r.candidate.head.kind == "logreg" and r.candidate.c == BASELINE_C), None)
    if base is None:
        base = cross_validate(Candidate(HeadConfig(kind="logreg", dropout=0.0), BASELINE_C), inputs, y, folds,
                              num_classes=num_classes, feature_shape=feature_shape, train=train)
    chosen = select(results, y)
    fitted = refit(chosen, inputs, y, num_classes=num_classes, feature_shape=feature_shape, train=train,
                   progress=progress)
    baseline = baseline_summary(base, y, folds.k)
    record = folds.record(labels, patients) | {
        "candidates": [r.summary(y) for r in results], "chosen": chosen.candidate.name,
        "by": "mean fold accuracy, then out-of-fold NLL; refitted on every training image",
        "refit": {"n_images": int(len(y)), **({"epochs": chosen.epochs} if chosen.epochs else {}),
                  **({"C": chosen.candidate.c} if chosen.candidate.c is not None else {})}}
    return Selection(chosen, results, fitted, baseline, record)
