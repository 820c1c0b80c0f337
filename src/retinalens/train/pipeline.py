"""Images to model bundle: discover -> split by patient -> features -> train -> bundle.

Two ways to train, one bundle format:
- bottleneck (default): extract features once into the cache, train a shallow head on the cache;
- frozen | finetune | scratch: train on the images themselves (train/images.py), then cache the
  final backbone's features so that evaluation is instant.
Every run is measured against logistic regression on the pretrained backbone's pooled features,
on the same split, and every choice is made on validation.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._console import console, markup_safe
from ..config import (AUTO_HEAD, MODE_EPOCHS, ExtractConfig, ImageTrainConfig, RunConfigBase, SplitConfig, default, given,
                      str_or_none)
from ..data.discover import Dataset, discover
from ..data.transforms import Preprocessing
from ..data.hashing import sha256_files
from ..data.splits import Splits, make_splits
from ..data.tasks import Task, apply_task, get_task
from ..errors import RetinaLensError
from ..evaluate.metrics import classification_metrics
from ..features.cache import FeatureCache
from ..features.extract import ExtractReport, extract_features, head_inputs, open_cache, print_extract_report
from ..trust import fit_trust, screen_files
from ..bundle.card import write_model_card
from ..bundle.signature import configured_key
from ..bundle.store import Bundle, check_output_folder, load_bundle, positive_classes_for, save_bundle
from ..models.heads import HEADS, HeadConfig, check_head_config, head_probabilities
from ..models.registry import DEFAULT_BACKBONE, Backbone, create_backbone, resolve_precision, resolve_spec
from .images import balance_options, check_image_config, config_fingerprint, train_on_images
from .trainer import TrainConfig, TrainResult, check_train_config, fit_logistic_head, train_head, write_curves


@dataclass
class RunConfig(RunConfigBase):
    """Everything a `train` run was given (RunConfigBase, with every default, plus the TrainConfig):
    saved as config.json in the bundle."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(head=HeadConfig(kind=AUTO_HEAD)))


def run_config_from_dict(d: dict[str, Any]) -> RunConfig:
    """A RunConfig back from a bundle's config.json (older bundles lack the image-mode fields)."""
    d = dict(d)
    return RunConfig(**d | {"extract": ExtractConfig(**d.get("extract", {})), "split": SplitConfig(**d.get("split", {})),
                            "train": TrainConfig.from_dict(d.get("train", {})),
                            "images": ImageTrainConfig(**d.get("images", {}))})


def build_run_config(data: str | Path, *, mode: str | None = None, backbone: str | None = None,
                     weights: str | Path | None = None, pretrained: bool | None = None, head: str | None = None,
                     hidden: int | None = None, task: str | None = None, epochs: int | None = None,
                     seed: int | None = None, cache: str | Path | None = None, precision: str | None = None,
                     workers: int | None = None, val_fraction: float | None = None, patient_regex: str | None = None,
                     images_dir: str | Path | None = None, balance: str | None = None,
                     class_weights: bool | None = None, unfreeze: int | None = None,
                     backbone_lr_scale: float | None = None, warmup_epochs: int | None = None,
                     augment: str | None = None, device: str | None = None, resume: bool | None = None,
                     target_sensitivity: float | None = None, sign_key: str | Path | None = None,
                     **train_options: Any) -> RunConfig:
    """`train`'s options, as the CLI spells them, to a RunConfig: the one place this is done (the CLI
    and `retinalens.train` both come here). An option left out or None keeps its dataclass default
    (retinalens/config.py); `epochs` defaults by mode (MODE_EPOCHS). `seed` seeds the split and the
    training, `workers` the extraction and the image modes. `class_weights=True` is `balance="weights"`
    (the config holds it once: TrainConfig.class_weights). Further TrainConfig fields (lr, batch_size,
    monitor, ...) pass through `train_options`; `precision` is the features' (ExtractConfig's)."""
    mode = mode or default(RunConfig, "mode")
    chosen = _balance(balance, class_weights)
    oversample, weighted = balance_options(chosen, mode) if chosen is not None else (None, None)
    run_train = default(RunConfig, "train")
    return RunConfig(
        data=str(data), **given(task=task, patient_regex=patient_regex, images_dir=str_or_none(images_dir),
                                mode=mode, resume=resume, target_sensitivity=target_sensitivity,
                                sign_key=str_or_none(sign_key)),
        extract=ExtractConfig(**given(backbone=backbone, weights=str_or_none(weights), pretrained=pretrained,
                                      precision=precision, workers=workers, cache=str_or_none(cache))),
        split=SplitConfig(**given(val_fraction=val_fraction, seed=seed)),
        train=replace(run_train, head=replace(run_train.head, **given(kind=head, hidden=hidden)), **train_options,
                      **given(epochs=epochs or MODE_EPOCHS.get(mode), seed=seed, class_weights=weighted)),
        images=ImageTrainConfig(**given(unfreeze=unfreeze, backbone_lr_scale=backbone_lr_scale,
                                        warmup_epochs=warmup_epochs, augment=augment, oversample=oversample,
                                        workers=workers, device=device)))


