"""Images to model bundle: discover -> split by patient -> features -> train -> bundle.

Two ways to train, one bundle format:
- bottleneck (default): extract features once into the cache, train a shallow head on the cache;
- frozen | finetune | scratch: train on the images themselves (train/images.py), then cache the
  final backbone's features so that evaluation is instant.
Every run is measured against logistic regression on the pretrained backbone's pooled features, on
the same split, and every choice is made on validation (out of fold under --cv).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._console import console
from ..config import (AUTO_HEAD, AUTO_RESIZE, MODE_EPOCHS, ExtractConfig, ImageTrainConfig, RunConfigBase, SplitConfig, default, given,
                      str_or_none)
from ..data.discover import Dataset
from ..data.transforms import VIEWS, Preprocessing
from ..errors import RetinaLensError
from ..evaluate.metrics import classification_metrics
from ..features.cache import FeatureCache
from ..features.extract import ExtractReport, extract_features, head_inputs, open_cache, print_extract_report
from ..trust import fit_trust
from ..bundle.card import write_model_card
from ..bundle.signature import configured_key
from ..bundle.store import Bundle, check_output_folder, is_oct, load_bundle, positive_classes_for, save_bundle
from ..models.heads import HEADS, HeadConfig, check_head_config, head_probabilities
from ..models.registry import DEFAULT_BACKBONE, Backbone, check_resize, create_backbone, resolve_precision, resolve_spec
from .distributed import World, barrier, check_world, from_main, process_group, torchrun_world
from .images import balance_options, check_image_config, training_device
from .image_runs import checkpoint_dir, train_images, train_images_cv
from .selection import _Data, _Trained, cv_folds, drop_near_duplicates, prepare_data, train_bottleneck_cv, without_val
from .trainer import TrainConfig, TrainResult, check_train_config, fit_logistic_head, train_head, write_curves


@dataclass
class RunConfig(RunConfigBase):
    """Everything a `train` run was given (RunConfigBase, with every default, plus the TrainConfig):
    saved as config.json in the bundle."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(head=HeadConfig(kind=AUTO_HEAD)))


def run_config_from_dict(d: dict[str, Any]) -> RunConfig:
    """A RunConfig back from a bundle's config.json (older bundles lack the image-mode fields)."""
    d = {"cv": 0} | dict(d)  # bundles from before cross-validation chose on one validation split
    extract = {"resize": "squash"} | d.get("extract", {})  # and from before --resize squashed every image
    return RunConfig(**d | {"extract": ExtractConfig(**extract), "split": SplitConfig(**d.get("split", {})),
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
                     recipe: str | None = None, batchnorm: str | None = None,
                     target_sensitivity: float | None = None, sign_key: str | Path | None = None,
                     cv: int | None = None, input_size: int | None = None, resize: str | None = None,
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
                                sign_key=str_or_none(sign_key), cv=cv),
        extract=ExtractConfig(**given(backbone=backbone, weights=str_or_none(weights), pretrained=pretrained,
                                      precision=precision, workers=workers, cache=str_or_none(cache),
                                      input_size=input_size, resize=resize)),
        split=SplitConfig(**given(val_fraction=val_fraction, seed=seed)),
        train=replace(run_train, head=replace(run_train.head, **given(kind=head, hidden=hidden)), **train_options,
                      **given(epochs=epochs or MODE_EPOCHS.get(mode), seed=seed, class_weights=weighted)),
        images=ImageTrainConfig(**given(unfreeze=unfreeze, backbone_lr_scale=backbone_lr_scale,
                                        warmup_epochs=warmup_epochs, augment=augment, oversample=oversample,
                                        recipe=recipe, batchnorm=batchnorm, workers=workers, device=device)))


def _balance(balance: str | None, class_weights: bool | None) -> str | None:
    """`--class-weights` is an alias of `--balance weights`: with any other --balance it is a contradiction."""
    if not class_weights:
        return balance
    if balance not in (None, "none", "weights"):
        raise RetinaLensError(f"--class-weights is --balance weights: it cannot go with --balance {balance}")
    return "weights"


def default_head(mode: str, scratch: bool) -> HeadConfig:
    """The head each image mode trains when --head is auto: the original methods' own."""
    if scratch:
        return HeadConfig(kind="dense", hidden=128, dropout=0.25)  # EyeNet: Dense 128, Dropout 0.25
    return HeadConfig(kind="linear", hidden=64, dropout=0.0)  # GAP + Dense(64, relu) + softmax


