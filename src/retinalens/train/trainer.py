"""Train a shallow head on cached features (the bottleneck method).

Adam 1e-3, halve the learning rate after 5 epochs without validation improvement (floor 5e-5),
keep the best epoch by the validation metric (never the test set), stop early when it stalls.
Seeded: two runs with the same seed give the same weights bit for bit.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import TrainConfigBase
from ..errors import RetinaLensError
from ..models.heads import HeadConfig, create_head, head_probabilities
from ..models.registry import autocast, resolve_precision
from .loop import CURVE_COLUMNS, EpochTotals, run_epochs


@dataclass
class TrainConfig(TrainConfigBase):
    """How a head is trained (TrainConfigBase: every default there) and which head."""

    head: HeadConfig = field(default_factory=HeadConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["head"] = HeadConfig.from_dict(d.get("head", {}))
        return cls(**d)


@dataclass
class TrainResult:
    head: nn.Module
    best_epoch: int
    history: list[dict[str, float]]
    val_metrics: dict[str, float]

    @property
    def has_curves(self) -> bool:
        return len(self.history) > 1  # a fitted logistic head has no epochs to plot

    def curves_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        return buf.getvalue()


def check_train_config(cfg: TrainConfig) -> None:
    """Every option checked before any work is done (train_bundle calls this before extracting)."""
    if cfg.monitor not in ("val_loss", "val_acc"):
        raise RetinaLensError(f"--monitor must be val_loss or val_acc, not {cfg.monitor!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise RetinaLensError(f"need --epochs >= 1, --batch-size >= 1 and --lr > 0 (got {cfg.epochs}, {cfg.batch_size}, {cfg.lr})")
    resolve_precision(cfg.precision)


def class_weights_for(y: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(y, minlength=k).float().clamp(min=1)
    return counts.sum() / (k * counts)


@torch.no_grad()
def _evaluate(head: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, batch: int,
              record: list[np.ndarray] | None = None) -> tuple[float, float]:
    """(loss, accuracy) on held-out data; `record`, when given, gets this epoch's probabilities appended."""
    head.eval()
    loss, correct, probs = 0.0, 0, []
    for i in range(0, len(y), batch):
        logits = head(x[i:i + batch].float())
        loss += float(loss_fn(logits, y[i:i + batch])) * len(logits)
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        if record is not None:
            probs.append(torch.softmax(logits, dim=1).double().numpy())
    if record is not None:
        record.append(np.concatenate(probs))
    return loss / len(y), correct / len(y)


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None, *,
               num_classes: int, feature_shape: tuple[int, int, int], cfg: TrainConfig,
               progress: bool = True, select: bool = True, record: list[np.ndarray] | None = None) -> TrainResult:
    """x_*: (N, H, W, C) float16 maps for the conv head, (N, C) float32 vectors for the pooled head.

    `select=False`: exactly cfg.epochs epochs, the last kept (train/loop.py); x_val may then be None
    (a refit on every training image). `record`: the held-out probabilities of every epoch are
    appended to it (cross-validation reads them at the epoch count it chooses)."""
    if len(y_train) == 0 or (select and (y_val is None or len(y_val) == 0)):
        raise RetinaLensError("training needs images in both the train and the validation split")
    check_train_config(cfg)
    amp = resolve_precision(cfg.precision) == "bf16"
    xt, yt = torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train).long()
    held_out = x_val is not None and y_val is not None and len(y_val) > 0
    if amp and xt.dtype == torch.float16:
        xt = xt.to(torch.bfloat16)  # once, up front: autocast would convert every batch again
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        head = create_head(cfg.head, feature_shape, num_classes)
        weight = class_weights_for(yt, num_classes) if cfg.class_weights else None
        train_loss_fn = nn.CrossEntropyLoss(weight=weight)
        val_loss_fn = nn.CrossEntropyLoss()  # validation loss stays unweighted: it chooses the model
        opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)  # the data order; dropout draws from the seeded global RNG

        def train_epoch(epoch: int) -> EpochTotals:
            head.train()
            totals = EpochTotals()
            order = torch.randperm(len(yt), generator=gen)
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i:i + cfg.batch_size].sort().values  # same batch, rows read in memory order
                if len(idx) < 2 and cfg.head.kind == "conv":
                    continue  # BatchNorm cannot train on a single sample
                with autocast("bf16" if amp else "fp32"):
                    logits = head(xt[idx] if amp else xt[idx].float()).float()
                loss = train_loss_fn(logits, yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals.add(loss, logits, yt[idx])
            return totals

        validate = None
        if held_out:
            xv, yv = torch.from_numpy(np.ascontiguousarray(x_val)), torch.from_numpy(y_val).long()
            validate = lambda: _evaluate(head, xv, yv, val_loss_fn, 256, record)  # noqa: E731
        run = run_epochs(head, opt, cfg, train_epoch=train_epoch, validate=validate, description="train head",
                         progress=progress, select=select)
    return TrainResult(head, run.best_epoch, run.history, run.val_metrics)


def fit_logistic_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                      num_classes: int, feature_shape: tuple[int, int, int], seed: int = 0,
                      cs: tuple[float, ...] = (0.01, 0.1, 1.0), fits: dict[float, Any] | None = None) -> TrainResult:
    """L2 logistic regression on standardised pooled vectors (scikit-learn; C chosen on validation),
    folded into a plain linear head: bundles, evaluation and prediction need nothing new for it.
    `fits`: the models fitted so far on these same x_train / y_train / seed, by C, read and added to,
    so a caller that asks twice (training's C=0.1 baseline, then the C search) fits each C once."""
    best: tuple[float, float, float, nn.Module, float] | None = None
    fits = {} if fits is None else fits
    for c in cs:
        if c not in fits:
            fits[c] = fit_logistic(x_train, y_train, c, num_classes=num_classes, feature_shape=feature_shape,
                                   seed=seed)
        head, train_acc = fits[c]
        p = head_probabilities(head, x_val)
        acc = float((p.argmax(1) == y_val).mean())
        loss = float(-np.log(np.clip(p[np.arange(len(y_val)), y_val], 1e-15, 1.0)).mean())  # cross-entropy, as SGD heads
        if best is None or (acc, -loss) > (best[0], -best[1]):
            best = (acc, loss, c, head, train_acc)
    acc, loss, c, head, train_acc = best  # type: ignore[misc]
    row = {"epoch": 1, "train_loss": float("nan"), "train_acc": train_acc, "val_loss": loss, "val_acc": acc, "lr": 0.0}
    return TrainResult(head, 1, [row], {"val_loss": loss, "val_acc": acc, "C": c})