def _balance(balance: str | None, class_weights: bool | None) -> str | None:
    """`--class-weights` is an alias of `--balance weights`: with any other --balance it is a contradiction."""
    if not class_weights:
        return balance
    if balance not in (None, "none", "weights"):
        raise RetinaLensError(f"--class-weights is --balance weights: it cannot go with --balance {balance}")
    return "weights"


@dataclass
class _Data:
    """The dataset, its hashes and patient-level splits, with the labels as class indices."""

    ds: Dataset
    task: Task | None
    hashes: list[str]
    splits: Splits
    summary: dict[str, Any]
    screened: list[dict[str, str]] = field(default_factory=list)  # {path, reason}: excluded before splitting

    def index(self, name: str, cache: FeatureCache) -> list[int]:
        """The split's samples that the cache could read (a failed decode is left out)."""
        return [i for i in self.splits.indices(name) if self.hashes[i] in cache]

    def labels(self, idx: list[int]) -> np.ndarray:
        k = {c: j for j, c in enumerate(self.ds.classes)}
        return np.array([k[self.ds.samples[i].label] for i in idx], dtype=np.int64)

    def keys(self, idx: list[int]) -> list[str]:
        return [self.hashes[i] for i in idx]


@dataclass
class _Trained:
    backbone: Backbone
    head_config: HeadConfig
    result: TrainResult
    curves: TrainResult | None  # the run whose epochs are plotted (a fitted logistic head has none)
    selection: dict[str, Any]


def default_head(mode: str, scratch: bool) -> HeadConfig:
    """The head each image mode trains when --head is auto: the original methods' own."""
    if scratch:
        return HeadConfig(kind="dense", hidden=128, dropout=0.25)  # EyeNet: Dense 128, Dropout 0.25
    return HeadConfig(kind="linear", hidden=64, dropout=0.0)  # GAP + Dense(64, relu) + softmax


