"""Retraining with clinicians' feedback: `retinalens retrain BUNDLE --feedback DB --out NEW`.

The candidate is the parent's run again (its config.json; an ensemble of bottleneck members, such as
the OCT default's two views, with its members again), on the parent's data plus the images a
clinician confirmed or corrected that pass the parent's quality gate. The validation and test splits
are the parent's, image for image (splits.json), so the two models are compared on the same images;
feedback goes to train only, and an image already in validation or test is never added. The
candidate is promoted (written to NEW) only if it is not worse than the parent on validation; test
figures are reported for both and never decide. Features of the original images come from the cache,
so only the new images pass through the backbone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._console import console
from .._io import atomic_write_json
from ..data.discover import Dataset, Sample
from ..data.hashing import sha256_file
from ..data.near_duplicates import near_duplicate_pairs
from ..data.splits import Splits
from ..errors import RetinaLensError
from ..feedback.store import FeedbackStore
from ..evaluate.metrics import classification_metrics
from ..evaluate.run import bundle_probabilities
from ..bundle.store import Bundle, check_output_folder, is_bundle, load_bundle
from ..config import EnsembleConfig
from ..predict.ensemble import ensemble_outputs
from .ensemble import saved_ensemble_config, train_ensemble
from .pipeline import RunConfig, run_config_from_dict, train_bundle
from .selection import _Data, prepare_data


@dataclass
class Feedback:
    """The confirmed images that went into training, and those left out with the reason."""

    added: list[Sample]
    hashes: list[str]
    left_out: list[dict[str, str]]


def retrain(bundle_path: str | Path, feedback: str | Path, out: str | Path, *, images_dir: str | Path | None = None,
            cache: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a candidate with the feedback, compare it with its parent, promote it if not worse."""
    from ..predict.model import Model

    out = Path(out).expanduser()
    check_output_folder(out)
    parent = load_bundle(bundle_path)
    ens = _parent_ensemble(parent)
    cfg = _parent_config(parent, cache)
    base = prepare_data(cfg)
    with FeedbackStore(feedback, images_dir) as store:
        confirmed = store.confirmed()
    if not confirmed:
        raise RetinaLensError(f"{feedback}: no image has a confirmed or corrected label yet; nothing to retrain on")
    fb = _near_duplicates(_screen(Model(parent), confirmed, base, parent), base, parent, cfg.extract.cache)
    say = console()
    for item in fb.left_out:
        say.print(f"[yellow]left out[/] {item['image']}: {item['reason']}", highlight=False)
    if not fb.added:
        raise RetinaLensError(f"none of the {len(confirmed)} confirmed image(s) can be added (see above)")
    data = _with_feedback(base, fb, parent)
    version = parent.manifest.lineage.version
    lineage = {"version": version + 1,
               "parent": {"path": str(parent.path), "manifest_sha256": parent.manifest_sha256,
                          "version": version},
               "feedback": {"images_added": len(fb.added), "left_out": len(fb.left_out)}}
    candidate_dir = out.with_name(f"{out.name}.candidate")
    for stale in (candidate_dir, candidate_dir.with_name(f"{candidate_dir.name}.members")):  # an earlier try's
        shutil.rmtree(stale, ignore_errors=True)
    candidate = (train_ensemble(cfg, ens, candidate_dir, progress=progress, data=data, lineage=lineage) if ens else
                 train_bundle(cfg, candidate_dir, progress=progress, data=data, lineage=lineage))

    compared = {split: {"parent": _split_metrics(parent, data, split, cfg, progress),
                        "candidate": _split_metrics(candidate, data, split, cfg, progress)} for split in ("val", "test")}
    promoted, rule = _promoted(parent, candidate, compared)
    target = out if promoted else out.with_name(f"{out.name}.rejected")
    if is_bundle(target):  # an older bundle there (check_output_folder allowed it)
        shutil.rmtree(target)
    candidate_dir.rename(target)
    report = {"promoted": promoted, "bundle": str(target), "parent": str(parent.path),
              "rule": rule,
              "version": version + 1, "feedback": {"added": len(fb.added), "left_out": fb.left_out},
              "splits": {k: v["n_images"] for k, v in data.summary.items() if k != "removed"},
              "compared": compared}
    atomic_write_json(target / "retrain_report.json", report)
    return report


