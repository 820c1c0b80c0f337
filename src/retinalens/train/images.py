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
generators seeded by (seed, epoch), and the optimiser and scheduler states are restored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._console import console, progress_bar
from .._io import atomic_torch_save
from ..data.augment import BALANCE, apply_variant, epoch_plan, get_augmentation, sample_rng
from ..data.images import image_batches
from ..data.transforms import Preprocessing
from ..errors import ImageDecodeError, RetinaLensError
from ..models.heads import HeadConfig, create_head
from ..models.registry import Backbone, autocast, resolve_precision
from .trainer import TrainConfig, TrainResult, check_train_config, class_weights_for, plateau_schedule

MODES = ("bottleneck", "frozen", "finetune", "scratch")
# Default epochs per mode: a head on cached features is cheap to train long (early stopping ends it);
# an epoch on images costs a pass through the backbone.
MODE_EPOCHS = {"bottleneck": 60, "frozen": 20, "finetune": 15, "scratch": 30}
CHECKPOINT = "last.pt"


@dataclass
class ImageTrainConfig:
    """What training on images adds to TrainConfig (whose epochs, lr, schedule and seed it uses)."""

    unfreeze: int = 2  # finetune: the last N parameter groups of the backbone train
    backbone_lr_scale: float = 0.1  # finetune: their learning rate, relative to the head's
    warmup_epochs: int = 1  # finetune: head-only epochs first
    augment: str = "auto"  # auto (fundus for DR tasks, else oct) | oct | fundus | none
    oversample: bool = False  # fill minority classes with rotated / mirrored copies (the original's balancing)
    workers: int = 0  # decoding processes (0: threads)
    device: str = "auto"  # auto: CUDA when present


def check_image_config(mode: str, cfg: ImageTrainConfig, train: TrainConfig) -> None:
    if mode not in MODES:
        raise RetinaLensError(f"unknown --mode '{mode}': use one of {', '.join(MODES)}")
    if cfg.unfreeze < 0 or cfg.warmup_epochs < 0 or not 0 < cfg.backbone_lr_scale <= 1 or cfg.workers < 0:
        raise RetinaLensError("need --unfreeze >= 0, --warmup-epochs >= 0, 0 < --backbone-lr-scale <= 1, --workers >= 0")
    if cfg.augment != "auto":
        get_augmentation(cfg.augment)
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


class _Network(nn.Module):
    """uint8 pixels -> logits: backbone (eager, trainable parts) -> spatial or pooled -> head."""

    def __init__(self, model: nn.Module, head: nn.Module, pp: Preprocessing, spatial: bool) -> None:
        super().__init__()
        self.model, self.head, self.pp, self.spatial = model, head, pp, spatial

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(self.pp.normalize(pixels).contiguous(memory_format=torch.channels_last))
        return self.head(f.permute(0, 2, 3, 1) if self.spatial else f.mean(dim=(2, 3)))


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