def train_bundle(cfg: RunConfig, out: str | Path, *, progress: bool = True, data: _Data | None = None,
                 lineage: dict[str, Any] | None = None, input_like: Preprocessing | None = None,
                 out_of_fold: dict[str, Any] | None = None, found: Dataset | None = None) -> Bundle | None:
    """`data`: a dataset with its splits already made (retraining keeps its parent's splits);
    `lineage`: the bundle's version and parent (default: version 1, no parent); `input_like`: feed the
    backbone pixels of this size and resampling (an ensemble's members share one input, train/ensemble.py);
    `out_of_fold`: under cross-validation, filled with the chosen model's out-of-fold probabilities
    ("probabilities", "sha256" of each image, "fold"), which an ensemble averages over its members;
    `found`: the data set as discovered, where the caller has read it already (prepare_data's).
    Under torchrun every rank calls this; rank 0 returns the bundle it wrote, the others None
    (train/distributed.py)."""
    out, world = Path(out).expanduser(), torchrun_world()
    cfg = resolve_resize(cfg)  # one network: "auto" is the squash here (the two-view input is train_ensemble's)
    check_run(cfg, out)
    check_world(cfg.mode, cfg.train.batch_size, world.size)
    x = cfg.extract
    precision = resolve_precision(x.precision)
    scratch = resolve_spec(x.backbone).from_scratch
    # The pretrained backbone: the bottleneck's extractor, the image modes' starting point, and the
    # baseline's features (a from-scratch model is measured against the default backbone's).
    pretrained = create_backbone(DEFAULT_BACKBONE if scratch else x.backbone, weights=None if scratch else x.weights,
                                 pretrained=x.pretrained, input_size=x.input_size, resize=x.resize, view=x.view)
    if input_like is not None:
        pretrained.preprocessing = replace(pretrained.preprocessing, size=input_like.size,
                                           interpolation=input_like.interpolation, resize=input_like.resize)
    data = data or prepare_data(cfg, pretrained.preprocessing, found)  # screened through the model input it will see
    k = cv_folds(cfg, len(data.splits.train) + len(data.splits.val))
    if k:
        data = without_val(data)
        console().print(f"{k}-fold cross-validation on the {len(data.splits.train)} training images (folds grouped by "
                        "patient, stratified by class), then a refit on all of them")
    image_head = default_head(cfg.mode, scratch) if cfg.train.head.kind == "auto" else cfg.train.head
    spatial = "conv" in _candidates(cfg) if cfg.mode == "bottleneck" else (
        cfg.mode == "frozen" and image_head.input_kind == "spatial")
    with process_group(world, training_device(cfg.mode, cfg.images, pretrained, world)):
        cache, report = _extract(data, pretrained, x, precision, spatial, progress, world)
        # Near-duplicates are judged on the whole scan's features, on which the rule's thresholds were
        # measured (data/near_duplicates.py): a network reading the band view of the two-view input takes
        # them from the squash view's (on the band's, scans of two patients and classes met the rule).
        whole = VIEWS[x.resize][0]
        dups = cache if pretrained.preprocessing.view in ("whole", whole) else _extract(
            data, create_backbone(x.backbone, weights=x.weights, pretrained=x.pretrained, input_size=x.input_size,
                                  resize=x.resize, view=whole), x, precision, False, False, world)[0]
        # Near-duplicates found once, on rank 0, whose cache is whole; every rank trains on its data.
        data = from_main(world, drop_near_duplicates(data, dups, cross_validated=bool(k)) if world.main else None)
        # The samples the cache could read: rank 0's list, for ranks whose cache (on another machine) is partial.
        idx = from_main(world, {n: data.index(n, cache) for n in ("train", "val", "test")} if world.main else None)
        y = {n: data.labels(ix) for n, ix in idx.items()}
        fits: dict[float, Any] = {}  # the baseline's C=0.1 model is one of the logreg head's candidates: fitted once
        if world.main:
            pooled = {n: cache.pooled(data.keys(idx[n])) for n in ("train", "val")}
            if not k:  # the baseline on the same split (cross-validation measures it on the same folds)
                baseline = fit_logistic_head(pooled["train"], y["train"], pooled["val"], y["val"],
                                             num_classes=len(data.ds.classes), feature_shape=cache.key.feature_shape,
                                             seed=cfg.train.seed, cs=(0.1,), fits=fits).val_metrics
        start = create_backbone(x.backbone, seed=cfg.train.seed, input_size=x.input_size) if scratch else pretrained
        if k and cfg.mode != "bottleneck":  # k trainings on images, then a refit (train/image_runs.py)
            trained = train_images_cv(cfg, data, cache, idx["train"], y["train"], start, image_head, k, out,
                                      precision, progress, world)
            baseline = trained.baseline or {}
        elif k:
            trained = train_bottleneck_cv(cfg, data, cache, idx["train"], y["train"], pretrained, k, progress)
            baseline = trained.baseline or {}
        elif cfg.mode == "bottleneck":
            trained = _train_bottleneck(cfg, data, cache, idx, y, pooled, pretrained, progress, fits)
        else:
            trained = train_images(cfg, data, out, start, image_head, idx, y, progress, world)
        if cfg.mode != "bottleneck" and trained.backbone is not pretrained:  # new weights: cache their features
            cache, report = _extract(data, trained.backbone, x, precision, trained.head_config.input_kind == "spatial",
                                     progress, world)
    if not world.main:
        return None
    if out_of_fold is not None and trained.oof is not None:
        out_of_fold |= {"probabilities": trained.oof, "sha256": data.keys(idx["train"]), "fold": trained.folds.fold}
    bundle = _finish(cfg, out, data, trained, cache, report, precision, baseline,
                     lineage or {"version": 1, "parent": None})
    if cfg.mode != "bottleneck":
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)  # the bundle holds everything now
    return bundle


