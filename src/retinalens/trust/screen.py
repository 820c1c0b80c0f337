"""Screening before training: the gate's absolute floors applied to every training and validation
image before anything is fitted, so that broken files cannot teach the head, widen the feature
distribution or move a fitted threshold. What is excluded is said on the console and kept in the
bundle's manifest (training.screened)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.transforms import Preprocessing
from .gate import FLOORS, Gate
from .statistics import file_statistics


def screen_files(paths: Sequence[Path], preprocessing: Preprocessing, *, workers: int = 0) -> list[str | None]:
    """Per file: None when it may be used, else why not (a floor's reason, or "unreadable")."""
    stats, read = file_statistics(list(paths), preprocessing, workers=workers)
    verdicts = Gate(list(FLOORS)).verdicts(stats)
    return [v["reason"] if ok else "unreadable" for v, ok in zip(verdicts, np.asarray(read))]
