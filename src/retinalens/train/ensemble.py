"""`train --ensemble / --seeds / --tta`: one bundle holding several networks and test-time views.

Each member (a backbone, a seed) is a complete `train_bundle` run on one shared, screened split, with
its own head chosen on validation and its own temperature. The members are then written into one
bundle (bundle/manifest.py's `members`, every file hashed) whose prediction is the average of their
probabilities over the test-time views (bundle/network.py's Ensemble). The bundle's own temperature,
its referral threshold and its quality gate are fitted on that average on validation, through the
prediction path itself (predict/ensemble.py); the gate reads the first member's identity-view
features, so it is the first member's gate, refitted on the same numbers.

Members share one input: the first backbone's size and resampling (each normalises with its own mean
and std), so that an image is decoded once and the exported graph has one input. Only the bottleneck
mode trains ensembles (an image mode rebuilds the backbone at its own size).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .._console import console
from ..bundle.card import write_model_card
from ..bundle.members import BundleMember
from ..bundle.network import VIEWS
from ..bundle.signature import configured_key
from ..bundle.store import CURVES, CURVES_PNG, Bundle, check_output_folder, load_bundle, positive_classes_for, save_bundle
from ..config import EnsembleConfig
from ..errors import RetinaLensError
from ..evaluate.metrics import classification_metrics
from ..features.extract import open_cache
from ..models.registry import create_backbone, resolve_spec
from ..predict.ensemble import ensemble_outputs
from ..trust import fit_trust
from ..trust.calibration import calibrated
from .pipeline import RunConfig, _prepare, train_bundle

MAX_MEMBERS = 16  # the manifest schema's bound


def ensemble_config(backbones: str | Sequence[str] | None = None, seeds: str | Sequence[int] | None = None,
                    tta: str | Sequence[str] | None = None) -> EnsembleConfig:
    """The CLI's comma lists (`lite0,lite1`, `0,1,2`, `flip,crop`) or sequences -> EnsembleConfig;
    identity always comes first among the views."""
    def items(v: str | Sequence[Any] | None) -> list[str]:
        return [] if v is None else [str(x).strip() for x in (v.split(",") if isinstance(v, str) else v) if str(x).strip()]

    try:
        seed_list = tuple(int(s) for s in items(seeds))
    except ValueError:
        raise RetinaLensError(f"--seeds takes whole numbers separated by commas, got {seeds!r}") from None
    views = [v for v in items(tta) if v != "identity"]
    bad = sorted(set(views) - set(VIEWS))
    if bad or len(set(views)) != len(views):
        raise RetinaLensError(f"--tta takes distinct views among {', '.join(VIEWS[1:])}, got {tta!r}")
    return EnsembleConfig(backbones=tuple(items(backbones)), seeds=seed_list, tta=("identity", *views))


def member_runs(cfg: RunConfig, ens: EnsembleConfig) -> list[RunConfig]:
    """One RunConfig per member: every backbone once per seed (the split's seed stays the run's)."""
    backbones = ens.backbones or (cfg.extract.backbone,)
    seeds = ens.seeds or (cfg.train.seed,)
    return [replace(cfg, extract=replace(cfg.extract, backbone=b), train=replace(cfg.train, seed=s))
            for b in backbones for s in seeds]


def check_ensemble(cfg: RunConfig, ens: EnsembleConfig, runs: list[RunConfig]) -> None:
    if len(runs) > MAX_MEMBERS:
        raise RetinaLensError(f"an ensemble holds at most {MAX_MEMBERS} members, got {len(runs)}")
    if len({(r.extract.backbone, r.train.seed) for r in runs}) != len(runs):
        raise RetinaLensError("--ensemble and --seeds name the same member twice")
    if cfg.mode != "bottleneck":
        raise RetinaLensError(f"ensembles train in --mode bottleneck (got --mode {cfg.mode})")
    if cfg.extract.weights and len({r.extract.backbone for r in runs}) > 1:
        raise RetinaLensError("--weights is one backbone's file: it cannot go with several --ensemble backbones")
    for r in runs:
        if resolve_spec(r.extract.backbone).from_scratch:
            raise RetinaLensError(f"'{r.extract.backbone}' has no pretrained weights: it cannot be an ensemble member")


def train_ensemble(cfg: RunConfig, ens: EnsembleConfig, out: str | Path, *, progress: bool = True) -> Bundle:
    """Train every member on one split and write them as one bundle (see the module's notes)."""
    out = Path(out).expanduser()
    runs = member_runs(cfg, ens)
    if len(runs) == 1 and len(ens.tta) == 1:  # one network seen once: a plain bundle (of that backbone, seed)
        return train_bundle(runs[0], out, progress=progress)
    check_ensemble(cfg, ens, runs)
    check_output_folder(out)
    key = configured_key(cfg.sign_key)
    say = console()
    first = create_backbone(runs[0].extract.backbone, weights=cfg.extract.weights, pretrained=cfg.extract.pretrained,
                            input_size=cfg.extract.input_size)
    data = _prepare(cfg, first.preprocessing)  # one screened split for every member
    with tempfile.TemporaryDirectory(prefix="retinalens-ensemble-") as tmp:
        bundles = []
        for k, run in enumerate(runs):
            say.print(f"[bold]member {k + 1} of {len(runs)}:[/] {run.extract.backbone}, seed {run.train.seed}")
            bundles.append(train_bundle(run, Path(tmp) / f"member{k}", progress=progress, data=data,
                                        input_like=first.preprocessing))
        return _combine(cfg, ens, runs, bundles, data, out, key)


def _member_file(k: int, what: str) -> str:
    return f"{what}.safetensors" if k == 0 else f"member{k}.{what}.safetensors"


def _combine(cfg: RunConfig, ens: EnsembleConfig, runs: list[RunConfig], bundles: list[Bundle], data: Any,
             out: Path, key: bytes | None) -> Bundle:
    lead = bundles[0]
    classes, task = data.ds.classes, data.task
    # Each member with its own temperature (a single bundle's calibration is its network's).
    members = [BundleMember(b.path, replace(b.manifest.ensemble()[0], temperature=b.temperature), b.head)
               for b in bundles]
    val = data.splits.indices("val")
    val_paths = [data.ds.samples[i].path for i in val]
    keep, val_raw, val_pooled, _ = ensemble_outputs(members, ens.tta, val_paths, workers=cfg.extract.workers)
    val = [val[j] for j in keep]
    y_val = data.labels(val)
    cache = open_cache(cfg.extract.cache, lead.backbone, lead.precision, spatial=False)
    train_idx = data.index("train", cache)
    positives = positive_classes_for(classes, task)
    trust, trust_files = fit_trust(
        val_probs=val_raw, val_y=y_val, classes=classes, positive_classes=positives,
        train_pooled=cache.pooled(data.keys(train_idx)), val_pooled=val_pooled, val_paths=[val_paths[j] for j in keep],
        preprocessing=lead.preprocessing, target_sensitivity=cfg.target_sensitivity, workers=cfg.extract.workers,
        seed=cfg.train.seed)
    temperature = (trust.get("calibration") or {}).get("temperature")
    m = classification_metrics(y_val, calibrated(val_raw, temperature), classes, [data.ds.samples[i].patient for i in val],
                               positive_classes=positives or None, n_boot=200, seed=cfg.train.seed,
                               ordinal=bool(task and task.ordinal))
    lead_doc = lead.manifest.to_dict()
    entries = []
    for k, (b, run) in enumerate(zip(bundles, runs)):
        d = b.manifest.to_dict()
        entries.append({"backbone": d["backbone"], "features": d["features"], "head": d["head"],
                        "temperature": b.temperature,
                        "files": {"backbone": _member_file(k, "backbone"), "head": _member_file(k, "head")},
                        "seed": run.train.seed, "validation": d.get("validation", {})})
    say = console()
    say.print("validation accuracy: " + ", ".join(
        f"{r.extract.backbone} seed {r.train.seed} {b.manifest.validation.get('accuracy', float('nan')):.3f}"
        for r, b in zip(runs, bundles)) + f"; ensemble ({', '.join(ens.tta)}) {m['accuracy']:.3f}")
    sections = {
        "training": lead_doc.get("training", {}) | {"ensemble": asdict(ens) | {"n_members": len(runs)}},
        "validation": {k: m[k] for k in ("accuracy", "accuracy_ci", "roc_auc_macro", "n_images", "n_patients")},
        "metrics": {}, "lineage": lead_doc.get("lineage", {"version": 1, "parent": None}),
        "members": entries, "tta": {"views": list(ens.tta)},
    } | trust
    files = {name: (lead.path / name).read_bytes() for name in ("config.json", "splits.json", CURVES, CURVES_PNG)
             if name in lead.manifest.files}
    for k, b in enumerate(bundles[1:], start=1):
        for what in ("backbone", "head"):
            files[_member_file(k, what)] = (b.path / f"{what}.safetensors").read_bytes()
    path = save_bundle(out, backbone=lead.backbone, head=lead.head, head_config=lead.head_config, classes=classes,
                       precision=lead.precision, feature_shape=lead.manifest.feature_shape, sections=sections,
                       files=files | trust_files, task=task, referral=dict(task.referral) if task else None,
                       sign_key=key)
    bundle = load_bundle(path, key=cfg.sign_key)
    write_model_card(bundle)
    return bundle
