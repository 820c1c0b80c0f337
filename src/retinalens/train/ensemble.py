"""`train --ensemble / --seeds / --tta`: one bundle holding several networks and test-time views.

Each member (a backbone, bottleneck or fine-tuned on images, and a seed) is a complete `train_bundle`
run on one shared, screened split, with its own head and its own temperature. The members are then
written into one bundle (bundle/manifest.py's `members`, every file hashed) whose prediction is the
average of their probabilities over the test-time views (bundle/network.py's Ensemble).

The bundle's own temperature, its referral threshold and its quality gate are fitted on held-out
probabilities of that average:
- under cross-validation (the default on small data) every member is cross-validated on the same
  folds and the average is taken over the members' out-of-fold probabilities, each after its own
  temperature: no image is scored by a member that trained on it;
- with one validation split (`--cv 0`, or test-time views, which no out-of-fold cache holds), on the
  validation images through the prediction path itself (predict/ensemble.py).
The gate reads the first member's identity-view features, so it is the first member's gate, refitted.

Members share one input: the first backbone's size and resampling (each normalises with its own mean
and std), so that an image is decoded once and the exported graph has one input. `--resize squash+band`
is an ensemble too: every backbone and seed once per view of the two-view input (data/retinal_band.py),
each member reading its view's columns of that one input.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._console import console
from .._io import atomic_torch_save
from ..bundle.card import write_model_card
from ..bundle.members import BundleMember
from ..bundle.network import VIEWS
from ..bundle.signature import configured_key
from ..bundle.store import CURVES, CURVES_PNG, Bundle, check_output_folder, load_bundle, positive_classes_for, save_bundle
from ..config import AUTO_HEAD, EnsembleConfig, given
from ..data.transforms import VIEWS as INPUT_VIEWS, Preprocessing
from ..errors import RetinaLensError
from ..evaluate.metrics import classification_metrics
from ..features.extract import open_cache
from ..models.registry import create_backbone, resolve_spec, takes_any_shape
from ..predict.ensemble import ensemble_outputs
from ..trust import fit_trust
from ..trust.calibration import calibrated
from .cv import fold_accuracy, spread
from .image_runs import finished_step, resumable
from .images import _fingerprint
from .distributed import torchrun_world
from .pipeline import RunConfig, check_input, check_run, resolve_resize, train_bundle
from .selection import _Data, cv_folds, find_data, prepare_data

MAX_MEMBERS = 16  # the manifest schema's bound
MEMBER_MODES = ("bottleneck", "finetune", "frozen")  # "NAME:MODE" in --ensemble; scratch models have no features


def member_spec(entry: str) -> tuple[str, str]:
    """An --ensemble entry, `NAME` or `NAME:MODE`, -> (backbone, mode)."""
    name, _, mode = entry.partition(":")
    if mode and mode not in MEMBER_MODES:
        raise RetinaLensError(f"--ensemble {entry!r}: a member's mode is one of {', '.join(MEMBER_MODES)}")
    return name, mode or "bottleneck"


def saved_ensemble_config(saved: dict[str, Any]) -> EnsembleConfig:
    """The EnsembleConfig a bundle's manifest recorded (training.ensemble), to train it again."""
    fields = {f: saved[f] for f in asdict(EnsembleConfig()) if f in saved}
    return EnsembleConfig(**{f: tuple(v) if isinstance(v, list) else v for f, v in fields.items()})


def ensemble_config(backbones: str | Sequence[str] | None = None, seeds: str | Sequence[int] | None = None,
                    tta: str | Sequence[str] | None = None, member_epochs: int | None = None) -> EnsembleConfig:
    """The CLI's comma lists (`lite0,lite0:finetune`, `0,1,2`, `flip,crop`) or sequences -> EnsembleConfig;
    identity always comes first among the views. `member_epochs`: each image-mode member's epochs."""
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
    entries = tuple(items(backbones))
    for e in entries:
        member_spec(e)
    if member_epochs is not None and member_epochs < 1:
        raise RetinaLensError(f"--member-epochs must be at least 1, got {member_epochs}")
    return EnsembleConfig(backbones=entries, seeds=seed_list, tta=("identity", *views),
                          **given(member_epochs=member_epochs))


