"""What a `train` run selects on, apart from the pipeline's steps: the data it carries (discovered,
screened, split by patient; its hashes), the near-duplicates it keeps out of the wrong split, and the
cross-validated choice of the bottleneck head (train/cv.py does the folds and the fitting; this module
feeds it the run's data)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._console import console, markup_safe
from ..config import AUTO_HEAD, CV_AUTO_FOLDS, CV_AUTO_MAX_IMAGES, RunConfigBase
from ..data.discover import Dataset, discover
from ..data.hashing import sha256_files
from ..data.near_duplicates import near_duplicate_pairs
from ..data.splits import Splits, make_splits
from ..data.tasks import Task, apply_task, get_task
from ..data.transforms import Preprocessing
from ..features.cache import FeatureCache
from ..features.extract import head_inputs
from ..models.heads import HeadConfig
from ..models.registry import Backbone
from ..trust import screen_files
from .cv import Folds, default_candidates, make_folds, select_and_refit
from .trainer import TrainConfig, TrainResult


@dataclass
class _Data:
    """The dataset, its hashes and patient-level splits, with the labels as class indices."""

    ds: Dataset
    task: Task | None
    hashes: list[str]
    splits: Splits
    summary: dict[str, Any]
    screened: list[dict[str, str]] = field(default_factory=list)  # {path, reason}: excluded before splitting
    # Patients whose images must share a cross-validation fold (near-duplicates across patients):
    # patient -> the group it joins. Absent: its own group.
    linked: dict[str, str] = field(default_factory=dict)

    def index(self, name: str, cache: FeatureCache) -> list[int]:
        """The split's samples that the cache could read (a failed decode is left out)."""
        return [i for i in self.splits.indices(name) if self.hashes[i] in cache]

    def labels(self, idx: list[int]) -> np.ndarray:
        k = {c: j for j, c in enumerate(self.ds.classes)}
        return np.array([k[self.ds.samples[i].label] for i in idx], dtype=np.int64)

    def keys(self, idx: list[int]) -> list[str]:
        return [self.hashes[i] for i in idx]

    def group(self, i: int) -> str:
        p = self.ds.samples[i].patient
        return self.linked.get(p, p)

    def with_splits(self, splits: Splits) -> _Data:
        summary = splits.summary(self.ds) | {"screened": self.summary.get("screened", {"n": 0, "reasons": {}})}
        return replace(self, splits=splits, summary=summary)


@dataclass
class _Trained:
    backbone: Backbone
    head_config: HeadConfig
    result: TrainResult
    curves: TrainResult | None  # the run whose epochs are plotted (a fitted logistic head has none)
    selection: dict[str, Any]
    folds: Folds | None = None  # cross-validation: the folds of the training images (data.index("train") order)
    oof: np.ndarray | None = None  # and the chosen candidate's out-of-fold probabilities
    cv: dict[str, Any] | None = None  # the manifest's training.cv
    baseline: dict[str, Any] | None = None  # the baseline on the same folds


def find_data(cfg: RunConfigBase) -> Dataset:
    """The run's labelled images, as discover() finds them with the run's options."""
    return discover(cfg.data, patient_regex=cfg.patient_regex, images_dir=cfg.images_dir)