def resolve_resize(cfg: RunConfig, two_view: bool = False, classes: Sequence[str] = ()) -> RunConfig:
    """--resize auto made concrete, and saved so in config.json: the two-view input (squash+band) when
    the run can take it (`two_view`: train/ensemble.two_view_fits) and the data (`classes`: the
    discovered data's) are OCT B-scans of the four Kermany classes with no --task, since it beat the
    squash on train's own folds (README "The two-view input, through `train`"); the squash otherwise:
    fundus photos, other labels, image modes."""
    if cfg.extract.resize != AUTO_RESIZE:
        return cfg
    oct_scans = two_view and not cfg.task and is_oct(list(classes))
    return replace(cfg, extract=replace(cfg.extract, resize="squash+band" if oct_scans else "squash"))


def check_input(cfg: RunConfig, tta: tuple[str, ...] = ("identity",)) -> None:
    """--resize (and a member's view of it) against the mode, the task and test-time views."""
    check_resize(cfg.extract.resize, cfg.extract.view)
    if cfg.extract.resize != "squash" and (cfg.mode != "bottleneck" or len(tta) > 1):
        raise RetinaLensError(f"--resize {cfg.extract.resize} trains bottleneck members only and takes no --tta "
                              "(a flip, a crop and the image modes' augmentations take a squashed input)")
    if cfg.extract.resize == "squash+band" and cfg.task:  # the retinal band is an OCT B-scan's
        raise RetinaLensError(f"--resize squash+band is for OCT B-scans: it cannot go with --task {cfg.task}")


def check_run(cfg: RunConfig, out: Path) -> None:
    """Everything that can be wrong with the options is found before minutes of work, not after."""
    check_output_folder(out)
    configured_key(cfg.sign_key)  # a missing or short key file fails now, not after training
    check_train_config(cfg.train)
    if cfg.cv is not None and cfg.cv < 0:
        raise RetinaLensError(f"--cv must be 0 (one validation split) or a number of folds >= 2, got {cfg.cv}")
    if not 0 < cfg.target_sensitivity <= 1:
        raise RetinaLensError(f"--target-sensitivity must be in (0, 1], got {cfg.target_sensitivity}")
    resolve_precision(cfg.extract.precision)
    spec = resolve_spec(cfg.extract.backbone)
    check_input(cfg)
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


def _extract(data: _Data, backbone: Backbone, x: ExtractConfig, precision: str, spatial: bool,
             progress: bool, world: World = World()) -> tuple[FeatureCache, ExtractReport]:
    """Cache every image's features. Test images too (their labels are not looked at): evaluate is instant.

    Several ranks first extract a share each (the cache takes shards side by side); then rank 0 reads
    the whole and extracts what no rank wrote where it looks (a cache folder not shared between machines)."""
    paths = [s.path for s in data.ds.samples]
    for shard in ([(world.rank, world.size)] if world.size > 1 else []) + ([(0, 1)] if world.main else []):
        cache = open_cache(x.cache, backbone, precision, spatial=spatial)
        report = extract_features(paths, data.hashes, backbone, cache, precision=precision, batch_size=x.batch_size,
                                  chunk_size=x.chunk_size, workers=x.workers, progress=progress and world.main,
                                  shard=shard)
        if shard[1] > 1:
            barrier(world)
    if world.main:
        print_extract_report(report)
    return cache, report


def _candidates(cfg: RunConfig) -> tuple[str, ...]:
    return ("conv", "logreg") if cfg.train.head.kind == "auto" else (cfg.train.head.kind,)


