"""Patient-grouped, stratified splits with the leak checks that honest metrics need.

A given test split is never touched (beyond dropping exact duplicates); validation is carved out of
train by patient. Whatever is removed to keep the splits disjoint is recorded and reported.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import SplitConfig  # defined there, with every other option's default
from ..errors import RetinaLensError
from .discover import Dataset
from .hashing import sha256_files

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    """Indices into dataset.samples for each split, plus what was removed and why."""

    train: list[int]
    val: list[int]
    test: list[int]
    hashes: list[str]
    removed: list[dict[str, Any]] = field(default_factory=list)

    def indices(self, split: str) -> list[int]:
        return getattr(self, split)

    def summary(self, ds: Dataset) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for split in SPLITS:
            idx = self.indices(split)
            out[split] = {
                "n_images": len(idx),
                "n_patients": len({ds.samples[i].patient for i in idx}),
                "per_class": dict(sorted(Counter(ds.samples[i].label for i in idx).items())),
            }
        out["removed"] = {"n": len(self.removed), "reasons": dict(Counter(r["reason"] for r in self.removed))}
        return out


def _carve(idx: list[int], ds: Dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split `idx` into (rest, carved) by patient, stratified by label, carved ~ fraction."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    labels = np.array([ds.samples[i].label for i in idx])
    groups = np.array([ds.samples[i].patient for i in idx])
    n_groups = len(set(groups))
    if n_groups < 2:
        raise RetinaLensError(f"{ds.root}: only {n_groups} patient(s); cannot carve a patient-disjoint split")
    n_splits = max(2, round(1 / fraction))
    if n_groups >= n_splits and min(Counter(labels).values()) >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        rest, carved = next(splitter.split(np.zeros(len(idx)), labels, groups))
    else:  # too few patients per class to stratify: plain grouped split
        rest, carved = next(GroupShuffleSplit(1, test_size=fraction, random_state=seed).split(idx, groups=groups))
    return sorted(idx[i] for i in rest), sorted(idx[i] for i in carved)


def make_splits(ds: Dataset, cfg: SplitConfig | None = None, hashes: list[str] | None = None) -> Splits:
    cfg = cfg or SplitConfig()
    for name in ("val_fraction", "test_fraction"):  # a grouped k-fold carves 1/k: at most a half
        if not 0 < getattr(cfg, name) <= 0.5:
            raise RetinaLensError(f"{name.replace('_', '-')} must be between 0 and 0.5, got {getattr(cfg, name)}")
    hashes = hashes if hashes is not None else sha256_files(s.path for s in ds.samples)
    removed: list[dict[str, Any]] = []
    given = {i: s.split for i, s in enumerate(ds.samples)}

    # 1. Exact duplicates: keep one copy (the test copy if there is one, so test stays whole).
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    keep = set(range(len(ds.samples)))
    for h, idx in by_hash.items():
        if len(idx) > 1:
            kept = min(idx, key=lambda i: (given[i] != "test", i))
            for i in idx:
                if i != kept:
                    keep.discard(i)
                    removed.append({"path": str(ds.samples[i].path), "reason": "duplicate file", "sha256": h,
                                    "same_as": str(ds.samples[kept].path),
                                    "label_conflict": ds.samples[i].label != ds.samples[kept].label})

    # 2. Respect the dataset's own split; a patient found in test is dropped from train/val.
    test = sorted(i for i in keep if given[i] == "test")
    test_patients = {ds.samples[i].patient for i in test}
    for i in sorted(keep):
        if given[i] != "test" and ds.samples[i].patient in test_patients:
            keep.discard(i)
            removed.append({"path": str(ds.samples[i].path), "reason": "patient also in test", "patient": ds.samples[i].patient})
    rest = sorted(i for i in keep if given[i] != "test")
    if not test:
        rest, test = _carve(rest, ds, cfg.test_fraction, cfg.seed)
    val = [i for i in rest if given[i] == "val"]
    if val:
        val_patients = {ds.samples[i].patient for i in val}
        train = [i for i in rest if given[i] != "val" and ds.samples[i].patient not in val_patients]
        removed += [{"path": str(ds.samples[i].path), "reason": "patient also in val", "patient": ds.samples[i].patient}
                    for i in rest if given[i] != "val" and ds.samples[i].patient in val_patients]
    else:
        train, val = _carve(rest, ds, cfg.val_fraction, cfg.seed + 1)
    splits = Splits(train, val, test, hashes, removed)
    assert_disjoint(ds, splits)
    return splits


def assert_disjoint(ds: Dataset, splits: Splits) -> None:
    """No patient and no identical file may be in two splits: the guarantee behind every metric."""
    seen_patient: dict[str, str] = {}
    seen_hash: dict[str, str] = {}
    for split in SPLITS:
        for i in splits.indices(split):
            p, h = ds.samples[i].patient, splits.hashes[i]
            if seen_patient.setdefault(p, split) != split:
                raise AssertionError(f"patient {p} is in both {seen_patient[p]} and {split}")
            if seen_hash.setdefault(h, split) != split:
                raise AssertionError(f"file {ds.samples[i].path} (sha256 {h[:12]}) is in both {seen_hash[h]} and {split}")

