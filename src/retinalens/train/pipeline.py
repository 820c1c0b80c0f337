"""Images to model bundle: discover -> split by patient -> extract features -> train head -> bundle."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._console import console
from ..data.discover import discover
from ..data.hashing import sha256_files
from ..data.splits import SplitConfig, make_splits
from ..data.tasks import apply_task, get_task
from ..evaluate.metrics import classification_metrics
from ..features.extract import extract_features, head_inputs, open_cache, print_extract_report
from ..models.heads import HEADS, HeadConfig, check_head_config, head_probabilities
from ..models.bundle import Bundle, check_output_folder, load_bundle, positive_classes_for, save_bundle
from ..models.registry import DEFAULT_BACKBONE, create_backbone, resolve_precision, resolve_spec
from .trainer import TrainConfig, TrainResult, check_train_config, fit_logistic_head, train_head, write_curves


@dataclass
class ExtractConfig:
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # a local weights file instead of the registry's default
    pretrained: bool = True  # False: random weights (timing only)
    precision: str = "auto"  # auto = bf16 where the CPU/GPU has fast bf16, else fp32
    batch_size: int = 16  # measured best on a 2-core CPU for both default backbones (bf16)
    chunk_size: int = 256
    workers: int = 0  # 0: decode in threads between backbone calls; N: N decoding processes
    cache: str | None = None


@dataclass
class RunConfig:
    """Everything a `train` run was given: saved as config.json in the bundle."""

    data: str
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(head=HeadConfig(kind="auto")))
    patient_regex: str | None = None
    images_dir: str | None = None
    task: str | None = None  # None: the labels as they are (OCT classes); "referable" or "grade": DR grades 0-4


def train_bundle(cfg: RunConfig, out: str | Path, *, progress: bool = True) -> Bundle:
    say = console()
    # Everything that can be wrong with the options is found before minutes of work, not after.
    check_output_folder(Path(out).expanduser())
    check_head_config(cfg.train.head, ("auto", *HEADS))
    check_train_config(cfg.train)
    resolve_precision(cfg.extract.precision)
    resolve_spec(cfg.extract.backbone)
    task = get_task(cfg.task)
    ds, dropped = apply_task(discover(cfg.data, patient_regex=cfg.patient_regex, images_dir=cfg.images_dir), task)
    for d in dropped:
        say.print(f"[red]skipped[/] {d['path']}: {d['reason']}")
    hashes = sha256_files(s.path for s in ds.samples)
    splits = make_splits(ds, cfg.split, hashes)
    summary = splits.summary(ds)
    say.print(f"[bold]{ds.root}[/]: {len(ds)} images, classes {', '.join(ds.classes)}; "
              + "; ".join(f"{k} {v['n_images']} images / {v['n_patients']} patients" for k, v in summary.items() if k != "removed"))
    if splits.removed:
        say.print(f"removed {len(splits.removed)} image(s) to keep splits disjoint: {summary['removed']['reasons']}")

    candidates = ("conv", "logreg") if cfg.train.head.kind == "auto" else (cfg.train.head.kind,)
    x = cfg.extract
    backbone = create_backbone(x.backbone, weights=x.weights, pretrained=x.pretrained)
    precision = resolve_precision(x.precision)
    cache = open_cache(x.cache, backbone, precision, spatial="conv" in candidates)
    # Test images are extracted too (their labels are not looked at) so that evaluate is instant.
    report = extract_features([s.path for s in ds.samples], hashes, backbone, cache, precision=precision,
                              batch_size=x.batch_size, chunk_size=x.chunk_size, workers=x.workers, progress=progress)
    print_extract_report(report)

    idx = {name: [i for i in splits.indices(name) if hashes[i] in cache] for name in ("train", "val", "test")}
    class_index = {c: k for k, c in enumerate(ds.classes)}
    y = {n: np.array([class_index[ds.samples[i].label] for i in ix], dtype=np.int64) for n, ix in idx.items()}
    shape, k = cache.key.feature_shape, len(ds.classes)
    pooled = {n: cache.pooled([hashes[i] for i in idx[n]]) for n in ("train", "val")}
    # The simplest strong baseline, on the same split: every run is measured against it.
    baseline = fit_logistic_head(pooled["train"], y["train"], pooled["val"], y["val"], num_classes=k,
                                 feature_shape=shape, seed=cfg.train.seed, cs=(0.1,)).val_metrics

    results: dict[str, TrainResult] = {}
    for kind in candidates:
        if kind == "logreg":
            results[kind] = fit_logistic_head(pooled["train"], y["train"], pooled["val"], y["val"], num_classes=k,
                                              feature_shape=shape, seed=cfg.train.seed)
        else:
            xs = {n: head_inputs(cache, [hashes[i] for i in idx[n]], "spatial" if kind == "conv" else "pooled")
                  for n in ("train", "val")}
            tcfg = replace(cfg.train, head=replace(cfg.train.head, kind=kind))
            results[kind] = train_head(xs["train"], y["train"], xs["val"], y["val"], num_classes=k,
                                       feature_shape=shape, cfg=tcfg, progress=progress)
    # Chosen on validation (accuracy, then loss), never on test.
    chosen = max(results, key=lambda kd: (results[kd].val_metrics["val_acc"], -results[kd].val_metrics["val_loss"]))
    result = results[chosen]
    head_config = replace(cfg.train.head, kind=chosen, dropout=0.0 if chosen == "logreg" else cfg.train.head.dropout)
    val_x = head_inputs(cache, [hashes[i] for i in idx["val"]], head_config.input_kind)
    positives = positive_classes_for(ds.classes, task)
    val_metrics = classification_metrics(y["val"], head_probabilities(result.head, val_x), ds.classes,
                                         [ds.samples[i].patient for i in idx["val"]], positive_classes=positives or None,
                                         n_boot=200, seed=cfg.train.seed, ordinal=bool(task and task.ordinal))
    selection = {kd: {"val_acc": r.val_metrics["val_acc"], "val_loss": r.val_metrics["val_loss"]} for kd, r in results.items()}
    say.print("validation accuracy: " + ", ".join(f"{kd} head {v['val_acc']:.3f}" for kd, v in selection.items())
              + f"; logistic-regression baseline {baseline['val_acc']:.3f}; using the {chosen} head")

    sections: dict[str, Any] = {
        "training": {"data": str(ds.root), "layout": ds.layout, "splits": summary, "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "extract_failures": len(report.failures),
                     "head_selection": {"candidates": selection, "chosen": chosen, "by": "validation accuracy, then loss"},
                     "baseline_logistic_regression": baseline, "config": _jsonable(asdict(cfg))},
        "validation": {k: val_metrics[k] for k in ("accuracy", "accuracy_ci", "roc_auc_macro", "n_images", "n_patients")}
        | {"loss": result.val_metrics["val_loss"]},
        "metrics": {},
    }
    split_hashes = {n: sorted({hashes[i] for i in splits.indices(n)}) for n in ("train", "val", "test")}
    files = {"config.json": json.dumps(_jsonable(asdict(cfg)), indent=2).encode(),
             "splits.json": json.dumps({"sha256": split_hashes, "removed": splits.removed}, indent=1).encode()}
    path = save_bundle(out, backbone=backbone, head=result.head, head_config=head_config, classes=ds.classes,
                       precision=precision, feature_shape=shape, sections=sections, files=files, task=task,
                       referral=dict(task.referral) if task else None)
    trained = next((r for r in (result, *results.values()) if r.has_curves), None)
    if trained is not None:  # a fitted logistic head has no epochs; show the trained candidate's
        write_curves(trained, path)
    return load_bundle(path)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
