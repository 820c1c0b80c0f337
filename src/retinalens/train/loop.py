"""The one epoch loop of head training (cached features) and image training.

A caller says how to train one epoch and how to validate; the loop does the rest, the same way for both:
a history row per epoch, the plateau LR schedule on the monitored score, the best epoch by cfg.monitor
(the first epoch to reach the best score wins ties), early stopping, an end-of-epoch checkpoint hook,
resuming from such a checkpoint, and the best epoch's weights restored at the end.

The loop draws no random numbers: seeding stays with the caller, so that the data order and the dropout
masks are the caller's business (and a resumed run can redraw them exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .._console import progress_bar
from ..config import TrainConfigBase as TrainConfig  # the options the loop reads (no head)

CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


@dataclass
class EpochTotals:
    """What one training epoch adds up over its batches (the loss summed over samples, not batches)."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, n: int | None = None) -> None:
        """`loss`: the mean over `n` samples (default: over `target`, or over a whole batch of which this
        process saw the share `target`, `loss` being its part of that batch's mean)."""
        self.loss += loss.item() * (len(target) if n is None else n)
        self.correct += int((logits.argmax(1) == target).sum())
        self.seen += len(target)


@dataclass
class LoopState:
    """Where training stands after `epoch` epochs. With the weights, the optimiser and the scheduler it
    is all a checkpoint needs to go on as if never stopped."""

    epoch: int = 0
    best: float = math.nan  # best_epoch's monitored score
    best_epoch: int = 0
    stale: int = 0  # epochs since the score last improved
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch: CURVE_COLUMNS
    best_state: dict[str, torch.Tensor] | None = None  # best_epoch's weights, on the CPU

    @property
    def val_metrics(self) -> dict[str, float]:
        row = self.history[self.best_epoch - 1]
        return {"val_loss": row["val_loss"], "val_acc": row["val_acc"]}


def plateau_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> tuple[Any, Callable[[float, float], bool]]:
    """The LR schedule on the monitored validation score, and the comparison that says "better".

    Every parameter group's floor keeps its ratio to cfg.lr (a fine-tuned backbone's group runs lower)."""
    better = (lambda a, b: a < b) if cfg.monitor == "val_loss" else (lambda a, b: a > b)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min" if cfg.monitor == "val_loss" else "max", factor=cfg.lr_factor,
        # PyTorch reduces once more than `patience` epochs are flat: patience - 1 halves the
        # rate after exactly `lr_patience` flat epochs, as Keras and the original did
        patience=max(cfg.lr_patience - 1, 0),
        min_lr=[cfg.min_lr if g["lr"] == cfg.lr else cfg.min_lr * g["lr"] / cfg.lr for g in opt.param_groups])
    return sched, better


def run_epochs(model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, *,
               train_epoch: Callable[[int], EpochTotals], validate: Callable[[], tuple[float, float]] | None,
               description: str, progress: bool = True, saved: Mapping[str, Any] | None = None,
               checkpoint: Callable[[dict[str, Any]], None] | None = None, select: bool = True,
               schedule: Any = None) -> LoopState:
    """Train `model` for up to cfg.epochs epochs; return where it ended, with `model` at its best epoch (eval mode).

    `select=False` trains exactly cfg.epochs epochs and keeps the last (the epoch count was chosen
    elsewhere, by cross-validation): the LR schedule then follows the training score, so that a fold
    and the refit on all training images see the same schedule, and `validate` (None: no validation
    columns) only records.

    train_epoch(epoch) trains one epoch (1-based) and returns its totals; validate() returns (val_loss,
    val_acc). checkpoint(state), when given, runs after every epoch with all that the loop needs to resume
    from there (the caller adds what else it needs, and writes it); `saved`, such a state, resumes.
    `schedule`, when given, replaces the plateau schedule: an LR scheduler that train_epoch steps (per
    batch); the loop only saves and restores it."""
    # Made before `saved` replaces the optimiser's rates: the floors are set from the configured rates.
    sched, better = plateau_schedule(opt, cfg)
    sched = sched if schedule is None else schedule
    state = LoopState()
    if saved is not None:
        model.load_state_dict(saved["net"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = LoopState(**{f.name: saved[f.name] for f in fields(LoopState)})
    # The rate column shows s/epoch once an epoch takes longer than a second (an epoch on images does).
    with progress_bar(cfg.epochs, description, progress, unit="epoch", completed=state.epoch) as advance:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            # Checked before an epoch, not after the one that ran out of patience: a run resumed from
            # that epoch's checkpoint stops there as well.
            if select and cfg.early_stopping and state.stale >= cfg.early_stopping:
                break
            totals = train_epoch(epoch)
            val_loss, val_acc = validate() if validate is not None else (math.nan, math.nan)
            seen = max(totals.seen, 1)
            train_loss, train_acc = totals.loss / seen, totals.correct / seen
            score = ((val_loss if cfg.monitor == "val_loss" else val_acc) if select else
                     (train_loss if cfg.monitor == "val_loss" else train_acc))
            state.history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                                  "val_loss": val_loss, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"]})
            if schedule is None:
                sched.step(score)
            if not select:
                state.best, state.best_epoch, state.stale = score, epoch, 0
                state.best_state = None  # the last epoch's weights are the model's: nothing to restore
            elif state.best_state is None or better(score, state.best):
                state.best, state.best_epoch, state.stale = score, epoch, 0
                state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                state.stale += 1
            state.epoch = epoch
            if checkpoint is not None:
                checkpoint({**{f.name: getattr(state, f.name) for f in fields(LoopState)}, "net": model.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
            advance(1)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.eval()
    return state