def train_bundle(cfg: RunConfig, out: str | Path, *, progress: bool = True, data: _Data | None = None,
                 lineage: dict[str, Any] | None = None, input_like: Preprocessing | None = None) -> Bundle:
    """`data`: a dataset with its splits already made (retraining keeps its parent's splits);
    `lineage`: the bundle's version and parent (default: version 1, no parent); `input_like`: feed the
    backbone pixels of this size and resampling (an ensemble's members share one input, train/ensemble.py)."""
    out = Path(out).expanduser()
    _check(cfg, out)
    x = cfg.extract
    precision = resolve_precision(x.precision)
    scratch = resolve_spec(x.backbone).from_scratch
    # The pretrained backbone: the bottleneck's extractor, the image modes' starting point, and the
    # baseline's features (a from-scratch model is measured against the default backbone's).
    pretrained = create_backbone(DEFAULT_BACKBONE if scratch else x.backbone, weights=None if scratch else x.weights,
                                 pretrained=x.pretrained)
    if input_like is not None:
        pretrained.preprocessing = replace(pretrained.preprocessing, size=input_like.size,
                                           interpolation=input_like.interpolation, resize=input_like.resize)
    data = data or _prepare(cfg, pretrained.preprocessing)  # screened through the model input it will see
    image_head = default_head(cfg.mode, scratch) if cfg.train.head.kind == "auto" else cfg.train.head
    spatial = "conv" in _candidates(cfg) if cfg.mode == "bottleneck" else (
        cfg.mode == "frozen" and image_head.input_kind == "spatial")
    cache, report = _extract(data, pretrained, x, precision, spatial, progress)
    idx = {n: data.index(n, cache) for n in ("train", "val", "test")}
    y = {n: data.labels(ix) for n, ix in idx.items()}
    pooled = {n: cache.pooled(data.keys(idx[n])) for n in ("train", "val")}
    baseline = fit_logistic_head(pooled["train"], y["train"], pooled["val"], y["val"], num_classes=len(data.ds.classes),
                                 feature_shape=cache.key.feature_shape, seed=cfg.train.seed, cs=(0.1,)).val_metrics

    if cfg.mode == "bottleneck":
        trained = _train_bottleneck(cfg, data, cache, idx, y, pooled, pretrained, progress)
    else:
        start = create_backbone(x.backbone, seed=cfg.train.seed) if scratch else pretrained
        trained = _train_images(cfg, data, out, start, image_head, idx, y, progress)
        if trained.backbone is not pretrained:  # new weights: cache their features for evaluation
            cache, report = _extract(data, trained.backbone, x, precision, trained.head_config.input_kind == "spatial",
                                     progress)
    bundle = _finish(cfg, out, data, trained, cache, report, precision, baseline,
                     lineage or {"version": 1, "parent": None})
    if cfg.mode != "bottleneck":
        shutil.rmtree(_checkpoint_dir(out), ignore_errors=True)  # the bundle holds everything now
    return bundle


def _check(cfg: RunConfig, out: Path) -> None:
    """Everything that can be wrong with the options is found before minutes of work, not after."""
    check_output_folder(out)
    configured_key(cfg.sign_key)  # a missing or short key file fails now, not after training
    check_train_config(cfg.train)
    if not 0 < cfg.target_sensitivity <= 1:
        raise RetinaLensError(f"--target-sensitivity must be in (0, 1], got {cfg.target_sensitivity}")
    resolve_precision(cfg.extract.precision)
    spec = resolve_spec(cfg.extract.backbone)
    if cfg.mode == "bottleneck":
        check_head_config(cfg.train.head, ("auto", *HEADS))
        if spec.from_scratch:
            raise RetinaLensError(f"'{spec.name}' has no pretrained weights to extract features with: "
                                  "train it with --mode scratch")
        if cfg.images.oversample:
            raise RetinaLensError("oversampling rotates images, which a feature cache cannot do: use an image "
                                  "mode (--mode frozen|finetune|scratch) or class weights")
        return
    check_image_config(cfg.mode, cfg.images, cfg.train)
    if cfg.train.head.kind != "auto":
        check_head_config(cfg.train.head, ("conv", "linear", "dense"))
    if spec.from_scratch != (cfg.mode == "scratch"):
        raise RetinaLensError(f"--mode {cfg.mode} does not fit '{spec.name}': "
                              + ("it has no pretrained weights, use --mode scratch" if spec.from_scratch else
                                 "--mode scratch is for models without pretrained weights (--backbone eyenet)"))


def _prepare(cfg: RunConfig, preprocessing: Preprocessing | None = None) -> _Data:
    """Discover, screen (with `preprocessing`: the model input; None: no screening, as when retraining
    on a parent's splits, which were screened) and split the data set."""
    say = console()
    task = get_task(cfg.task)
    ds, dropped = apply_task(discover(cfg.data, patient_regex=cfg.patient_regex, images_dir=cfg.images_dir), task)
    for d in dropped:
        say.print(f"[red]skipped[/] {markup_safe(d['path'])}: {markup_safe(d['reason'])}")
    ds, screened = _screen(ds, preprocessing, cfg.extract.workers) if preprocessing else (ds, [])
    hashes = sha256_files(s.path for s in ds.samples)
    splits = make_splits(ds, cfg.split, hashes)
    summary = splits.summary(ds) | {"screened": {"n": len(screened), "reasons": dict(Counter(d["reason"] for d in screened))}}
    say.print(f"[bold]{ds.root}[/]: {len(ds)} images, classes {', '.join(ds.classes)}; "
              + "; ".join(f"{k} {v['n_images']} images / {v['n_patients']} patients" for k, v in summary.items()
                          if k not in ("removed", "screened")))
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
        console().print(f"[yellow]screened out[/] {markup_safe(d['path'])}: {markup_safe(d['reason'])}", highlight=False)
    return replace(ds, samples=[s for i, s in enumerate(ds.samples) if not reasons.get(i)]), screened


