"""An image mode's part of a `train` run: one training on the split, or, under `--cv K`, k of them and a refit.

The bottleneck's cross-validation (train/cv.py) chooses among heads on cached features, for seconds. An
image mode has one candidate, the network its mode trains, and each fold is a training on images: here
the folds measure it rather than choose among several. Every fold trains exactly `--epochs` epochs
(train/loop.py's select=False: no early stopping, the LR schedule on the training loss, as the refit
sees it) on the other folds' images and scores its held-out images through the inference path (the
traced backbone at the bundle's precision, then the head). The refit trains the same epochs on every
training image once. The out-of-fold probabilities are what the bundle's calibration, its referral
threshold and an ensemble's average are fitted on (trust/fit.py, train/ensemble.py), and the
logistic-regression baseline is measured on the same folds.

A finished fold's held-out probabilities are written to the run's checkpoint folder with the fold's
fingerprint: `--resume` skips the folds that finished and continues the interrupted one from its last
epoch, so an interruption loses at most one epoch of one fold.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._console import console
from .._io import atomic_torch_save
from ..bundle.network import head_input
from ..data.images import ImageFiles, image_batches
from ..errors import RetinaLensError
from ..features.cache import FeatureCache
from ..features.extract import head_inputs
from ..models.heads import HeadConfig, head_probabilities
from ..models.registry import Backbone
from .cv import BASELINE_C, Candidate, CVResult, baseline_summary, cross_validate, fold_accuracy, make_folds
from .distributed import World
from .images import _fingerprint, config_fingerprint, load_saved, train_on_images
from .recipes import get_recipe
from .selection import _Data, _Trained
from .trainer import TrainResult

BATCH = 32  # held-out scans per backbone pass


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}.checkpoints")


def train_images(cfg: Any, data: _Data, out: Path, backbone: Backbone, head_config: HeadConfig,
                 idx: dict[str, list[int]], y: dict[str, np.ndarray], progress: bool, world: World) -> _Trained:
    """One training on the train split, its best epoch chosen on validation. `cfg`: the run's RunConfig."""
    trained, augment, recorded = _train(cfg, data, backbone, head_config, idx["train"], y["train"], idx["val"],
                                        y["val"], checkpoint_dir(out), progress, world, select=True)
    return _Trained(trained.backbone, head_config, trained.result, trained.result,
                    {"candidates": {head_config.kind: dict(trained.result.val_metrics)}, "chosen": head_config.kind,
                     "by": f"{cfg.mode} training on images, best epoch on validation", "augment": augment} | recorded)


def train_images_cv(cfg: Any, data: _Data, cache: FeatureCache, idx: list[int], y: np.ndarray, backbone: Backbone,
                    head_config: HeadConfig, k: int, out: Path, precision: str, progress: bool,
                    world: World) -> _Trained:
    """k fold trainings (out-of-fold probabilities), the baseline on the same folds, the refit on all
    (see the module's notes). `cache`: the pretrained backbone's, for the baseline."""
    if world.size > 1:
        raise RetinaLensError(f"--cv {k} with --mode {cfg.mode} runs in one process: drop --nproc / torchrun, "
                              "or use --cv 0 (one validation split)")
    samples = [data.ds.samples[i] for i in idx]
    labels, patients = [s.label for s in samples], [s.patient for s in samples]
    folds = make_folds(labels, [data.group(i) for i in idx], k, seed=cfg.split.seed)
    n_classes, keys = len(data.ds.classes), data.keys(idx)
    base = cross_validate(Candidate(HeadConfig(kind="logreg", dropout=0.0), BASELINE_C),
                          lambda kind: head_inputs(cache, keys, kind), y, folds, num_classes=n_classes,
                          feature_shape=cache.key.feature_shape, train=cfg.train)
    folder, say = checkpoint_dir(out), console()
    oof, fold_acc, histories = np.zeros((len(y), n_classes)), [], []
    for f in range(k):
        fit, held = folds.split(f)
        fit_idx, held_idx = [idx[i] for i in fit], [idx[i] for i in held]
        done = folder / f"fold{f + 1}.done.pt"
        key = _fingerprint(_fold_key(cfg, data, fit_idx, held_idx))
        saved = finished_step(done, key, cfg.resume, "folds")
        if saved is None:
            say.print(f"fold {f + 1} of {k}: {cfg.mode} on {len(fit)} images, {len(held)} held out")
            trained, _, _ = _train(cfg, data, backbone, head_config, fit_idx, y[fit], held_idx, y[held],
                                   folder / f"fold{f + 1}", progress, world, select=False)
            probs = probabilities(trained.backbone, trained.result.head, head_config,
                                  [data.ds.samples[i].path for i in held_idx], precision, cfg.images.workers)
            saved = {"probabilities": torch.from_numpy(probs), "history": trained.result.history, "fingerprint": key}
            atomic_torch_save(done, saved)
        oof[held] = saved["probabilities"].numpy()
        histories.append(saved["history"])
        fold_acc += fold_accuracy(oof[held], y[held], folds.fold[held])
        say.print(f"fold {f + 1} of {k}: held-out accuracy {fold_acc[-1]:.3f}")
    epochs = cfg.train.epochs
    curve = [{"epoch": e + 1, "val_loss": float(np.mean([h[e]["val_loss"] for h in histories])),
              "val_acc": float(np.mean([h[e]["val_acc"] for h in histories]))} for e in range(epochs)]
    result = CVResult(Candidate(head_config), oof, fold_acc, epochs, [epochs] * k, curve)
    recipe = get_recipe(cfg.images.recipe)
    name = f"{cfg.mode}" + (f" ({recipe.name})" if cfg.mode == "finetune" else "") + f" + {head_config.kind}"
    summary = result.summary(y) | {"name": name}
    say.print(f"{k}-fold CV accuracy (mean ± sd over folds): {name} {summary['accuracy_mean']:.3f} ± "
              f"{summary['accuracy_sd']:.3f}; logistic-regression baseline {base.summary(y)['accuracy_mean']:.3f}; "
              f"refit on all {len(y)} training images for {epochs} epochs")
    trained, augment, recorded = _train(cfg, data, backbone, head_config, idx, y, [], y[:0], folder / "refit",
                                        progress, world, select=False)
    for row, cv_row in zip(trained.result.history, curve):  # the refit's validation columns: the folds' mean
        row["val_loss"], row["val_acc"] = cv_row["val_loss"], cv_row["val_acc"]
    refit = TrainResult(trained.result.head, epochs, trained.result.history,
                        {"val_loss": summary["oof_nll"], "val_acc": float((oof.argmax(1) == y).mean())})
    record = folds.record(labels, patients) | {
        "candidates": [summary, base.summary(y)], "chosen": name,
        "by": f"the one network --mode {cfg.mode} trains, measured on the folds (exactly {epochs} epochs each); "
              "refitted on every training image",
        "refit": {"n_images": int(len(y)), "epochs": epochs}}
    return _Trained(trained.backbone, head_config, refit, refit,
                    {"candidates": {name: {"val_acc": summary["accuracy_mean"], "val_loss": summary["oof_nll"],
                                           "sd": summary["accuracy_sd"]}},
                     "chosen": name, "by": f"{k}-fold cross-validation on images", "augment": augment} | recorded,
                    folds=folds, oof=oof, cv=record, baseline=baseline_summary(base, y, k))