def fit_logistic(x_train: np.ndarray, y_train: np.ndarray, c: float, *, num_classes: int,
                 feature_shape: tuple[int, int, int], seed: int = 0) -> tuple[nn.Module, float]:
    """One L2 logistic regression (inverse strength `c`) on standardised pooled vectors, as a plain
    linear head (eval mode), and its training accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    zt = scaler.transform(x_train)
    lr = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(zt, y_train)
    coef = np.zeros((num_classes, zt.shape[1]))
    intercept = np.full(num_classes, -1e4)  # a class absent from train can never win
    rows = lr.classes_.astype(int)
    if len(rows) == 2:  # binary: sklearn keeps one logit; softmax over [0, z] is the same model
        coef[rows[1]], intercept[rows[0]], intercept[rows[1]] = lr.coef_[0], 0.0, lr.intercept_[0]
    else:
        coef[rows], intercept[rows] = lr.coef_, lr.intercept_
    head = create_head(HeadConfig(kind="logreg", dropout=0.0), feature_shape, num_classes)
    linear = head.net[-1]
    with torch.no_grad():  # standardisation folded in: w' = w / sd, b' = b - w . (mean / sd)
        linear.weight.copy_(torch.from_numpy(coef / scaler.scale_).float())
        linear.bias.copy_(torch.from_numpy(intercept - coef @ (scaler.mean_ / scaler.scale_)).float())
    return head.eval(), float((lr.predict(zt) == y_train).mean())


def write_curves(result: TrainResult, folder: Path) -> None:
    """curves.csv + curves.png into a folder: the bundle's, before save_bundle hashes and seals it."""
    from .._io import atomic_write_bytes
    from ..evaluate.report import plot_training_curves

    atomic_write_bytes(folder / "curves.csv", result.curves_csv().encode())
    plot_training_curves(folder / "curves.csv", folder / "curves.png")
