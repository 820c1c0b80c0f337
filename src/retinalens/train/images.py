"""Training on images: the frozen-backbone method, fine-tuning, and from-scratch models.

- frozen:   the ImageNet backbone stays fixed; GAP + Dense(64, relu) + softmax is trained on augmented
            images (the first published method). The backbone runs through the same traced graph that
            extraction and prediction use, so training sees the numbers the model will see in use.
- finetune: the same, then the last N parameter groups of the backbone (timm's coarse groups: the
            stages of an EfficientNet, the Mixed blocks of an Inception) train too, at a lower rate,
            after `warmup_epochs` of head-only training so that a random head does not wreck them.
- scratch:  every weight trains from random initialisation (the EyeNet baseline).

Each epoch ends with an atomic checkpoint. `resume=True` continues from it and gives the same weights
as an uninterrupted run: the data order, the augmentation and the dropout masks are all drawn from
generators seeded by (seed, epoch), and the optimiser and scheduler states are restored. The epoch loop
(history, LR schedule, best epoch, early stopping, checkpoint, resume) is loop.run_epochs, which head
training shares; this file says how to train an epoch on images and how to validate.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._console import console
from .._io import atomic_torch_save
from ..data.augment import BALANCE, apply_variant, epoch_plan, get_augmentation, sample_rng
from ..data.images import image_batches
from ..bundle.network import Network, head_input
from ..data.transforms import Preprocessing
from ..config import MODE_EPOCHS, ImageTrainConfig  # noqa: F401  (defined there, with every default)
from ..errors import ImageDecodeError, RetinaLensError
from ..models.heads import HeadConfig, create_head
from ..models.registry import Backbone, autocast, resolve_precision
from .distributed import World, data_parallel, from_main, sum_across
from .loop import EpochTotals, run_epochs
from .recipes import (backbone_param_groups, check_batchnorm, cosine_schedule, decay_groups, get_recipe, make_ema,
                      make_optimizer, reestimate_batchnorm)
from .trainer import TrainConfig, TrainResult, check_train_config, class_weights_for

MODES = ("bottleneck", "frozen", "finetune", "scratch")
CHECKPOINT = "last.pt"


def check_image_config(mode: str, cfg: ImageTrainConfig, train: TrainConfig) -> None:
    if mode not in MODES:
        raise RetinaLensError(f"unknown --mode '{mode}': use one of {', '.join(MODES)}")
    if cfg.unfreeze < 0 or cfg.warmup_epochs < 0 or not 0 < cfg.backbone_lr_scale <= 1 or cfg.workers < 0:
        raise RetinaLensError("need --unfreeze >= 0, --warmup-epochs >= 0, 0 < --backbone-lr-scale <= 1, --workers >= 0")
    if cfg.augment != "auto":
        get_augmentation(cfg.augment)
    get_recipe(cfg.recipe)
    check_batchnorm(cfg.batchnorm)
    if mode != "finetune" and (cfg.recipe != "classic" or cfg.batchnorm != "frozen"):
        raise RetinaLensError("--recipe and --batchnorm are options of --mode finetune")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise RetinaLensError(f"unknown --device '{cfg.device}': use auto, cpu or cuda[:N]")
    check_train_config(train)


def balance_options(balance: str, mode: str) -> tuple[bool, bool]:
    """--balance -> (oversample, class_weights). Oversampling needs images to rotate."""
    if balance not in BALANCE:
        raise RetinaLensError(f"unknown --balance '{balance}': use one of {', '.join(BALANCE)}")
    if balance == "oversample" and mode == "bottleneck":
        raise RetinaLensError("--balance oversample rotates images, which a feature cache cannot do: use "
                              "--mode frozen|finetune|scratch, or --balance weights with the bottleneck mode")
    return balance == "oversample", balance == "weights"


class AugmentedImages(Dataset):
    """Key (sample, variant, epoch, position) -> (augmented uint8 (S, S, 3), sample, "")."""

    def __init__(self, paths: list[Path], pp: Preprocessing, augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor],
                 seed: int) -> None:
        self.paths, self.pp, self.augment, self.seed = paths, pp, augment, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, int, str]:
        i, variant, epoch, position = key
        try:
            img = self.pp.load(self.paths[i])
        except ImageDecodeError as exc:  # it decoded when the run began: the file changed under us
            return torch.zeros(self.pp.size, self.pp.size, 3, dtype=torch.uint8), i, str(exc)
        return self.augment(apply_variant(img, variant), sample_rng(self.seed, epoch, position)), i, ""


def backbone_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The backbone's parameters in forward order, grouped as timm groups them (stem, stages...)."""
    named = dict(model.named_parameters())
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        return [[named[n] for n in names if n in named] for _, names in sorted(groups.items()) if names]
    return [list(child.parameters()) for child in model.children() if any(True for _ in child.parameters())]