def _train(cfg: Any, data: _Data, backbone: Backbone, head_config: HeadConfig, train_idx: list[int],
           y_train: np.ndarray, val_idx: list[int], y_val: np.ndarray, folder: Path, progress: bool, world: World,
           *, select: bool) -> tuple[Any, str, dict[str, Any]]:
    """One train_on_images run: (its ImageTrainResult, the augmentation, the recipe's values as recorded)."""
    recipe = get_recipe(cfg.images.recipe)
    augment = cfg.images.augment if cfg.images.augment != "auto" else "fundus" if data.task else recipe.oct_augment
    # The recipe's values, not only its name: what a bundle was trained with, and what a resumed run must share.
    recorded = {"recipe": asdict(recipe)} if cfg.mode == "finetune" else {}
    split_hashes = {"train": data.keys(train_idx), "val": data.keys(val_idx)}
    trained = train_on_images(
        backbone, head_config, mode=cfg.mode, num_classes=len(data.ds.classes), train=cfg.train, images=cfg.images,
        paths=[data.ds.samples[i].path for i in train_idx], y_train=y_train,
        val_paths=[data.ds.samples[i].path for i in val_idx], y_val=y_val, augment=augment, checkpoint_dir=folder,
        resume=cfg.resume, progress=progress, world=world, select=select,
        fingerprint=config_fingerprint(resumable(cfg), split_hashes, data.ds.classes) | recorded)
    return trained, augment, recorded


def _fold_key(cfg: Any, data: _Data, fit_idx: list[int], held_idx: list[int]) -> dict[str, Any]:
    return config_fingerprint(resumable(cfg), {"train": data.keys(fit_idx), "val": data.keys(held_idx)},
                              data.ds.classes) | {"epochs": cfg.train.epochs}


def finished_step(done: Path, key: str, resume: bool, what: str) -> dict[str, Any] | None:
    """What a step of this run (a fold, an ensemble's member) saved when it finished, or None to run it.
    `done` is written last, so it exists only for a finished step (images.load_saved checks it)."""
    saved = load_saved(done, key, resume, what)
    if saved is not None:
        console().print(f"resuming: {done.name.removesuffix('.done.pt')} finished before, kept")
    return saved


@torch.no_grad()
def probabilities(backbone: Backbone, head: torch.nn.Module, head_config: HeadConfig, paths: list[Path],
                  precision: str, workers: int = 0) -> np.ndarray:
    """(N, K) softmax probabilities of backbone + head on image files, as a bundle of them predicts."""
    order = list(range(len(paths)))
    out = []
    for x, _, errors in image_batches(ImageFiles(paths, backbone.preprocessing),
                                      [order[s:s + BATCH] for s in range(0, len(order), BATCH)], workers):
        if bad := [e for e in errors if e]:
            raise RetinaLensError(f"an image stopped decoding during training ({bad[0]}); the finished folds are "
                                  "kept: fix or remove the file, then run again with --resume")
        spatial, pooled = backbone.encode(x, precision)
        out.append(head_probabilities(head, head_input(head_config, spatial, pooled)))
    return np.concatenate(out) if out else np.zeros((0, 0))


def resumable(cfg: Any) -> dict[str, Any]:
    """The options a resumed run must share with the interrupted one (not where or how fast it runs, nor
    --resume itself)."""
    d = asdict(cfg)
    for section, key in (("extract", "cache"), ("extract", "workers"), ("images", "workers")):
        d[section].pop(key, None)
    d.pop("sign_key", None)
    d.pop("resume", None)
    return d
