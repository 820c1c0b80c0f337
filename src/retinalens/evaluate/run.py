"""`retinalens evaluate`: a bundle on a labelled dataset -> metrics with CIs, JSON and HTML report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .._console import console
from .._io import atomic_write_json
from ..config import VolumeConfig
from ..data.discover import Dataset, Sample, discover
from ..data.hashing import sha256_files
from ..data.tasks import apply_task, get_task
from ..errors import RetinaLensError
from ..features.cache import FeatureCache
from ..features.extract import ExtractReport, open_cache
from .frames import cached_probabilities, score_bscans
from .trust import trust_metrics
from .volumes import volume_metrics
from ..bundle.card import write_model_card
from ..bundle.store import Bundle
from ..trust.calibration import calibrated
from .metrics import classification_metrics
from .report import write_html_report


def evaluate_bundle(bundle: Bundle, data: str | Path, *, split: str | None = "test", cache: str | Path | None = None,
                    json_path: str | Path | None = None, report_path: str | Path | None = None, n_boot: int = 1000,
                    seed: int = 0, workers: int = 0, progress: bool = True, patient_regex: str | None = None,
                    images_dir: str | Path | None = None, include_training: bool = False,
                    volumes: VolumeConfig | None = None) -> dict[str, Any]:
    """Evaluate on DATA's `split` (a dataset root with splits) or on the whole of DATA (plain class folders).

    Images the bundle was trained or validated on (its splits.json) are left out unless
    `include_training`; where DATA is the data the bundle carved its own test split from, that test
    split is what is scored (scored_images says which images were scored and why). `volumes`: also per
    OCT volume, grouped and answered by that rule (metrics["volumes"], evaluate/volumes.py)."""
    ds = discover(data, patient_regex=patient_regex, images_dir=images_dir)
    whole = not (ds.splits and split)
    if not whole:
        ds = ds.subset(split)
    task = get_task(bundle.manifest.task)  # a DR bundle reads grades 0-4 and maps them itself
    ds, dropped = apply_task(ds, task)
    unknown = sorted(set(ds.classes) - set(bundle.classes))
    if unknown:
        raise RetinaLensError(f"{ds.root}: classes {', '.join(unknown)} are not among the model's ({', '.join(bundle.classes)})")
    hashes = sha256_files(s.path for s in ds.samples)
    # Training images are left out by file, before a multi-frame file is expanded to its frames.
    ds, hashes, scored = scored_images(bundle, ds, hashes, whole=whole, include_training=include_training)
    # Every B-scan: the images, and the frames of each multi-frame file (evaluate/frames.py), one file at a time.
    out = score_bscans(bundle, ds.samples, hashes, cache, workers=workers, progress=progress)
    if not out.bscans:
        raise RetinaLensError(f"{ds.root}: none of the {len(ds)} images could be read")
    if out.n_files:
        scored["n_multi_frame_files"], scored["n_bscans"] = out.n_files, len(out.bscans)
    raw_probs, bscans, verdicts = out.probabilities, out.bscans, out.verdicts
    probs = calibrated(raw_probs, bundle.temperature)  # what prediction gives
    index = {c: k for k, c in enumerate(bundle.classes)}
    y = np.array([index[b.sample.label] for b in bscans], dtype=np.int64)
    patients = [b.sample.patient for b in bscans]
    metrics = classification_metrics(y, probs, bundle.classes, patients,
                                     positive_classes=bundle.positive_classes or None, n_boot=n_boot, seed=seed,
                                     ordinal=bool(task and task.ordinal))
    if task and metrics["urgent_referral"]:  # DR tasks: the referable decision, at the top level too
        for key in ("auc", "sensitivity", "specificity"):
            metrics[key], metrics[f"{key}_ci"] = metrics["urgent_referral"][key], metrics["urgent_referral"][f"{key}_ci"]
    # Calibration before/after, the referral operating point and the quality gate (None where the bundle lacks one).
    metrics |= trust_metrics(bundle, raw_probs, y, patients, verdicts, n_boot=n_boot, seed=seed)
    evaluated_volumes = None
    if volumes is not None:
        metrics["volumes"], evaluated_volumes = volume_metrics(bundle, bscans, probs, verdicts, volumes,
                                                               n_boot=n_boot, seed=seed)
    metrics["data"] = {"path": str(ds.root), "split": split if ds.layout == "split-folders" or split in ds.splits else None,
                       "per_class": ds.class_counts(), "scored": scored}
    metrics["failures"] = [{"input": p, "error": r} for p, r in out.failures] + [
        {"input": d["path"], "error": d["reason"]} for d in dropped] + [
        {"input": d["path"], "error": f"{d['path']}: {d['reason']}"} for d in ds.skipped]  # FIFOs, folders, ...
    metrics["overlap_with_training"] = _overlap(bundle, {b.sample.path for b in bscans}, ds.samples, hashes)
    metrics["model"] = {"path": str(bundle.path), "backbone": bundle.manifest.backbone.name,
                        "head": bundle.head_config.kind,
                        "members": [m.backbone.label for m in bundle.manifest.ensemble()], "tta": list(bundle.views)}
    if metrics["overlap_with_training"]:
        console().print(f"[yellow]warning: {metrics['overlap_with_training']} evaluation image(s) were in the model's "
                        "train/validation data; these metrics are optimistic[/]")
    if json_path:
        atomic_write_json(Path(json_path), metrics)
    _rewrite_card(bundle, metrics)
    if report_path:  # titled with the model, the data set and the split
        write_html_report(report_path, metrics, y_true=y, probs=probs, model=bundle.manifest.to_dict(),
                          curves_csv=bundle.curves_file(),
                          bundle=bundle, images=[b.name for b in bscans], load_images=out.load,  # gallery
                          volumes=evaluated_volumes)
    return metrics


def scored_images(bundle: Bundle, ds: Dataset, hashes: list[str], *, whole: bool,
                  include_training: bool) -> tuple[Dataset, list[str], dict[str, Any]]:
    """The images to score, and why: every image but those the bundle trained or validated on; the
    bundle's own carved test split when DATA (taken whole) is the data it was trained on."""
    seen = bundle.split_hashes()
    training = seen.get("train", set()) | seen.get("val", set())
    n_training = sum(h in training for h in hashes)
    own_test = whole and n_training > 0 and any(h in seen.get("test", ()) for h in hashes)
    if include_training or not n_training:
        keep = list(range(len(hashes)))
        rule = ("every image (--include-training)" if n_training else "every image (none was in the model's training "
                "or validation data)")
    elif own_test:
        keep = [i for i, h in enumerate(hashes) if h in seen["test"]]
        rule = "the bundle's own test split (DATA is the data it was trained on; splits.json names the test images)"
    else:
        keep = [i for i, h in enumerate(hashes) if h not in training]
        rule = "every image but those the model was trained or validated on (--include-training scores them too)"
    if not keep:
        raise RetinaLensError(f"{ds.root}: all {len(hashes)} images were in the model's training or validation data; "
                              "there is nothing unseen to evaluate (--include-training scores them anyway)")
    scored = {"n_images": len(keep), "n_in_data": len(hashes), "rule": rule,
              "excluded_training": 0 if include_training else n_training,
              "excluded_other": len(hashes) - len(keep) - (0 if include_training else n_training)}
    console().print(f"scoring {len(keep)} of the {len(hashes)} images: {rule}"
                    + (f"; left out {scored['excluded_training']} training/validation image(s)"
                       if scored["excluded_training"] else "")
                    + (f" and {scored['excluded_other']} not in its test split (removed or screened at training)"
                       if scored["excluded_other"] else ""), highlight=False, soft_wrap=True)
    return replace(ds, samples=[ds.samples[i] for i in keep]), [hashes[i] for i in keep], scored


