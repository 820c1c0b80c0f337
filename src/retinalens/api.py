"""Python functions that mirror the CLI commands one to one (`retinalens train` = `retinalens.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data.discover import discover
from .data.hashing import sha256_files
from .data.splits import SplitConfig
from .features.cache import FeatureCache
from .features.extract import ExtractReport, extract_features, open_cache
from .models.bundle import Bundle, load_bundle
from .models.heads import HeadConfig
from .models.registry import DEFAULT_BACKBONE, create_backbone, resolve_precision
from .train.images import MODE_EPOCHS, ImageTrainConfig, balance_options
from .train.pipeline import ExtractConfig, RunConfig, train_bundle
from .train.trainer import TrainConfig


def extract(data: str | Path, *, backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = None,
            pretrained: bool = True, cache: str | Path | None = None, precision: str = "auto", batch_size: int = 16,
            workers: int = 0, shard: tuple[int, int] = (0, 1), spatial: bool = True, patient_regex: str | None = None,
            images_dir: str | Path | None = None, progress: bool = False) -> tuple[FeatureCache, ExtractReport]:
    """`retinalens extract`: cache the features of every image of a dataset."""
    ds = discover(data, patient_regex=patient_regex, images_dir=images_dir)
    bb = create_backbone(backbone, weights=weights, pretrained=pretrained)
    prec = resolve_precision(precision)
    store = open_cache(cache, bb, prec, spatial=spatial)
    paths = [s.path for s in ds.samples]
    report = extract_features(paths, sha256_files(paths), bb, store, precision=prec, batch_size=batch_size,
                              workers=workers, shard=shard, progress=progress)
    return store, report


def train(data: str | Path, out: str | Path, *, backbone: str = DEFAULT_BACKBONE, weights: str | Path | None = None,
          pretrained: bool = True, head: str = "auto", hidden: int = 0, task: str | None = None,
          mode: str = "bottleneck", epochs: int | None = None, seed: int = 0, cache: str | Path | None = None,
          precision: str = "auto", workers: int = 0, val_fraction: float = 0.15, patient_regex: str | None = None,
          images_dir: str | Path | None = None, balance: str = "none", unfreeze: int = 2,
          backbone_lr_scale: float = 0.1, warmup_epochs: int = 1, augment: str = "auto", device: str = "auto",
          resume: bool = False, target_sensitivity: float = 0.95, progress: bool = False,
          **train_options: Any) -> Bundle:
    """`retinalens train`, option for option (`precision` is the features', as on the CLI); further
    TrainConfig fields (lr, batch_size, monitor, ...) pass through `train_options`."""
    oversample, class_weights = balance_options(balance, mode)
    cfg = RunConfig(
        data=str(data), task=task, patient_regex=patient_regex, images_dir=str(images_dir) if images_dir else None,
        extract=ExtractConfig(backbone=backbone, weights=str(weights) if weights else None, pretrained=pretrained,
                              precision=precision, workers=workers, cache=str(cache) if cache else None),
        split=SplitConfig(val_fraction=val_fraction, seed=seed),
        train=TrainConfig(head=HeadConfig(kind=head, hidden=hidden), epochs=epochs or MODE_EPOCHS.get(mode, 60),
                          seed=seed, class_weights=class_weights or train_options.pop("class_weights", False),
                          **train_options),
        mode=mode, resume=resume, target_sensitivity=target_sensitivity,
        images=ImageTrainConfig(unfreeze=unfreeze, backbone_lr_scale=backbone_lr_scale, warmup_epochs=warmup_epochs,
                                augment=augment, oversample=oversample, workers=workers, device=device))
    return train_bundle(cfg, out, progress=progress)


def evaluate(bundle: str | Path | Bundle, data: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`retinalens evaluate`: metrics with CIs (see evaluate.run.evaluate_bundle for the options)."""
    from .evaluate.run import evaluate_bundle

    kwargs.setdefault("progress", False)
    return evaluate_bundle(bundle if isinstance(bundle, Bundle) else load_bundle(bundle), data, **kwargs)