def prepare_data(cfg: RunConfigBase, preprocessing: Preprocessing | None = None, found: Dataset | None = None) -> _Data:
    """Discover (unless `found`: find_data's answer, where the caller has it already; a DICOM folder's
    headers are read once), screen (with `preprocessing`: the model input; None: no screening, as when
    retraining on a parent's splits, which were screened) and split the data set."""
    say = console()
    task = get_task(cfg.task)
    ds, dropped = apply_task(find_data(cfg) if found is None else found, task)
    for d in [*dropped, *ds.skipped]:  # wrong grades; FIFOs, folders, broken links named like images
        say.print(f"[red]skipped[/] {markup_safe(d['path'])}: {markup_safe(d['reason'])}", highlight=False)
    ds, screened = _screen(ds, preprocessing, cfg.extract.workers) if preprocessing else (ds, [])
    hashes = sha256_files(s.path for s in ds.samples)
    splits = make_splits(ds, cfg.split, hashes)
    left_out = {"screened": {"n": len(screened), "reasons": dict(Counter(d["reason"] for d in screened))},
                "skipped": {"n": len(ds.skipped) + len(dropped),
                            "reasons": dict(Counter(d["reason"].split(" (")[0] for d in [*ds.skipped, *dropped]))}}
    summary = splits.summary(ds) | left_out
    say.print(f"[bold]{markup_safe(ds.root)}[/]: {len(ds)} images, classes {', '.join(ds.classes)}; "
              + "; ".join(f"{k} {v['n_images']} images / {v['n_patients']} patients" for k, v in summary.items()
                          if k not in ("removed", *left_out)), highlight=False)
    if n_left := sum(v["n"] for v in left_out.values()):
        say.print(f"left out {n_left} file(s), each named above: "
                  + "; ".join(f"{k} {v['n']} ({', '.join(f'{r} {c}' for r, c in v['reasons'].items())})"
                              for k, v in left_out.items() if v["n"]), highlight=False)
    if splits.removed:
        say.print(f"removed {len(splits.removed)} image(s) to keep splits disjoint: {summary['removed']['reasons']}")
    # Two copies of one image with different labels: one label is wrong, and only a person can tell which.
    label = {str(s.path): s.label for s in ds.samples}
    for r in splits.removed:
        if r.get("label_conflict"):
            say.print(f"[yellow]label conflict:[/] {markup_safe(r['path'])} ({markup_safe(label[r['path']])}) is the "
                      f"same image as {markup_safe(r['same_as'])} ({markup_safe(label[r['same_as']])}); kept the "
                      "latter's label (see splits.json)", highlight=False, soft_wrap=True)
    return _Data(ds, task, hashes, splits, summary, screened)


def _screen(ds: Dataset, preprocessing: Preprocessing, workers: int) -> tuple[Dataset, list[dict[str, str]]]:
    """Leave out the training and validation images the quality gate's absolute floors refuse (too
    small, a strip, blank, damaged, noise, unreadable) before anything is split or fitted. The data
    set's own test split stays whole: what evaluation measures is its business."""
    candidates = [i for i, s in enumerate(ds.samples) if s.split != "test"]
    reasons = dict(zip(candidates, screen_files([ds.samples[i].path for i in candidates], preprocessing, workers=workers)))
    screened = [{"path": str(ds.samples[i].path), "reason": r} for i, r in reasons.items() if r]
    for d in screened:
        console().print(f"[red]skipped[/] {markup_safe(d['path'])}: screened out ({markup_safe(d['reason'])})",
                        highlight=False)
    return replace(ds, samples=[s for i, s in enumerate(ds.samples) if not reasons.get(i)]), screened


def cv_folds(cfg: RunConfigBase, n_training: int) -> int:
    """How many folds this run cross-validates with (0: one validation split): config.py's rule."""
    if cfg.cv is not None:
        return cfg.cv if cfg.cv > 1 else 0
    return CV_AUTO_FOLDS if cfg.mode == "bottleneck" and n_training <= CV_AUTO_MAX_IMAGES else 0


def without_val(data: _Data) -> _Data:
    """Cross-validation folds the whole training data: a carved validation split goes back to train."""
    s = data.splits
    return data.with_splits(replace(s, train=sorted(s.train + s.val), val=[]))