def train_on_images(backbone: Backbone, head_config: HeadConfig, *, mode: str, paths: list[Path],
                    y_train: np.ndarray, val_paths: list[Path], y_val: np.ndarray, num_classes: int,
                    train: TrainConfig, images: ImageTrainConfig, augment: str, checkpoint_dir: Path,
                    fingerprint: dict[str, Any], resume: bool = False, progress: bool = True) -> ImageTrainResult:
    """Train on the images at `paths` (train split) choosing the best epoch on `val_paths`."""
    check_image_config(mode, images, train)
    if len(y_train) == 0 or len(y_val) == 0:
        raise RetinaLensError("training needs images in both the train and the validation split")
    say = console()
    frozen = mode == "frozen"
    if frozen:  # the backbone stays where it is; only the head moves
        device = next(backbone.model.parameters()).device
    else:
        device = torch.device("cuda" if images.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if images.device == "auto" else images.device))
    precision = resolve_precision(train.precision, device.type)
    # A GPU without bf16 (before Ampere) trains in fp16 with loss scaling; bf16 needs no scaling.
    fp16 = device.type == "cuda" and train.precision == "auto" and precision == "fp32"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    pin = device.type == "cuda"
    pp = backbone.preprocessing
    spatial = head_config.input_kind == "spatial"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        head = create_head(head_config, backbone.feature_shape(), num_classes)
    if frozen:  # the traced inference graph: only the head has weights to learn
        net: nn.Module = head
        params = [{"params": list(head.parameters()), "lr": train.lr}]
        trainable: list[nn.Parameter] = []
    else:
        model = copy.deepcopy(backbone.model)
        net = _Network(model, head, pp, spatial)
        if mode == "scratch":
            trainable = list(model.parameters())
            lrs = [train.lr]
        else:
            groups = backbone_groups(model)
            trainable = [p for g in groups[len(groups) - min(images.unfreeze, len(groups)):] for p in g]
            lrs = [train.lr * images.backbone_lr_scale]
        params = [{"params": list(head.parameters()), "lr": train.lr}, {"params": trainable, "lr": lrs[0]}]
    net.to(device)

    def set_trainable(epoch: int) -> None:
        """Gradients flow into the backbone's trainable groups once the head's warm-up is over."""
        if frozen:
            return
        warm = mode == "finetune" and epoch <= images.warmup_epochs
        for p in net.model.parameters():  # type: ignore[union-attr]
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(not warm)

    def train_mode() -> None:
        net.train()
        if mode == "finetune":  # BatchNorm keeps its ImageNet statistics: small batches would ruin them
            net.model.eval()  # type: ignore[union-attr]

    def amp() -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.float16) if fp16 else autocast(precision, device.type)

    def logits_of(pixels: torch.Tensor) -> torch.Tensor:
        if frozen:
            sp, pooled = backbone.encode(pixels, precision)
            x = (sp if spatial else pooled).to(device).float().clone()  # out of inference mode: autograd may save it
            with amp():
                return head(x).float()
        with amp():
            return net(pixels.to(device, non_blocking=True)).float()

    aug = get_augmentation(augment)
    data = AugmentedImages(list(paths), pp, aug, train.seed)
    val_data = AugmentedImages(list(val_paths), pp, get_augmentation("none"), train.seed)
    yt, yv = torch.from_numpy(y_train).long(), torch.from_numpy(y_val).long()
    weight = class_weights_for(yt, num_classes).to(device) if train.class_weights else None
    train_loss_fn, val_loss_fn = nn.CrossEntropyLoss(weight=weight), nn.CrossEntropyLoss()
    opt = torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    sched, better = plateau_schedule(opt, train)

    state: dict[str, Any] = {"epoch": 0, "best": math.nan, "best_epoch": 0, "stale": 0, "history": [], "best_state": None}
    ckpt = checkpoint_dir / CHECKPOINT
    key = _fingerprint(fingerprint)
    if ckpt.is_file():
        if not resume:
            raise RetinaLensError(f"{checkpoint_dir} holds the checkpoint of an interrupted run: pass --resume to "
                                  "continue it, or delete that folder to start over")
        saved = _load_checkpoint(ckpt)
        if saved.get("fingerprint") != key:
            raise RetinaLensError(f"{ckpt} was written by a run with other data, splits or options; "
                                  "delete that folder to start over")
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved.get("scaler", {}))
        state = {k: saved[k] for k in state}
        say.print(f"resuming after epoch {state['epoch']} from {ckpt}")
    elif resume:
        say.print(f"no checkpoint at {ckpt}: starting from the first epoch")

    val_batches = [[(i, 0, 0, i) for i in range(s, min(s + train.batch_size, len(yv)))]
                   for s in range(0, len(yv), train.batch_size)]
    def val_inputs() -> torch.Tensor:
        """Frozen mode: the validation features, computed once (they never change)."""
        feats = []
        for x, _, errors in image_batches(val_data, val_batches, images.workers):
            _raise_on_errors(errors)
            sp, pooled = backbone.encode(x, precision)
            feats.append((sp if spatial else pooled).float())
        return torch.cat(feats)

    frozen_val = val_inputs() if frozen else None

    @torch.no_grad()
    def validate() -> tuple[float, float]:
        net.eval()
        if frozen_val is not None:
            outs = [head(frozen_val[i:i + 512].to(device)).float() for i in range(0, len(frozen_val), 512)]
        else:
            outs = []
            for x, _, errors in image_batches(val_data, val_batches, images.workers, pin_memory=pin):
                _raise_on_errors(errors)
                with amp():
                    outs.append(net(x.to(device)).float())
        logits = torch.cat(outs).cpu()
        return float(val_loss_fn(logits, yv)), float((logits.argmax(1) == yv).float().mean())

    first = state["epoch"] + 1
    with torch.random.fork_rng(devices=[]), \
            progress_bar(train.epochs, f"train ({mode})", progress, unit="epoch") as advance:
        advance(state["epoch"])
        for epoch in range(first, train.epochs + 1):
            if train.early_stopping and state["stale"] >= train.early_stopping:
                break
            set_trainable(epoch)
            torch.manual_seed(_epoch_seed(train.seed, epoch))  # dropout masks: a function of (seed, epoch)
            plan = epoch_plan(y_train, num_classes, seed=train.seed, epoch=epoch, oversample=images.oversample)
            keys = [(i, v, epoch, pos) for pos, (i, v) in enumerate(plan)]
            batches = [keys[s:s + train.batch_size] for s in range(0, len(keys), train.batch_size)]
            if len(batches) > 1 and len(batches[-1]) < 2:
                batches[-2] += batches.pop()  # BatchNorm cannot train on a batch of one
            train_mode()
            total, correct, seen = 0.0, 0, 0
            for x, idx, errors in image_batches(data, batches, images.workers, pin_memory=pin):
                _raise_on_errors(errors)
                target = yt[idx].to(device)
                logits = logits_of(x)
                loss = train_loss_fn(logits, target)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # a no-op scale unless fp16
                scaler.step(opt)
                scaler.update()
                total += loss.item() * len(idx)
                correct += int((logits.argmax(1) == target).sum())
                seen += len(idx)
            val_loss, val_acc = validate()
            score = val_loss if train.monitor == "val_loss" else val_acc
            state["history"].append({"epoch": epoch, "train_loss": total / max(seen, 1), "train_acc": correct / max(seen, 1),
                                     "val_loss": val_loss, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"]})
            sched.step(score)
            if state["best_state"] is None or better(score, state["best"]):
                state.update(best=score, best_epoch=epoch, stale=0,
                             best_state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
            else:
                state["stale"] += 1
            state["epoch"] = epoch
            # Temp file, then rename: a kill -9 leaves the previous checkpoint or the new one, never half.
            atomic_torch_save(ckpt, {**state, "net": net.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "fingerprint": key})
            advance(1)

    net.load_state_dict(state["best_state"])
    net.cpu().eval()
    history = state["history"]
    row = history[state["best_epoch"] - 1]
    result = TrainResult(head.eval(), state["best_epoch"], history, {"val_loss": row["val_loss"], "val_acc": row["val_acc"]})
    if frozen:
        return ImageTrainResult(backbone, result)
    source = "trained from scratch" if mode == "scratch" else f"{backbone.source}, fine-tuned"
    return ImageTrainResult(Backbone(backbone.name, backbone.timm_name, net.model, source), result)  # type: ignore[arg-type]


def _raise_on_errors(errors: list[str]) -> None:
    bad = [e for e in errors if e]
    if bad:
        raise RetinaLensError(f"an image stopped decoding during training ({bad[0]}); the last epoch's checkpoint "
                              "is kept: fix or remove the file, then run again with --resume")


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 3]).integers(2**62))


def _fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:  # weights_only: tensors, numbers, strings and containers; nothing is unpickled that could run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise RetinaLensError(f"{path}: unreadable checkpoint ({type(exc).__name__}); delete it to start over") from None


def config_fingerprint(config: dict[str, Any], split_hashes: dict[str, list[str]], classes: list[str]) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (the epoch count may grow)."""
    cfg = json.loads(json.dumps(config, default=str))
    cfg.get("train", {}).pop("epochs", None)
    cfg.pop("resume", None)
    return {"config": cfg, "splits": split_hashes, "classes": classes}
