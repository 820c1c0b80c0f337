"""Images to model bundle: discover -> split by patient -> extract features -> train head -> bundle."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._console import console
from ..data.discover import discover
from ..data.hashing import sha256_files
from ..data.splits import SplitConfig, make_splits
from ..evaluate.metrics import classification_metrics
from ..features.extract import extract_features, head_inputs, open_cache, print_extract_report
from ..models.heads import head_probabilities
from ..models.bundle import Bundle, OCT_REFERRAL, load_bundle, save_bundle
from ..models.registry import DEFAULT_BACKBONE, create_backbone, resolve_precision
from .trainer import TrainConfig, train_head, write_curves


@dataclass
class ExtractConfig:
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # a local weights file instead of the registry's default
    pretrained: bool = True  # False: random weights (timing only)
    precision: str = "auto"  # auto = bf16 where the CPU/GPU has fast bf16, else fp32
    batch_size: int = 32
    chunk_size: int = 256
    workers: int = 1  # decoding processes
    cache: str | None = None


@dataclass
class RunConfig:
    """Everything a `train` run was given: saved as config.json in the bundle."""

    data: str
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    patient_regex: str | None = None
    images_dir: str | None = None


def _logistic_baseline(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                       seed: int) -> dict[str, float]:
    """The simplest strong baseline on the same split: logistic regression on pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    model.fit(x_train, y_train)
    return {"val_acc": float(model.score(x_val, y_val))}


def train_bundle(cfg: RunConfig, out: str | Path, *, progress: bool = True) -> Bundle:
    say = console()
    ds = discover(cfg.data, patient_regex=cfg.patient_regex, images_dir=cfg.images_dir)
    hashes = sha256_files(s.path for s in ds.samples)
    splits = make_splits(ds, cfg.split, hashes)
    summary = splits.summary(ds)
    say.print(f"[bold]{ds.root}[/]: {len(ds)} images, classes {', '.join(ds.classes)}; "
              + "; ".join(f"{k} {v['n_images']} images / {v['n_patients']} patients" for k, v in summary.items() if k != "removed"))
    if splits.removed:
        say.print(f"removed {len(splits.removed)} image(s) to keep splits disjoint: {summary['removed']['reasons']}")

    x = cfg.extract
    backbone = create_backbone(x.backbone, weights=x.weights, pretrained=x.pretrained)
    precision = resolve_precision(x.precision)
    cache = open_cache(x.cache, backbone, precision, spatial=cfg.train.head.input_kind == "spatial")
    # Test images are extracted too (their labels are not looked at) so that evaluate is instant.
    report = extract_features([s.path for s in ds.samples], hashes, backbone, cache, precision=precision,
                              batch_size=x.batch_size, chunk_size=x.chunk_size, workers=x.workers, progress=progress)
    print_extract_report(report)

    idx = {name: [i for i in splits.indices(name) if hashes[i] in cache] for name in ("train", "val", "test")}
    class_index = {c: k for k, c in enumerate(ds.classes)}
    y = {n: np.array([class_index[ds.samples[i].label] for i in ix], dtype=np.int64) for n, ix in idx.items()}
    kind = cfg.train.head.input_kind
    xs = {n: head_inputs(cache, [hashes[i] for i in idx[n]], kind) for n in ("train", "val")}
    shape = cache.key.feature_shape
    result = train_head(xs["train"], y["train"], xs["val"], y["val"], num_classes=len(ds.classes),
                        feature_shape=shape, cfg=cfg.train, progress=progress)

    pooled = {n: cache.pooled([hashes[i] for i in idx[n]]) for n in ("train", "val")}
    baseline = _logistic_baseline(pooled["train"], y["train"], pooled["val"], y["val"], cfg.train.seed)
    val_probs = head_probabilities(result.head, xs["val"])
    urgent = [c for c in ds.classes if OCT_REFERRAL.get(c.upper()) == "urgent"]
    val_metrics = classification_metrics(y["val"], val_probs, ds.classes, [ds.samples[i].patient for i in idx["val"]],
                                         positive_classes=urgent or None, n_boot=200, seed=cfg.train.seed)
    say.print(f"best epoch {result.best_epoch}: validation accuracy {val_metrics['accuracy']:.3f} "
              f"(logistic-regression baseline on pooled features: {baseline['val_acc']:.3f})")

    sections: dict[str, Any] = {
        "training": {"data": str(ds.root), "layout": ds.layout, "splits": summary, "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "extract_failures": len(report.failures),
                     "baseline_logistic_regression": baseline, "config": _jsonable(asdict(cfg))},
        "validation": {k: val_metrics[k] for k in ("accuracy", "accuracy_ci", "roc_auc_macro", "n_images", "n_patients")}
        | {"loss": result.val_metrics["val_loss"]},
        "metrics": {},
    }
    split_hashes = {n: sorted({hashes[i] for i in splits.indices(n)}) for n in ("train", "val", "test")}
    files = {"config.json": json.dumps(_jsonable(asdict(cfg)), indent=2).encode(),
             "splits.json": json.dumps({"sha256": split_hashes, "removed": splits.removed}, indent=1).encode()}
    path = save_bundle(out, backbone=backbone, head=result.head, head_config=cfg.train.head, classes=ds.classes,
                       precision=precision, feature_shape=shape, sections=sections, files=files)
    write_curves(result, path)
    return load_bundle(path)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