def _extract(data: _Data, backbone: Backbone, x: ExtractConfig, precision: str, spatial: bool,
             progress: bool) -> tuple[FeatureCache, ExtractReport]:
    """Cache every image's features. Test images too (their labels are not looked at): evaluate is instant."""
    cache = open_cache(x.cache, backbone, precision, spatial=spatial)
    report = extract_features([s.path for s in data.ds.samples], data.hashes, backbone, cache, precision=precision,
                              batch_size=x.batch_size, chunk_size=x.chunk_size, workers=x.workers, progress=progress)
    print_extract_report(report)
    return cache, report


def _candidates(cfg: RunConfig) -> tuple[str, ...]:
    return ("conv", "logreg") if cfg.train.head.kind == "auto" else (cfg.train.head.kind,)


def _train_bottleneck(cfg: RunConfig, data: _Data, cache: FeatureCache, idx: dict[str, list[int]],
                      y: dict[str, np.ndarray], pooled: dict[str, np.ndarray], backbone: Backbone,
                      progress: bool) -> _Trained:
    shape, k = cache.key.feature_shape, len(data.ds.classes)
    results: dict[str, TrainResult] = {}
    for kind in _candidates(cfg):
        if kind == "logreg":
            results[kind] = fit_logistic_head(pooled["train"], y["train"], pooled["val"], y["val"], num_classes=k,
                                              feature_shape=shape, seed=cfg.train.seed)
        else:
            xs = {n: head_inputs(cache, data.keys(idx[n]), "spatial" if kind == "conv" else "pooled") for n in ("train", "val")}
            tcfg = replace(cfg.train, head=replace(cfg.train.head, kind=kind))
            results[kind] = train_head(xs["train"], y["train"], xs["val"], y["val"], num_classes=k,
                                       feature_shape=shape, cfg=tcfg, progress=progress)
    # Chosen on validation (accuracy, then loss), never on test.
    chosen = max(results, key=lambda kd: (results[kd].val_metrics["val_acc"], -results[kd].val_metrics["val_loss"]))
    head_config = replace(cfg.train.head, kind=chosen, dropout=0.0 if chosen == "logreg" else cfg.train.head.dropout)
    selection = {kd: {"val_acc": r.val_metrics["val_acc"], "val_loss": r.val_metrics["val_loss"]} for kd, r in results.items()}
    curves = next((r for r in (results[chosen], *results.values()) if r.has_curves), None)
    return _Trained(backbone, head_config, results[chosen], curves,
                    {"candidates": selection, "chosen": chosen, "by": "validation accuracy, then loss"})


def _train_images(cfg: RunConfig, data: _Data, out: Path, backbone: Backbone, head_config: HeadConfig,
                  idx: dict[str, list[int]], y: dict[str, np.ndarray], progress: bool) -> _Trained:
    augment = cfg.images.augment if cfg.images.augment != "auto" else ("fundus" if data.task else "oct")
    split_hashes = {n: data.keys(idx[n]) for n in ("train", "val")}
    trained = train_on_images(
        backbone, head_config, mode=cfg.mode, num_classes=len(data.ds.classes), train=cfg.train, images=cfg.images,
        paths=[data.ds.samples[i].path for i in idx["train"]], y_train=y["train"],
        val_paths=[data.ds.samples[i].path for i in idx["val"]], y_val=y["val"], augment=augment,
        checkpoint_dir=_checkpoint_dir(out), resume=cfg.resume, progress=progress,
        fingerprint=config_fingerprint(_resumable(cfg), split_hashes, data.ds.classes))
    r = trained.result
    return _Trained(trained.backbone, head_config, r, r,
                    {"candidates": {head_config.kind: dict(r.val_metrics)}, "chosen": head_config.kind,
                     "by": f"{cfg.mode} training on images, best epoch on validation", "augment": augment})