def drop_near_duplicates(data: _Data, cache: FeatureCache, cross_validated: bool) -> _Data:
    """Keep near-duplicates (data/near_duplicates.py) out of the wrong split: a training copy of a
    test image (or, with one validation split, of a validation image) is removed and recorded as
    splits.removed is; with cross-validation, near-duplicates of different patients inside the
    training data are linked so that they share a fold."""
    s = data.splits
    idx = {n: data.index(n, cache) for n in ("train", "val", "test")}
    removed: list[dict[str, Any]] = []
    gone: set[int] = set()
    for held, what in (("test", "test"), *((() if cross_validated else (("val", "validation"),)))):
        training = [i for i in idx["train"] + (idx["val"] if held == "test" else []) if i not in gone]
        for a, b, bits, cos in _pairs(data, cache, training, idx[held]):
            i, j = training[a], idx[held][b]
            if i not in gone:
                gone.add(i)
                removed.append({"path": str(data.ds.samples[i].path), "reason": f"near-duplicate of a {what} image",
                                "same_as": str(data.ds.samples[j].path), "phash_bits": bits,
                                "cosine": round(cos, 4)})
    say = console()
    for r in removed:
        say.print(f"[yellow]removed[/] {markup_safe(r['path'])}: {r['reason']} ({markup_safe(r['same_as'])}; pHash "
                  f"{r['phash_bits']} bits, cosine {r['cosine']:.3f})", highlight=False, soft_wrap=True)
    if removed:
        data = data.with_splits(replace(s, train=[i for i in s.train if i not in gone],
                                        val=[i for i in s.val if i not in gone], removed=s.removed + removed))
    if cross_validated:
        training = data.index("train", cache)
        pairs = _pairs(data, cache, training, training, same_set=True)
        data = replace(data, linked=_link([(data.ds.samples[training[a]].patient, data.ds.samples[training[b]].patient)
                                           for a, b, _, _ in pairs]))
        if pairs:
            say.print(f"{len(pairs)} near-duplicate pair(s) of different patients in the training data: kept in "
                      "one cross-validation fold each")
    return data


def _pairs(data: _Data, cache: FeatureCache, a: list[int], b: list[int],
           same_set: bool = False) -> list[tuple[int, int, int, float]]:
    """Near-duplicate pairs between the images a and b, leaving out pairs of one patient (they share
    a split already)."""
    samples = data.ds.samples
    pairs = near_duplicate_pairs([samples[i].path for i in a], cache.pooled(data.keys(a)),
                                 [samples[j].path for j in b], cache.pooled(data.keys(b)), same_set=same_set,
                                 groups=([samples[i].patient for i in a], [samples[j].patient for j in b]))
    return pairs


def _link(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Union-find over patients: patient -> the smallest id of its linked group."""
    parent: dict[str, str] = {}

    def root(p: str) -> str:
        while parent.get(p, p) != p:
            p = parent[p]
        return p

    for p, q in pairs:
        rp, rq = root(p), root(q)
        if rp != rq:
            parent[max(rp, rq)] = min(rp, rq)
    return {p: root(p) for p in parent}


def train_bottleneck_cv(cfg: Any, data: _Data, cache: FeatureCache, idx: list[int], y: np.ndarray,
                        backbone: Backbone, k: int, progress: bool) -> _Trained:
    """Cross-validated selection of the head (and C, the epoch count) on the training images (train/cv.py).
    `cfg`: the run's RunConfig."""
    train: TrainConfig = cfg.train
    keys = data.keys(idx)
    samples = [data.ds.samples[i] for i in idx]
    folds = make_folds([s.label for s in samples], [data.group(i) for i in idx], k, seed=cfg.split.seed)
    candidates = default_candidates(train.head, auto=train.head.kind == AUTO_HEAD)
    sel = select_and_refit(candidates, lambda kind: head_inputs(cache, keys, kind), y, folds,
                           labels=[s.label for s in samples], patients=[s.patient for s in samples],
                           num_classes=len(data.ds.classes), feature_shape=cache.key.feature_shape, train=train,
                           progress=progress)
    candidates_acc = {r["name"]: {"val_acc": r["accuracy_mean"], "val_loss": r["oof_nll"], "sd": r["accuracy_sd"]}
                      for r in sel.record["candidates"]}
    say = console()
    say.print(f"{k}-fold CV accuracy (mean ± sd over folds): " + ", ".join(
        f"{r['name']} {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}" for r in sel.record["candidates"])
        + f"; chose {sel.chosen.candidate.name}" + (f", {sel.chosen.epochs} epochs" if sel.chosen.epochs else ""))
    return _Trained(backbone, sel.chosen.candidate.head, sel.refit, sel.refit if sel.refit.has_curves else None,
                    {"candidates": candidates_acc, "chosen": sel.chosen.candidate.name,
                     "by": f"{k}-fold cross-validation: {sel.record['by']}"},
                    folds=folds, oof=sel.chosen.oof, cv=sel.record, baseline=sel.baseline)

