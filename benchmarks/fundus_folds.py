"""The fundus benchmarks' data and folds (bench_fundus_cv.py, bench_fundus_fov.py): the IDRiD + Kaggle
split's photos, the training images and patient folds `train` makes of them, and `--head auto` on
cached features, so that every fundus table compares its rows on the same folds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

K, SEED = 5, 0


def inputs(cache: Any, keys: list[str]) -> Any:
    """train/cv.py's Inputs: input kind -> the cached features of these images."""
    return lambda kind: cache.pooled(keys) if kind == "pooled" else cache.spatial(keys)


def photos(shared: Path, work: Path) -> tuple[Path, int, Any, list[str]]:
    """The split's labels CSV, the number of photos, the referable-task data set and its sha256s."""
    from bench_training import fundus_split_csv

    from retinalens.data.discover import discover
    from retinalens.data.hashing import sha256_files
    from retinalens.data.tasks import TASKS, apply_task

    combined, n_photos = fundus_split_csv(shared, work)
    ds, _ = apply_task(discover(combined), TASKS["referable"])
    return combined, n_photos, ds, sha256_files(s.path for s in ds.samples)


def training_folds(ds: Any, hashes: list[str], dup_cache: Any) -> tuple[Any, ...]:
    """The training images and folds `train` uses (train/selection.py): the CSV's test split, validation
    back into train, training near-duplicates of test photos removed and near-duplicate pairs of
    different patients kept in one fold, found on `dup_cache`'s features. Returns (data, train indices,
    test indices, y, y_test, train patients, test patients, folds)."""
    from retinalens.config import SplitConfig
    from retinalens.data.splits import make_splits
    from retinalens.data.tasks import TASKS
    from retinalens.train.cv import make_folds
    from retinalens.train.selection import _Data, drop_near_duplicates, without_val

    splits = make_splits(ds, SplitConfig(), hashes)
    data = without_val(_Data(ds, TASKS["referable"], hashes, splits, splits.summary(ds)))
    data = drop_near_duplicates(data, dup_cache, cross_validated=True)
    tr, te = data.splits.train, data.splits.test
    y_all = np.array([int(s.label == "referable") for s in ds.samples])
    folds = make_folds([ds.samples[i].label for i in tr], [data.group(i) for i in tr], K, seed=SEED)
    return (data, tr, te, y_all[tr], y_all[te], [ds.samples[i].patient for i in tr],
            [ds.samples[i].patient for i in te], folds)


def auto_head(cache: Any, keys: list[str], y: np.ndarray, folds: Any, shape: Any) -> tuple[list[Any], Any]:
    """What `train --head auto` does on cached features: every candidate cross-validated, then the choice."""
    from retinalens.models.heads import HeadConfig
    from retinalens.train.cv import cross_validate, default_candidates, select
    from retinalens.train.trainer import TrainConfig

    results = [cross_validate(c, inputs(cache, keys), y, folds, num_classes=2, feature_shape=shape, train=TrainConfig())
               for c in default_candidates(HeadConfig(kind="auto"), auto=True)]
    return results, select(results, y)
