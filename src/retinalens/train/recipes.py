"""Fine-tuning recipes (`train --mode finetune --recipe NAME`): how the backbone is unfrozen and optimised.

A recipe is a frozen dataclass in RECIPES; every field's value is written once, there. The training
itself stays the one epoch loop (train/loop.py) driven by train/images.py; a recipe only says which
optimiser, which parameter groups at which rates, which LR schedule, how much label smoothing, whether
an EMA of the weights is what gets validated and saved, and which OCT augmentation it trains on.

- classic:   the first fine-tuning method: Adam, the last `--unfreeze` timm groups at
             `--backbone-lr-scale` x the head's rate after `--warmup-epochs` head-only epochs, the
             plateau schedule, no smoothing, no EMA, the `oct` augmentation.
- adamw-ema: every backbone group trains, the deepest at `--backbone-lr-scale` x the head's rate and
             each shallower one `layer_decay` times lower (layer-wise LR decay); AdamW with decoupled
             weight decay (none on biases and norms); a linear LR warm-up over `--warmup-epochs`, then a
             cosine decay per batch; label smoothing; an EMA of the weights (timm's ModelEmaV3), which is
             what is validated, kept as the best epoch and bundled; the `oct-scan` augmentation (crops
             along the scan, speckle, tilts).
- adamw-ema-cpu: adamw-ema on the last `--unfreeze` groups only (the layer-wise decay over those),
             on the `oct` augmentation: what a 2-core CPU can fine-tune in minutes.

The BatchNorm policy (`--batchnorm`, ImageTrainConfig) is independent of the recipe: `frozen` keeps the
ImageNet statistics; `reestimate` measures them anew on the training images before the first epoch
(reestimate_batchnorm). In both, BatchNorm runs in eval mode while training, since batches of 16 on a
CPU give noisy statistics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import RetinaLensError

BATCHNORM = ("frozen", "reestimate")


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str = "adam"  # adam (L2 = TrainConfig.weight_decay) | adamw (decoupled, `weight_decay` below)
    weight_decay: float = 0.0  # adamw: on weights of 2 or more dimensions only
    unfreeze_all: bool = False  # every backbone group trains (else the last --unfreeze groups)
    layer_decay: float | None = None  # each trained group's rate this times the next deeper one's (None: one rate)
    schedule: str = "plateau"  # plateau (the loop's, on the monitored score) | cosine (warm-up, then per batch)
    head_only_warmup: bool = True  # --warmup-epochs: head-only epochs (True) or the linear LR ramp (False)
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # the EMA's decay once warmed up (timm's decay warm-up, power 3/4)
    oct_augment: str = "oct"  # the augmentation `--augment auto` picks for OCT


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("classic"),
    # AdamW 0.05 and smoothing 0.1 are the usual fine-tuning values (timm, DeiT); 0.7 per group keeps the
    # stem of EfficientNet-Lite0 (9 timm groups) at ~6% of the deepest group's rate; an EMA of 0.998
    # averages over the last ~500 steps, a few epochs of a few hundred scans.
    Recipe("adamw-ema", optimizer="adamw", weight_decay=0.05, unfreeze_all=True, layer_decay=0.7, schedule="cosine",
           head_only_warmup=False, label_smoothing=0.1, ema_decay=0.998, oct_augment="oct-scan"),
    # The same on the last --unfreeze groups only: the gradient stops there, which on a 2-core CPU makes an
    # epoch ~3x cheaper than every group's (measured: benchmarks/bench_finetune.py, README). On the `oct`
    # augmentation: with `oct-scan` it plateaued at 0.77 on folds 1-2 of oct-kermany/train in 5 epochs; of
    # the single changes measured (benchmarks/bench_finetune_ablation.py) `oct` gained most (+4.8 and +0.8
    # points), more than dropping the EMA or the smoothing or doubling the rate; none closes the gap to classic.
    Recipe("adamw-ema-cpu", optimizer="adamw", weight_decay=0.05, layer_decay=0.7, schedule="cosine",
           head_only_warmup=False, label_smoothing=0.1, ema_decay=0.998, oct_augment="oct"),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise RetinaLensError(f"unknown --recipe '{name}': use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def check_batchnorm(policy: str) -> None:
    if policy not in BATCHNORM:
        raise RetinaLensError(f"unknown --batchnorm '{policy}': use one of {', '.join(BATCHNORM)}")


def backbone_param_groups(recipe: Recipe, groups: list[list[nn.Parameter]], *, unfreeze: int,
                          lr: float) -> list[dict[str, Any]]:
    """The optimiser's groups for the backbone's timm groups (stem first), `lr` being the deepest's."""
    trained = groups if recipe.unfreeze_all else groups[len(groups) - min(unfreeze, len(groups)):]
    if recipe.layer_decay is None:
        return decay_groups([p for g in trained for p in g], lr, recipe)
    out: list[dict[str, Any]] = []
    for depth, g in enumerate(reversed(trained)):
        out += decay_groups(g, lr * recipe.layer_decay ** depth, recipe)
    return out


def decay_groups(params: Iterable[nn.Parameter], lr: float, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW: weight decay on matrices and kernels, none on biases and norm scales (they have no scale to
    shrink towards). Adam keeps one group: its L2 comes from TrainConfig.weight_decay, as it always did."""
    params = list(params)
    if recipe.optimizer != "adamw":
        return [{"params": params, "lr": lr}]
    decayed = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return [g for g in ({"params": decayed, "lr": lr, "weight_decay": recipe.weight_decay},
                        {"params": rest, "lr": lr, "weight_decay": 0.0}) if g["params"]]


def make_optimizer(recipe: Recipe, groups: list[dict[str, Any]], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


def cosine_schedule(opt: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps` batches, then a cosine decay to 0 at `total_steps`;
    stepped once per batch by the epoch, saved and restored by the loop with the optimiser."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        done = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_ema(recipe: Recipe, net: nn.Module) -> nn.Module | None:
    """timm's weight EMA of `net` (parameters and buffers), or None for a recipe without one."""
    if recipe.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    # The decay warms up with the step (1 - (1 + step)^-3/4): the first steps' average is not stuck at the
    # random head. Updated with the global step, so a resumed run averages exactly as the uninterrupted one.
    return ModelEmaV3(net, decay=recipe.ema_decay, use_warmup=True, warmup_power=0.75)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """BatchNorm's running statistics measured anew on `batches` (the population average over them:
    momentum None), every weight untouched; the rest of `model` (dropout, drop-path) stays in eval mode.
    Returns the number of images seen."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average, not an exponential one
        m.train()
    seen = 0
    for x in batches:
        model(x)
        seen += len(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return seen