def _train_bottleneck(cfg: RunConfig, data: _Data, cache: FeatureCache, idx: dict[str, list[int]],
                      y: dict[str, np.ndarray], pooled: dict[str, np.ndarray], backbone: Backbone,
                      progress: bool, fits: dict[float, Any]) -> _Trained:
    shape, k = cache.key.feature_shape, len(data.ds.classes)
    results: dict[str, TrainResult] = {}
    for kind in _candidates(cfg):
        if kind == "logreg":
            results[kind] = fit_logistic_head(pooled["train"], y["train"], pooled["val"], y["val"], num_classes=k,
                                              feature_shape=shape, seed=cfg.train.seed, fits=fits)
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


def _finish(cfg: RunConfig, out: Path, data: _Data, trained: _Trained, cache: FeatureCache, report: ExtractReport,
            precision: str, baseline: dict[str, float], lineage: dict[str, Any]) -> Bundle:
    """Validation metrics through the inference path, the manifest, the bundle, the curves."""
    ds, task, hc = data.ds, data.task, trained.head_config
    idx = {n: data.index(n, cache) for n in ("train", "val")}
    if trained.folds is not None:  # cross-validation: "validation" is every training image, out of fold
        held, val_probs, where = idx["train"], trained.oof, f"{trained.folds.k}-fold cross-validation (out of fold)"
        fit, gate_held = (np.asarray(idx["train"])[part].tolist() for part in trained.folds.split(0))
        gate = {"train": fit, "val": gate_held}  # the gate: one fold's held-out images against the rest
    else:
        held, where, gate = idx["val"], "validation", idx
        val_probs = head_probabilities(trained.result.head, head_inputs(cache, data.keys(held), hc.input_kind))
    y_val = data.labels(held)
    positives = positive_classes_for(ds.classes, task)
    val_metrics = classification_metrics(y_val, val_probs, ds.classes, [ds.samples[i].patient for i in held],
                                         positive_classes=positives or None, n_boot=200, seed=cfg.train.seed,
                                         ordinal=bool(task and task.ordinal))
    say = console()
    say.print(f"{where} accuracy: " + ", ".join(f"{kd} head {v['val_acc']:.3f}" for kd, v in trained.selection["candidates"].items())
              + f"; logistic-regression baseline {baseline['val_acc']:.3f}; using the {hc.kind} head"
              + (f" ({cfg.mode} training on images)" if cfg.mode != "bottleneck" else ""))
    if val_metrics["accuracy"] < baseline["val_acc"]:
        say.print(f"[yellow]note: this model is below the logistic-regression baseline on {where} "
                  f"({val_metrics['accuracy']:.3f} < {baseline['val_acc']:.3f})[/]")
    config = _jsonable(asdict(replace(cfg, sign_key=None)))  # where the key lies is not the bundle's to tell
    sections: dict[str, Any] = {
        "training": {"data": str(ds.root), "layout": ds.layout, "mode": cfg.mode, "splits": data.summary,
                     "best_epoch": trained.result.best_epoch, "epochs_run": len(trained.result.history),
                     # every file that could not be read: at extraction, at screening, or no file at all
                     "extract_failures": len(report.failures) + len(data.ds.skipped)
                     + sum(d["reason"] == "unreadable" for d in data.screened), "screened": data.screened,
                     "head_selection": trained.selection,
                     "baseline_logistic_regression": baseline, "config": config,
                     **({"cv": trained.cv} if trained.cv else {})},
        "validation": {k: val_metrics[k] for k in ("accuracy", "accuracy_ci", "roc_auc_macro", "n_images", "n_patients")}
        | {"loss": trained.result.val_metrics["val_loss"], "source": where},
        "metrics": {}, "lineage": lineage,
    }
    split_hashes = {n: sorted({data.hashes[i] for i in data.splits.indices(n)}) for n in ("train", "val", "test")}
    folds = ({"folds": dict(sorted(zip(data.keys(idx["train"]), trained.folds.fold.tolist())))}
             if trained.folds is not None else {})  # sha256 -> fold: the folds, image for image
    files = {"config.json": json.dumps(config, indent=2).encode(),
             "splits.json": json.dumps({"sha256": split_hashes, "removed": data.splits.removed} | folds,
                                       indent=1).encode()}
    # Calibration, the referral operating point and the quality gate, fitted on validation or out of
    # fold (trust/fit.py).
    trust, trust_files = fit_trust(
        val_probs=val_probs, val_y=y_val, classes=ds.classes, positive_classes=positives,
        train_pooled=cache.pooled(data.keys(gate["train"])), val_pooled=cache.pooled(data.keys(gate["val"])),
        val_paths=[ds.samples[i].path for i in gate["val"]], preprocessing=trained.backbone.preprocessing,
        target_sensitivity=cfg.target_sensitivity, workers=cfg.extract.workers, seed=cfg.train.seed,
        folds=trained.folds.fold if trained.folds is not None else None)
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