def _parent_ensemble(parent: Bundle) -> EnsembleConfig | None:
    """How the parent's members were made (None: one network). Members trained on images are not
    retrained: their run's own options are not kept (the lead member's config.json is saved)."""
    if not parent.is_ensemble:
        return None
    saved = parent.manifest.training.ensemble
    if not saved or {m.details.get("mode") for m in parent.manifest.members} != {"bottleneck"}:
        raise RetinaLensError(f"{parent.path}: retraining an ensemble with members trained on images is not "
                              "supported; train it again with the feedback images added to the data")
    return saved_ensemble_config(saved)


def _parent_config(parent: Bundle, cache: str | Path | None) -> RunConfig:
    try:
        cfg = run_config_from_dict(parent.run_config())
    except (ValueError, KeyError, TypeError) as exc:
        raise RetinaLensError(f"{parent.path}: cannot read the run's config to retrain it ({type(exc).__name__})") from None
    if not Path(cfg.data).exists():
        raise RetinaLensError(f"{parent.path} was trained on {cfg.data}, which is not here: retraining needs it")
    # An ensemble's config.json is its lead member's, which names its view: the run's is the whole input.
    extract = replace(cfg.extract, view="whole", **({"cache": str(cache)} if cache else {}))
    return replace(cfg, extract=extract, resume=False)


def _screen(model: Any, confirmed: list[Any], base: _Data, parent: Bundle) -> Feedback:
    """Keep confirmed images that decode, pass the parent's gate, and are not in validation or test."""
    held_out = _held_out(base, parent)
    known = set(base.hashes)
    results = model.predict_many([c.image for c in confirmed])
    added, hashes, left_out = [], [], []
    for c, r in zip(confirmed, results):
        reason = None
        if "error" in r:
            reason = r["error"]
        elif not r.get("gate", {}).get("ok", True):
            reason = f"ungradable: {r['gate'].get('reason')}"
        elif c.label not in parent.classes:
            reason = f"label {c.label!r} is not one of the model's classes"
        if reason is None:
            h = sha256_file(c.image)
            if h in held_out:
                reason = "already in the validation or test split"
            elif h in known or h in hashes:
                reason = "already in the training data"
            else:
                added.append(Sample(Path(c.image), c.label, f"feedback:{h[:16]}"))
                hashes.append(h)
                continue
        left_out.append({"image": str(c.image), "reason": reason})
    return Feedback(added, hashes, left_out)


def _held_out(base: _Data, parent: Bundle) -> set[str]:
    """The parent's validation and test images (its splits.json; a cross-validated parent has no validation)."""
    saved = parent.split_hashes()
    if saved:
        return saved.get("val", set()) | saved.get("test", set())
    return {base.hashes[i] for split in ("val", "test") for i in base.splits.indices(split)}


def _near_duplicates(fb: Feedback, base: _Data, parent: Bundle, cache: str | Path | None) -> Feedback:
    """Leave out the feedback images that are near-duplicates (data/near_duplicates.py: resized,
    re-encoded, slightly cropped copies) of the parent's images: sha256 catches byte-for-byte copies only."""
    if not fb.added:
        return fb
    paths = [s.path for s in fb.added] + [s.path for s in base.ds.samples]
    hashes = fb.hashes + base.hashes
    store, _, keep, _ = bundle_probabilities(parent, paths, hashes, cache, progress=False)
    n, readable = len(fb.added), set(keep)
    new = [i for i in range(n) if i in readable]
    old = [j for j in range(len(base.hashes)) if n + j in readable]
    pairs = near_duplicate_pairs([fb.added[i].path for i in new], store.pooled([fb.hashes[i] for i in new]),
                                 [base.ds.samples[j].path for j in old], store.pooled([base.hashes[j] for j in old]))
    held_out = _held_out(base, parent)
    reasons: dict[int, str] = {}
    for a, b, bits, cos in pairs:
        j = old[b]
        where = "the validation or test split" if base.hashes[j] in held_out else "the training data"
        reasons.setdefault(new[a], f"near-duplicate of {base.ds.samples[j].path} in {where} "
                                   f"(pHash {bits} bits, cosine {cos:.3f})")
    kept = [i for i in range(n) if i not in reasons]
    return Feedback([fb.added[i] for i in kept], [fb.hashes[i] for i in kept],
                    fb.left_out + [{"image": str(fb.added[i].path), "reason": r} for i, r in sorted(reasons.items())])