def member_runs(cfg: RunConfig, ens: EnsembleConfig, k: int | None = None) -> list[RunConfig]:
    """One RunConfig per member: every backbone once per seed (the split's seed stays the run's), each
    with the ensemble's `--cv` (k folds; 0: the shared validation split). An image-mode member trains
    its mode's own head for exactly ens.member_epochs epochs (under one split: the best of them)."""
    runs = []
    for entry in ens.backbones or (cfg.extract.backbone,):
        name, mode = member_spec(entry)
        for s in ens.seeds or (cfg.train.seed,):
            for view in INPUT_VIEWS.get(cfg.extract.resize, ("whole",)):  # the two-view input: a network per view
                run = replace(cfg, extract=replace(cfg.extract, backbone=name, view=view),
                              train=replace(cfg.train, seed=s), **given(cv=k))
                if mode != "bottleneck":
                    run = replace(run, mode=mode, train=replace(run.train, epochs=ens.member_epochs,
                                                                batch_size=ens.member_batch_size,
                                                                head=replace(run.train.head, kind=AUTO_HEAD)))
                runs.append(run)
    return runs


def member_label(run: RunConfig) -> str:
    """`efficientnet_lite0 (bottleneck) seed 0`, and the view of the input it reads when not the whole."""
    view = f" view {run.extract.view}" if run.extract.view != "whole" else ""
    return f"{run.extract.backbone} ({run.mode}) seed {run.train.seed}{view}"


def check_ensemble(cfg: RunConfig, ens: EnsembleConfig, runs: list[RunConfig]) -> None:
    for r in runs:
        check_input(r, ens.tta)
    if len(runs) > MAX_MEMBERS:
        raise RetinaLensError(f"an ensemble holds at most {MAX_MEMBERS} members, got {len(runs)}")
    if len({(r.extract.backbone, r.mode, r.train.seed, r.extract.view) for r in runs}) != len(runs):
        raise RetinaLensError("--ensemble and --seeds name the same member twice")
    if cfg.mode != "bottleneck":
        raise RetinaLensError(f"ensembles take --mode bottleneck; a member trains on images as NAME:finetune in "
                              f"--ensemble (got --mode {cfg.mode})")
    if cfg.extract.weights and len({r.extract.backbone for r in runs}) > 1:
        raise RetinaLensError("--weights is one backbone's file: it cannot go with several --ensemble backbones")
    for r in runs:
        if resolve_spec(r.extract.backbone).from_scratch:
            raise RetinaLensError(f"'{r.extract.backbone}' has no pretrained weights: it cannot be an ensemble member")


def two_view_fits(cfg: RunConfig, ens: EnsembleConfig) -> bool:
    """Whether `--resize auto` may take the two-view input: bottleneck members only, no test-time views
    (check_input's rule), the registry's own backbones (which take a non-square input), room for a member
    per view, one process (an ensemble is not trained under torchrun)."""
    members = [member_spec(e) for e in ens.backbones or (cfg.extract.backbone,)]
    n = len(members) * len(ens.seeds or (cfg.train.seed,))
    return ({cfg.mode, *(mode for _, mode in members)} == {"bottleneck"} and len(ens.tta) == 1
            and all(takes_any_shape(name) for name, _ in members) and 2 * n <= MAX_MEMBERS
            and torchrun_world().size == 1)