def _resumable(cfg: RunConfig) -> dict[str, Any]:
    """The options a resumed run must share with the interrupted one (not where or how fast it runs)."""
    d = asdict(cfg)
    for section, key in (("extract", "cache"), ("extract", "workers"), ("images", "workers")):
        d[section].pop(key, None)
    d.pop("sign_key", None)
    return d


def _checkpoint_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}.checkpoints")


def _finish(cfg: RunConfig, out: Path, data: _Data, trained: _Trained, cache: FeatureCache, report: ExtractReport,
            precision: str, baseline: dict[str, float], lineage: dict[str, Any]) -> Bundle:
    """Validation metrics through the inference path, the manifest, the bundle, the curves."""
    ds, task, hc = data.ds, data.task, trained.head_config
    idx = {n: data.index(n, cache) for n in ("train", "val")}
    y_val = data.labels(idx["val"])
    val_probs = head_probabilities(trained.result.head, head_inputs(cache, data.keys(idx["val"]), hc.input_kind))
    positives = positive_classes_for(ds.classes, task)
    val_metrics = classification_metrics(y_val, val_probs, ds.classes, [ds.samples[i].patient for i in idx["val"]],
                                         positive_classes=positives or None, n_boot=200, seed=cfg.train.seed,
                                         ordinal=bool(task and task.ordinal))
    say = console()
    say.print("validation accuracy: " + ", ".join(f"{kd} head {v['val_acc']:.3f}" for kd, v in trained.selection["candidates"].items())
              + f"; logistic-regression baseline {baseline['val_acc']:.3f}; using the {hc.kind} head"
              + (f" ({cfg.mode} training on images)" if cfg.mode != "bottleneck" else ""))
    if val_metrics["accuracy"] < baseline["val_acc"]:
        say.print(f"[yellow]note: this model is below the logistic-regression baseline on validation "
                  f"({val_metrics['accuracy']:.3f} < {baseline['val_acc']:.3f})[/]")
    config = _jsonable(asdict(replace(cfg, sign_key=None)))  # where the key lies is not the bundle's to tell
    sections: dict[str, Any] = {
        "training": {"data": str(ds.root), "layout": ds.layout, "mode": cfg.mode, "splits": data.summary,
                     "best_epoch": trained.result.best_epoch, "epochs_run": len(trained.result.history),
                     "extract_failures": len(report.failures), "screened": data.screened,
                     "head_selection": trained.selection,
                     "baseline_logistic_regression": baseline, "config": config},
        "validation": {k: val_metrics[k] for k in ("accuracy", "accuracy_ci", "roc_auc_macro", "n_images", "n_patients")}
        | {"loss": trained.result.val_metrics["val_loss"]},
        "metrics": {},
        "lineage": lineage,
    }
    split_hashes = {n: sorted({data.hashes[i] for i in data.splits.indices(n)}) for n in ("train", "val", "test")}
    files = {"config.json": json.dumps(config, indent=2).encode(),
             "splits.json": json.dumps({"sha256": split_hashes, "removed": data.splits.removed}, indent=1).encode()}
    # Calibration, the referral operating point and the quality gate, fitted on validation (gate/trust.py).
    trust, trust_files = fit_trust(
        val_probs=val_probs, val_y=y_val, classes=ds.classes, positive_classes=positives,
        train_pooled=cache.pooled(data.keys(idx["train"])), val_pooled=cache.pooled(data.keys(idx["val"])),
        val_paths=[ds.samples[i].path for i in idx["val"]], preprocessing=trained.backbone.preprocessing,
        target_sensitivity=cfg.target_sensitivity, workers=cfg.extract.workers, seed=cfg.train.seed)
    sections, files = sections | trust, files | trust_files
    key = configured_key(cfg.sign_key)
    curves = trained.curves
    path = save_bundle(out, backbone=trained.backbone, head=trained.result.head, head_config=hc, classes=ds.classes,
                       precision=precision, feature_shape=cache.key.feature_shape, sections=sections, files=files,
                       task=task, referral=dict(task.referral) if task else None, sign_key=key,
                       side_files=(lambda folder: write_curves(curves, folder)) if curves is not None else None)
    bundle = load_bundle(path, key=cfg.sign_key)
    write_model_card(bundle)  # MODEL_CARD.md from the manifest; `evaluate` adds its results
    return bundle


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
