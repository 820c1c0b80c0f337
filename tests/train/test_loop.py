"""The shared epoch loop on a scripted problem: the validation scores are chosen, so the best epoch,
the early stop and the learning rates are known in advance."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from retinalens.train.loop import CURVE_COLUMNS, EpochTotals, run_epochs
from retinalens.train.trainer import TrainConfig


class Scripted:
    """A one-weight model whose weight, after epoch e, is e; validation returns scores[e - 1]."""

    def __init__(self, scores: list[float]) -> None:
        self.model = nn.Linear(1, 1, bias=False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.scores, self.trained, self.saved = scores, [], []

    def train_epoch(self, epoch: int) -> EpochTotals:
        self.trained.append(epoch)
        with torch.no_grad():
            self.model.weight.fill_(float(epoch))
        return EpochTotals(loss=2.0 * epoch, correct=epoch, seen=4)

    def validate(self) -> tuple[float, float]:
        s = self.scores[len(self.trained) - 1]
        return s, 1.0 - s

    def checkpoint(self, state: dict) -> None:
        buf = io.BytesIO()  # through torch.save, as a real checkpoint: later epochs must not alter it
        torch.save(state, buf)
        buf.seek(0)
        self.saved.append(torch.load(buf, weights_only=True))

    def run(self, cfg: TrainConfig, saved: dict | None = None):
        return run_epochs(self.model, self.opt, cfg, train_epoch=self.train_epoch, validate=self.validate,
                          description="test", progress=False, saved=saved, checkpoint=self.checkpoint)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=20, lr=1e-3, lr_patience=100, early_stopping=2, monitor="val_loss")
    return TrainConfig(**{**base, **kw})


LOSSES = [1.0, 0.5, 0.7, 0.4, 0.6, 0.8, 0.3, 0.2]  # best so far at 2 and 4, then two worse epochs


def test_restores_the_best_epoch_and_stops_when_patience_runs_out():
    s = Scripted(LOSSES)
    state = s.run(_cfg())
    assert s.trained == [1, 2, 3, 4, 5, 6]  # 5 and 6 are worse than 4: patience 2 stops there, before 0.3
    assert state.best_epoch == 4 and state.best == 0.4 and state.stale == 2 and state.epoch == 6
    assert s.model.weight.item() == 4.0 and not s.model.training  # epoch 4's weights, ready to evaluate
    assert [tuple(row) for row in state.history] == [CURVE_COLUMNS] * 6
    assert [row["val_loss"] for row in state.history] == LOSSES[:6]
    assert state.history[2]["train_loss"] == 6.0 / 4 and state.history[2]["train_acc"] == 3 / 4
    assert state.val_metrics == {"val_loss": 0.4, "val_acc": pytest.approx(0.6)}
    assert [c["epoch"] for c in s.saved] == [1, 2, 3, 4, 5, 6]  # a checkpoint after every epoch


def test_no_early_stopping_runs_every_epoch():
    s = Scripted(LOSSES)
    state = s.run(_cfg(epochs=8, early_stopping=0))
    assert s.trained == list(range(1, 9)) and state.best_epoch == 8 and s.model.weight.item() == 8.0


def test_val_acc_monitor_keeps_the_first_epoch_of_a_tie():
    s = Scripted([0.5, 0.3, 0.3, 0.6, 0.3])  # accuracies 0.5, 0.7, 0.7, 0.4, 0.7
    state = s.run(_cfg(epochs=5, early_stopping=0, monitor="val_acc"))
    assert state.best_epoch == 2 and s.model.weight.item() == 2.0


def test_resume_from_any_checkpoint_gives_the_uninterrupted_run():
    ref = Scripted(LOSSES)
    ref_state = ref.run(_cfg(lr_patience=1))
    for k, saved in enumerate(ref.saved, start=1):
        s = Scripted(LOSSES)
        s.trained = list(range(1, k + 1))  # the epochs the interrupted run had done
        state = s.run(_cfg(lr_patience=1), saved=saved)
        assert s.trained == ref.trained, k  # from the last epoch's checkpoint (patience spent), nothing more runs
        assert state.history == ref_state.history and state.best_epoch == ref_state.best_epoch == 4
        assert s.model.weight.item() == 4.0
        assert s.opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"]


def test_learning_rate_is_logged_before_the_plateau_step_halves_it():
    s = Scripted([1.0] * 8)  # never improves after epoch 1: halved after every second flat epoch
    state = s.run(_cfg(epochs=8, early_stopping=0, lr_patience=2, min_lr=2e-4))
    assert [row["lr"] for row in state.history] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 2e-4])
    assert s.opt.param_groups[0]["lr"] == pytest.approx(2e-4)  # the floor


def test_the_loop_draws_no_random_numbers():
    s = Scripted(LOSSES)  # (its nn.Linear draws its initial weight)
    before = torch.random.get_rng_state()
    s.run(_cfg())
    assert torch.equal(before, torch.random.get_rng_state())