def train_ensemble(cfg: RunConfig, ens: EnsembleConfig, out: str | Path, *, progress: bool = True,
                   data: _Data | None = None, lineage: dict[str, Any] | None = None) -> Bundle:
    """Train every member on one split (or the same folds) and write them as one bundle (see the module's
    notes). `data` and `lineage` as for train_bundle (retraining keeps its parent's splits)."""
    out = Path(out).expanduser()
    found = None if data else find_data(cfg)  # read once: --resize auto takes its classes, prepare_data its images
    cfg = resolve_resize(cfg, two_view_fits(cfg, ens), (found if data is None else data.ds).classes)
    runs = member_runs(cfg, ens)
    if len(runs) == 1 and len(ens.tta) == 1:  # one network seen once: a plain bundle (of that backbone, seed)
        return train_bundle(runs[0], out, progress=progress, data=data, lineage=lineage, found=found)
    check_ensemble(cfg, ens, runs)
    for run in runs:  # every member's options, as given (--cv, --head, ...), before minutes of screening
        check_run(run, out)
    if len(ens.tta) > 1 and cfg.cv is not None and cfg.cv > 1:
        raise RetinaLensError(f"--tta with --cv {cfg.cv}: out-of-fold probabilities come from cached features, "
                              "which hold no flipped or cropped views; use --cv 0 (one validation split)")
    check_output_folder(out)
    key = configured_key(cfg.sign_key)
    say = console()
    first = create_backbone(runs[0].extract.backbone, weights=cfg.extract.weights, pretrained=cfg.extract.pretrained,
                            input_size=cfg.extract.input_size, resize=cfg.extract.resize)
    data = data or prepare_data(cfg, first.preprocessing, found)  # one screened split for every member
    k = 0 if len(ens.tta) > 1 else cv_folds(cfg, len(data.splits.train) + len(data.splits.val))
    if len(ens.tta) > 1 and cfg.cv is None:
        say.print("test-time views: the members and their average are fitted on one validation split (out-of-fold "
                  "probabilities come from cached features, which hold no flipped or cropped views)")
    runs = member_runs(cfg, ens, k)
    # Each finished member stays in `work` until the bundle is written: --resume goes on from there.
    work = out.with_name(f"{out.name}.members")
    splits = {n: data.keys(data.splits.indices(n)) for n in ("train", "val", "test")}
    if work.is_dir() and not cfg.resume:
        raise RetinaLensError(f"{work} holds the members of an interrupted run: pass --resume to continue it, "
                              "or delete that folder to start over")
    try:
        bundles, held_out = _train_members(cfg, runs, work, splits, first.preprocessing, data, progress)
    except BaseException:
        if work.is_dir() and not any(p.is_file() for p in work.rglob("*")):
            shutil.rmtree(work, ignore_errors=True)  # nothing written (a full disk, say): nothing to resume
        raise
    bundle = _combine(cfg, ens, runs, bundles, data, out, key, held_out if k else None, lineage)
    shutil.rmtree(work, ignore_errors=True)  # the bundle holds every member now
    return bundle


def _train_members(cfg: RunConfig, runs: list[RunConfig], work: Path, splits: dict[str, Any],
                   input_like: Preprocessing, data: _Data, progress: bool) -> tuple[list[Bundle], list[dict[str, Any]]]:
    """Each member trained (or, with --resume, read back from `work`), with its out-of-fold probabilities."""
    say = console()
    held_out: list[dict[str, Any]] = []  # each member's out-of-fold probabilities (under CV)
    bundles = []
    for j, run in enumerate(runs):
        folder, done = work / f"member{j}", work / f"member{j}.done.pt"
        key_j = _fingerprint({"run": resumable(run), "splits": splits, "input": asdict(input_like)})
        saved = finished_step(done, key_j, cfg.resume, "members")
        if saved is not None:
            bundles.append(load_bundle(folder))
            held_out.append({n: v.numpy() if hasattr(v, "numpy") else v for n, v in saved["held_out"].items()})
            continue
        say.print(f"[bold]member {j + 1} of {len(runs)}:[/] {member_label(run)}")
        held_out.append({})
        bundles.append(train_bundle(run, folder, progress=progress, data=data, input_like=input_like,
                                    out_of_fold=held_out[j]))
        atomic_torch_save(done, {"fingerprint": key_j, "held_out": {
            n: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for n, v in held_out[j].items()}})
    return bundles, held_out


def _member_file(k: int, what: str) -> str:
    return f"{what}.safetensors" if k == 0 else f"member{k}.{what}.safetensors"