@dataclass
class ImageTrainResult:
    backbone: Backbone  # the backbone to bundle (the original one when it stayed frozen)
    result: TrainResult


def training_device(mode: str, images: ImageTrainConfig, backbone: Backbone, world: World = World()) -> torch.device:
    """Where an image mode trains: each rank of a run on several GPUs takes the GPU of its local rank."""
    if mode == "frozen":  # the backbone stays where it is; only the head moves
        return next(backbone.model.parameters()).device
    if images.device == "auto":
        return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(images.device)


def train_on_images(backbone: Backbone, head_config: HeadConfig, *, mode: str, paths: list[Path],
                    y_train: np.ndarray, val_paths: list[Path], y_val: np.ndarray, num_classes: int,
                    train: TrainConfig, images: ImageTrainConfig, augment: str, checkpoint_dir: Path,
                    fingerprint: dict[str, Any], resume: bool = False, progress: bool = True,
                    world: World = World(), select: bool = True) -> ImageTrainResult:
    """Train on the images at `paths` (train split) choosing the best epoch on `val_paths`.

    `world`: this process's rank in a run on several (train/distributed.py); every rank passes the same
    arguments and trains on its share of each batch, rank 0 alone writes the checkpoint. `select=False`:
    exactly train.epochs epochs, the last kept, `val_paths` only recorded (a cross-validation fold's; none for
    the refit on every training image)."""
    check_image_config(mode, images, train)
    # A validation split is needed to select an epoch; without selection (a fold, the refit) it may be empty.
    needs_val = select or len(y_val) > 0
    if len(y_train) < world.size or (needs_val and len(y_val) < world.size):
        raise RetinaLensError("training needs images in both the train and the validation split"
                              + (f", at least one per process ({world.size})" if world.size > 1 else ""))
    frozen = mode == "frozen"
    device = training_device(mode, images, backbone, world)
    precision = resolve_precision(train.precision, device.type)
    # A GPU without bf16 (before Ampere) trains in fp16 with loss scaling; bf16 needs no scaling.
    fp16 = device.type == "cuda" and train.precision == "auto" and precision == "fp32"
    amp = partial(torch.autocast, "cuda", dtype=torch.float16) if fp16 else partial(autocast, precision, device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    pin = device.type == "cuda"
    pp = backbone.preprocessing
    recipe = get_recipe(images.recipe)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        head = create_head(head_config, backbone.feature_shape(), num_classes)
    if frozen:  # the traced inference graph: only the head has weights to learn
        net: nn.Module = head
        params = [{"params": list(head.parameters()), "lr": train.lr}]
        trainable: list[nn.Parameter] = []
    else:
        model = copy.deepcopy(backbone.model)
        net = Network(model, head, pp, head_config)
        if mode == "scratch":
            trainable = list(model.parameters())
            lrs = [train.lr]
        else:
            lrs = [train.lr * images.backbone_lr_scale]
        groups = ([{"params": trainable, "lr": lrs[0]}] if mode == "scratch" else
                  backbone_param_groups(recipe, backbone_groups(model), unfreeze=images.unfreeze, lr=lrs[0]))
        trainable = [p for g in groups for p in g["params"]]
        params = decay_groups(head.parameters(), train.lr, recipe) + groups
    net.to(device)

    data = AugmentedImages(list(paths), pp, get_augmentation(augment), train.seed)
    val_data = AugmentedImages(list(val_paths), pp, get_augmentation("none"), train.seed)
    yt, yv = torch.from_numpy(y_train).long(), torch.from_numpy(y_val).long()
    weight = class_weights_for(yt, num_classes) if train.class_weights else torch.ones(num_classes)
    # Summed over this rank's share, then divided by the whole batch's weight (each rank knows the whole
    # batch): what the ranks' gradients average to is the one-process batch mean, however it is dealt.
    train_loss_fn = nn.CrossEntropyLoss(weight=weight.to(device), reduction="sum", label_smoothing=recipe.label_smoothing)
    val_loss_fn = nn.CrossEntropyLoss(reduction="sum")
    opt = make_optimizer(recipe, params, lr=train.lr, weight_decay=train.weight_decay)
    ckpt, key = checkpoint_dir / CHECKPOINT, _fingerprint(fingerprint)
    # Rank 0 reads the checkpoint it wrote and hands it on: the other ranks' machines need not see the file.
    saved = from_main(world, _resume_point(ckpt, key, resume) if world.main else None)
    if saved is not None:  # run_epochs restores the weights, the optimiser and the schedule; the scaler is ours
        scaler.load_state_dict(saved.get("scaler", {}))

    per_rank = train.batch_size // world.size  # the global batch is dealt out (distributed.check_world)
    val_share = world.share(range(len(yv)))  # each rank validates its share; the sums are added up
    val_batches = [[(i, 0, 0, i) for i in val_share[s:s + per_rank]] for s in range(0, len(val_share), per_rank)]
    # Frozen: the backbone never changes, so the validation features are computed once.
    val_x = torch.cat([head_input(head_config, *backbone.encode(x, precision)).float()
                       for x, _ in _decoded(val_data, val_batches, images.workers)]) if frozen and len(yv) else None

    n_batches = len(_batches(epoch_plan(y_train, num_classes, seed=train.seed, epoch=1, oversample=images.oversample),
                             train.batch_size, world.size))
    schedule = (cosine_schedule(opt, warmup_steps=images.warmup_epochs * n_batches, total_steps=train.epochs * n_batches)
                if recipe.schedule == "cosine" else None)
    if saved is None and mode == "finetune" and images.batchnorm == "reestimate":  # a checkpoint holds them
        plain = AugmentedImages(list(paths), pp, get_augmentation("none"), train.seed)  # the scans as they are
        order = [[(i, 0, 0, i) for i in range(s, min(s + train.batch_size, len(yt)))] for s in range(0, len(yt), train.batch_size)]
        reestimate_batchnorm(net.features, (pp.normalize(x.to(device)).contiguous(memory_format=torch.channels_last)
                                            for x, _ in _decoded(plain, order, images.workers)))
    ema = make_ema(recipe, net) if not frozen else None
    # With an EMA the loop keeps (best epoch, checkpoint) both the weights and their average.
    looped: nn.Module = nn.ModuleDict({"net": net, "ema": ema}) if ema is not None else net

    parallel: dict[bool, nn.Module] = {}  # by warm-up: DDP syncs the parameters that required gradients when wrapped

    def train_epoch(epoch: int) -> EpochTotals:
        warm = mode == "finetune" and recipe.head_only_warmup and epoch <= images.warmup_epochs
        if not frozen:  # gradients flow into the backbone's trainable groups once the head's warm-up is over
            net.features.requires_grad_(False)  # type: ignore[union-attr]
            for p in trainable:
                p.requires_grad_(not warm)
        if warm not in parallel:
            parallel[warm] = data_parallel(net, world, device)
        model = parallel[warm]
        # The dropout masks, the data order and the augmentation are functions of (seed, epoch): a resumed
        # run draws what the uninterrupted one drew.
        torch.manual_seed(_epoch_seed(train.seed, epoch))
        plan = epoch_plan(y_train, num_classes, seed=train.seed, epoch=epoch, oversample=images.oversample)
        keys = [(i, v, epoch, pos) for pos, (i, v) in enumerate(plan)]
        batches = _batches(keys, train.batch_size, world.size)
        # The whole batch's loss weight, the denominator of its mean (the same on every rank).
        denominators = [float(weight[yt[[k[0] for k in b]]].sum()) for b in batches]
        net.train()
        if mode == "finetune":  # BatchNorm keeps its ImageNet statistics: small batches would ruin them
            net.features.eval()  # type: ignore[union-attr]
        totals = EpochTotals()
        shares = [world.share(b) for b in batches]
        for step, ((x, idx), batch, denominator) in enumerate(zip(_decoded(data, shares, images.workers, pin), batches,
                                                                  denominators), start=(epoch - 1) * n_batches):
            target = yt[idx].to(device)
            if frozen:  # the traced backbone's features; .clone() takes them out of inference mode for autograd
                x = head_input(head_config, *backbone.encode(x, precision)).to(device).float().clone()
            else:
                x = x.to(device, non_blocking=True)
            with amp():
                logits = (model(x) if frozen else model(x)[0]).float()
            loss = train_loss_fn(logits, target) / denominator  # this rank's part of the batch mean
            opt.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: times world.size, they add up to the batch mean's.
            scaler.scale(loss * world.size).backward()  # a no-op scale unless fp16
            scaler.step(opt)
            scaler.update()
            if schedule is not None:
                schedule.step()
            if ema is not None:
                ema.update(net, step=step + 1)
            totals.add(loss, logits, target, n=len(batch))
        loss_sum, correct, seen = sum_across(world, [totals.loss, totals.correct, totals.seen])
        return EpochTotals(loss_sum, int(correct), int(seen))

    @torch.no_grad()
    def validate() -> tuple[float, float]:
        net.eval()
        scored = ema.module if ema is not None else net
        if val_x is not None:
            outs = [head(val_x[i:i + 512].to(device)).float() for i in range(0, len(val_x), 512)]
        else:
            outs = []
            for x, _ in _decoded(val_data, val_batches, images.workers, pin):
                with amp():
                    outs.append(scored(x.to(device))[0].float())
        logits, target = torch.cat(outs).cpu(), yv[val_share]
        loss_sum, correct = sum_across(world, [float(val_loss_fn(logits, target)), float((logits.argmax(1) == target).sum())])
        return loss_sum / len(yv), correct / len(yv)

    with torch.random.fork_rng(devices=[]):  # train_epoch reseeds the global RNG: the caller's is left as it was
        run = run_epochs(looped, opt, train, train_epoch=train_epoch, validate=validate if len(yv) else None,
                         description=f"train ({mode})",
                         progress=progress and world.main, saved=saved, schedule=schedule, select=select,
                         # Temp file, then rename: a kill -9 leaves the previous checkpoint or the new one, never half.
                         checkpoint=(lambda state: atomic_torch_save(
                             ckpt, {**state, "scaler": scaler.state_dict(), "fingerprint": key})) if world.main else None)
    if ema is not None:  # the average is the model: what was validated, chosen and is now bundled
        net.load_state_dict(ema.module.state_dict())
    net.cpu()
    result = TrainResult(head, run.best_epoch, run.history, run.val_metrics)
    if frozen:
        return ImageTrainResult(backbone, result)
    source = "trained from scratch" if mode == "scratch" else f"{backbone.source}, fine-tuned"
    tuned = Backbone(backbone.name, backbone.timm_name, net.features, source)  # type: ignore[arg-type]
    tuned.preprocessing = pp  # what it trained on (an --input-size, an ensemble's shared input), not timm's default
    return ImageTrainResult(tuned, result)


def _decoded(data: Dataset, batches: list[list[tuple[int, int, int, int]]], workers: int,
             pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, sample indices) per batch; a file that no longer decodes stops training."""
    for x, idx, errors in image_batches(data, batches, workers, pin_memory=pin):
        bad = [e for e in errors if e]
        if bad:
            raise RetinaLensError(f"an image stopped decoding during training ({bad[0]}); the last epoch's checkpoint "
                                  "is kept: fix or remove the file, then run again with --resume")
        yield x, idx


def _batches(keys: list[Any], batch_size: int, ranks: int) -> list[list[Any]]:
    """An epoch's keys in batches of `batch_size`. BatchNorm cannot train on a batch of one, and every rank
    needs a share of every batch: a last batch too small for either joins the one before."""
    batches = [keys[s:s + batch_size] for s in range(0, len(keys), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < max(2, ranks):
        batches[-2] += batches.pop()
    return batches


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 3]).integers(2**62))


def _fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _resume_point(ckpt: Path, key: str, resume: bool) -> dict[str, Any] | None:
    """The interrupted run's checkpoint to go on from, or None to start at epoch 1. A checkpoint is never
    silently overwritten, nor continued by a run with other data or options (`key`, their fingerprint)."""
    saved = load_saved(ckpt, key, resume, "checkpoint")
    if saved is None:
        if resume:
            console().print(f"no checkpoint at {ckpt}: starting from the first epoch")
        return None
    console().print(f"resuming after epoch {saved['epoch']} from {ckpt}")
    return saved


def load_saved(path: Path, key: str, resume: bool, what: str) -> dict[str, Any] | None:
    """What a run saved to go on from (a checkpoint; a finished fold or member, train/image_runs.py), or
    None when there is none. It is refused without --resume (never silently overwritten), and when
    written by another run: `key` fingerprints the run's data and options."""
    if not path.is_file():
        return None
    if not resume:
        raise RetinaLensError(f"{path.parent} holds the {what} of an interrupted run: pass --resume to continue "
                              "it, or delete that folder to start over")
    try:  # weights_only: tensors, numbers, strings and containers; nothing is unpickled that could run code
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise RetinaLensError(f"{path}: unreadable ({type(exc).__name__}); delete {path.parent} to start over") from None
    if not isinstance(saved, dict) or saved.get("fingerprint") != key:
        raise RetinaLensError(f"{path} was written by a run with other data, splits or options; "
                              f"delete {path.parent} to start over")
    return saved


def config_fingerprint(config: dict[str, Any], split_hashes: dict[str, list[str]], classes: list[str]) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (the epoch count may grow)."""
    cfg = json.loads(json.dumps(config, default=str))
    cfg.get("train", {}).pop("epochs", None)
    cfg.pop("resume", None)
    return {"config": cfg, "splits": split_hashes, "classes": classes}