def _promoted(parent: Bundle, candidate: Bundle, compared: dict[str, Any]) -> tuple[bool, str]:
    """The promotion decision and its rule: validation accuracy, or for cross-validated bundles (which
    have no validation split) the mean CV accuracy (test is reported, never used)."""
    new, old = _cv_accuracy(candidate), _cv_accuracy(parent)
    if new is not None and old is not None:
        return new >= old, ("promoted when the mean cross-validated accuracy is not lower than the parent's "
                            "(test is reported, never used)")
    return (compared["val"]["candidate"]["accuracy"] >= compared["val"]["parent"]["accuracy"],
            "promoted when validation accuracy is not lower than the parent's (test is reported, never used)")


def _cv_accuracy(bundle: Bundle) -> float | None:
    """The mean CV accuracy: an ensemble's, of its members' mean out of fold; else the chosen head's."""
    m = bundle.manifest
    if bundle.is_ensemble and "fold_accuracy" in m.validation:
        return float(m.validation["accuracy_mean"])
    return m.training.cv.candidate()["accuracy_mean"] if m.training.cv is not None else None


def _with_feedback(base: _Data, fb: Feedback, parent: Bundle) -> _Data:
    """The parent's splits, image for image, with the feedback added to train."""
    saved = parent.split_hashes()
    if not saved:
        raise RetinaLensError(f"{parent.path}: the parent's splits (splits.json) are missing; retraining needs them")
    ds = Dataset(base.ds.root, base.ds.layout, base.ds.samples + fb.added, base.ds.classes)
    hashes = base.hashes + fb.hashes
    n = len(base.hashes)
    idx = {name: [i for i, h in enumerate(hashes[:n]) if h in saved.get(name, set())] for name in ("train", "val", "test")}
    splits = Splits(idx["train"] + list(range(n, len(hashes))), idx["val"], idx["test"], hashes, base.splits.removed)
    return _Data(ds, base.task, hashes, splits, splits.summary(ds))


def _split_metrics(bundle: Bundle, data: _Data, split: str, cfg: RunConfig, progress: bool) -> dict[str, Any]:
    """Accuracy (with CI) and the referral AUC of a bundle on one of the shared splits."""
    idx = data.splits.indices(split)
    if not idx:
        return {"accuracy": None, "n_images": 0}
    paths, hashes = [data.ds.samples[i].path for i in idx], [data.hashes[i] for i in idx]
    if bundle.is_ensemble:  # every member through the prediction path (its members' caches are per view)
        keep, probs, _, _ = ensemble_outputs(bundle.members, bundle.views, paths, workers=cfg.extract.workers,
                                             progress=progress)
    else:
        _, _, keep, probs = bundle_probabilities(bundle, paths, hashes, cfg.extract.cache, progress=progress)
    y = data.labels([idx[j] for j in keep])
    m = classification_metrics(y, probs, bundle.classes, [data.ds.samples[idx[j]].patient for j in keep],
                               positive_classes=bundle.positive_classes or None, n_boot=200, seed=0)
    ref = m.get("urgent_referral") or {}
    return {"accuracy": m["accuracy"], "accuracy_ci": m["accuracy_ci"], "referral_auc": ref.get("auc"),
            "n_images": m["n_images"]}
