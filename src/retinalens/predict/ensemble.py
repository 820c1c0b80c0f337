"""An ensemble on image files: every member, every test-time view, averaged.

A single network's probabilities on a data set come from its feature cache (evaluate, retrain), which
holds each image's features once. An ensemble sees each image through several backbones and views
(flips, crops) that no cache holds, so evaluation and training run it through the prediction path
itself (`ensemble_uncalibrated`, what `Model` runs), batch by batch: the numbers `predict` gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._console import progress_bar
from ..bundle.members import BundleMember
from ..data.images import ImageFiles, ImageItem, image_batches
from .model import ensemble_uncalibrated

BATCH = 16


def ensemble_outputs(members: Sequence[BundleMember], views: Sequence[str], paths: Sequence[ImageItem], *,
                     names: Sequence[str] | None = None, workers: int = 0, progress: bool = False,
                     ) -> tuple[list[int], np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(indices of the images that could be read, their probabilities before the bundle's temperature
    (N, K), the gate's pooled features (N, C), (name, reason) of those that could not). `paths`: files,
    or images' bytes named by `names` (default: the paths). The members share one input
    (bundle/manifest.py checks), so each image is decoded once."""
    names = [str(p) for p in paths] if names is None else list(names)
    dataset = ImageFiles(list(paths), members[0].preprocessing, names)
    order = list(range(len(paths)))
    keep: list[int] = []
    probs, pooled, failures = [], [], []
    with progress_bar(len(paths), "ensemble", progress) as advance:
        for x, idx, errors in image_batches(dataset, [order[i:i + BATCH] for i in range(0, len(order), BATCH)], workers):
            good = [j for j, err in enumerate(errors) if not err]
            failures += [(names[i], err) for i, err in zip(idx.tolist(), errors) if err]
            if good:
                p, f = ensemble_uncalibrated(members, views, x[good])
                keep += [int(idx[j]) for j in good]
                probs.append(p)
                pooled.append(f)
            advance(len(idx))
    if not probs:
        return [], np.zeros((0, 0)), np.zeros((0, 0), dtype=np.float32), failures
    return keep, np.concatenate(probs), np.concatenate(pooled), failures
