"""Python functions that mirror the CLI commands one to one (`retinalens train` = `retinalens.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data.discover import discover
from .data.hashing import sha256_files
from .features.cache import FeatureCache
from .features.extract import ExtractReport, extract_features, open_cache
from .models.bundle import Bundle, load_bundle
from .models.heads import HeadConfig
from .models.registry import DEFAULT_BACKBONE, create_backbone, resolve_precision
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


def train(data: str | Path, out: str | Path, *, backbone: str = DEFAULT_BACKBONE, head: str = "auto",
          task: str | None = None, epochs: int = 60, seed: int = 0, cache: str | Path | None = None,
          images_dir: str | Path | None = None, progress: bool = False, **train_options: Any) -> Bundle:
    """`retinalens train`: the simple form; build a RunConfig and call train_bundle for everything else."""
    cfg = RunConfig(data=str(data), extract=ExtractConfig(backbone=backbone, cache=str(cache) if cache else None),
                    train=TrainConfig(head=HeadConfig(kind=head), epochs=epochs, seed=seed, **train_options),
                    task=task, images_dir=str(images_dir) if images_dir else None)
    cfg.split.seed = seed
    return train_bundle(cfg, out, progress=progress)


def evaluate(bundle: str | Path | Bundle, data: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`retinalens evaluate`: metrics with CIs (see evaluate.run.evaluate_bundle for the options)."""
    from .evaluate.run import evaluate_bundle

    kwargs.setdefault("progress", False)
    return evaluate_bundle(bundle if isinstance(bundle, Bundle) else load_bundle(bundle), data, **kwargs)