def _combine(cfg: RunConfig, ens: EnsembleConfig, runs: list[RunConfig], bundles: list[Bundle], data: _Data,
             out: Path, key: bytes | None, held_out: list[dict[str, Any]] | None,
             lineage: dict[str, Any] | None = None) -> Bundle:
    lead = bundles[0]
    classes, task = data.ds.classes, data.task
    # Each member with its own temperature (a single bundle's calibration is its network's).
    members = [BundleMember(b.path, replace(b.manifest.ensemble()[0], temperature=b.temperature), b.head)
               for b in bundles]
    cache = open_cache(cfg.extract.cache, lead.backbone, lead.precision, spatial=False)
    if held_out is not None:
        held, each, folds, gate = _out_of_fold(bundles, held_out, data)
        val_raw = np.mean(each, axis=0)
        where = f"{held_out[0]['fold'].max() + 1}-fold cross-validation (out of fold, the members' mean)"
        gate_pooled = cache.pooled(data.keys(gate["val"]))
    else:
        val = data.splits.indices("val")
        val_paths = [data.ds.samples[i].path for i in val]
        keep, val_raw, gate_pooled, _ = ensemble_outputs(members, ens.tta, val_paths, workers=cfg.extract.workers)
        held, each, folds, where = [val[j] for j in keep], [], None, "validation"
        gate = {"train": data.index("train", cache), "val": held}
    y_val = data.labels(held)
    positives = positive_classes_for(classes, task)
    trust, trust_files = fit_trust(
        val_probs=val_raw, val_y=y_val, classes=classes, positive_classes=positives,
        train_pooled=cache.pooled(data.keys(gate["train"])), val_pooled=gate_pooled,
        val_paths=[data.ds.samples[i].path for i in gate["val"]], preprocessing=lead.preprocessing,
        target_sensitivity=cfg.target_sensitivity, workers=cfg.extract.workers, seed=cfg.train.seed, folds=folds)
    temperature = (trust.get("calibration") or {}).get("temperature")
    m = classification_metrics(y_val, calibrated(val_raw, temperature), classes, [data.ds.samples[i].patient for i in held],
                               positive_classes=positives or None, n_boot=200, seed=cfg.train.seed,
                               ordinal=bool(task and task.ordinal))
    lead_doc = lead.manifest.to_dict()
    entries = []
    for k, (b, run) in enumerate(zip(bundles, runs)):
        d = b.manifest.to_dict()
        entries.append({"backbone": d["backbone"], "features": d["features"], "head": d["head"],
                        "temperature": b.temperature,
                        "files": {"backbone": _member_file(k, "backbone"), "head": _member_file(k, "head")},
                        "seed": run.train.seed, "mode": run.mode, "validation": d.get("validation", {})
                        | (_fold_scores(each[k], y_val, folds) if folds is not None else {})}
                       | ({"epochs": run.train.epochs} if run.mode != "bottleneck" else {}))
    say = console()
    say.print("validation accuracy: " + ", ".join(
        f"{member_label(r)} {b.manifest.validation.get('accuracy', float('nan')):.3f}"
        for r, b in zip(runs, bundles)) + f"; ensemble ({', '.join(ens.tta)}) {m['accuracy']:.3f}"
        + (" (fold accuracy {accuracy_mean:.3f} ± {accuracy_sd:.3f})".format(**_fold_scores(val_raw, y_val, folds))
           if folds is not None else ""))
    sections = {
        "training": lead_doc.get("training", {}) | {"ensemble": asdict(ens) | {"n_members": len(runs)}},
        "validation": {k: m[k] for k in ("accuracy", "accuracy_ci", "roc_auc_macro", "n_images", "n_patients")}
        | {"source": where} | (_fold_scores(val_raw, y_val, folds) if folds is not None else {}),
        "metrics": {}, "lineage": lineage or lead_doc.get("lineage", {"version": 1, "parent": None}),
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


def _fold_scores(probs: np.ndarray, y: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """Accuracy per fold of out-of-fold probabilities, with its mean and sd, scored as train/cv.py scores
    a candidate: what the rule comparing an ensemble with its members reads."""
    acc = fold_accuracy(probs, y, folds)
    return {"fold_accuracy": [round(a, 4) for a in acc], **spread(acc)}


def _out_of_fold(bundles: list[Bundle], held_out: list[dict[str, Any]], data: _Data,
                 ) -> tuple[list[int], list[np.ndarray], np.ndarray, dict[str, list[int]]]:
    """(the training images every member scored out of fold, each member's out-of-fold probabilities of
    them after its own temperature (the bundle averages them), the first member's folds, the gate's images:
    the first fold's held-out ones against the rest). Members may differ by a few images (a near-duplicate
    of a test image is found on each backbone's own features): the images they all scored are used."""
    common = set.intersection(*(set(h["sha256"]) for h in held_out))
    lead = held_out[0]
    order = [j for j, h in enumerate(lead["sha256"]) if h in common]
    hashes = [lead["sha256"][j] for j in order]
    probs = []
    for b, h in zip(bundles, held_out):
        row = {s: j for j, s in enumerate(h["sha256"])}
        probs.append(calibrated(h["probabilities"][[row[s] for s in hashes]], b.temperature))
    index = {data.hashes[i]: i for i in data.splits.train + data.splits.val}
    held = [index[s] for s in hashes]
    fold = np.asarray(lead["fold"])[order]
    gate = {"train": [i for i, f in zip(held, fold) if f != 0], "val": [i for i, f in zip(held, fold) if f == 0]}
    return held, probs, fold, gate
