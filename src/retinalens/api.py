"""Python functions that mirror the CLI commands one to one (`retinalens train` = `retinalens.train`).

An option left out (or None) takes its default from the dataclasses of retinalens/config.py, the
same default the CLI shows in `--help`: each one is written there and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .bundle.store import Bundle, load_bundle
from .config import EvaluateConfig, ExtractConfig, ExtractOptions, given, str_or_none
from .data.discover import discover
from .data.hashing import sha256_files
from .features.cache import FeatureCache
from .features.extract import ExtractReport, extract_features, open_cache
from .models.registry import create_backbone, resolve_precision
from .train.pipeline import build_run_config, train_bundle


def extract(data: str | Path, *, backbone: str | None = None, weights: str | Path | None = None,
            pretrained: bool | None = None, cache: str | Path | None = None, precision: str | None = None,
            batch_size: int | None = None, workers: int | None = None, shard: tuple[int, int] | None = None,
            spatial: bool | None = None, patient_regex: str | None = None, images_dir: str | Path | None = None,
            progress: bool = False) -> tuple[FeatureCache, ExtractReport]:
    """`retinalens extract`: cache the features of every image of a dataset (defaults: ExtractConfig's
    and ExtractOptions')."""
    x = ExtractConfig(**given(backbone=backbone, weights=str_or_none(weights), pretrained=pretrained,
                              cache=str_or_none(cache), precision=precision, batch_size=batch_size, workers=workers))
    o = ExtractOptions(**given(shard=shard, spatial=spatial))
    ds = discover(data, patient_regex=patient_regex, images_dir=images_dir)
    bb = create_backbone(x.backbone, weights=x.weights, pretrained=x.pretrained)
    prec = resolve_precision(x.precision)
    store = open_cache(x.cache, bb, prec, spatial=o.spatial)
    paths = [s.path for s in ds.samples]
    report = extract_features(paths, sha256_files(paths), bb, store, precision=prec, batch_size=x.batch_size,
                              chunk_size=x.chunk_size, workers=x.workers, shard=o.shard, progress=progress)
    return store, report


def train(data: str | Path, out: str | Path, *, progress: bool = False, **options: Any) -> Bundle:
    """`retinalens train`, option for option: `options` are train.pipeline.build_run_config's (mode,
    backbone, head, epochs, balance, ..., and further TrainConfig fields such as lr or batch_size)."""
    return train_bundle(build_run_config(data, **options), out, progress=progress)


def evaluate(bundle: str | Path | Bundle, data: str | Path, *, progress: bool = False,
             **options: Any) -> dict[str, Any]:
    """`retinalens evaluate`: metrics with CIs (see evaluate.run.evaluate_bundle for the options; `split`
    and `n_boot` default to EvaluateConfig's)."""
    from .evaluate.run import evaluate_bundle

    return evaluate_bundle(bundle if isinstance(bundle, Bundle) else load_bundle(bundle), data, progress=progress,
                           **(asdict(EvaluateConfig()) | options))