def bundle_probabilities(bundle: Bundle, paths: list[Path], hashes: list[str], cache: str | Path | None, *,
                         on_mismatch: str = "rebuild", workers: int = 0, progress: bool = True,
                         ) -> tuple[FeatureCache, ExtractReport, list[int], np.ndarray]:
    """The bundle's head probabilities (before calibration) on images, through its feature cache:
    (the cache, the extraction report, the indices of the images that could be read, probabilities)."""
    store = open_cache(cache, bundle.backbone, bundle.precision, spatial=bundle.head_config.input_kind == "spatial",
                       on_mismatch=on_mismatch)
    report, keep, probs = cached_probabilities(bundle, store, paths, hashes, workers=workers, progress=progress)
    return store, report, keep, probs


def _rewrite_card(bundle: Bundle, metrics: dict[str, Any]) -> None:
    """MODEL_CARD.md with these results. A bundle that cannot be written (read-only, shared) keeps its
    card: the metrics are what was asked for, so that is a warning, never a lost evaluation."""
    try:
        write_model_card(bundle, metrics)
    except RetinaLensError as exc:
        console().print(f"[yellow]warning: the model card was not updated: {exc}[/]")


def _overlap(bundle: Bundle, scored: set[Path], samples: list[Sample], hashes: list[str]) -> int:
    """How many evaluated files (of `samples`, with their `hashes`; those in `scored`) the model trained
    or selected its checkpoint on."""
    seen = bundle.split_hashes()
    evaluated = {h for s, h in zip(samples, hashes) if s.path in scored}
    return len(evaluated & (seen.get("train", set()) | seen.get("val", set())))
