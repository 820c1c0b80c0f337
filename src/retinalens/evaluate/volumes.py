"""`evaluate --volumes`: metrics per OCT volume beside the per-B-scan ones.

The frames of each multi-frame file are one volume (grouping "file"); the other evaluated B-scans are
grouped by VolumeConfig.group_by ("patient", the id discover read from the name or a DICOM file's
tags; "folder"; or "series", a DICOM file's acquisition, other images by folder). Each
volume is answered by predict/volume.py's rule from its B-scans' calibrated probabilities and gate
verdicts, as `predict --volumes` answers it. The truth of a volume is the label of its B-scans' files
(a multi-frame file's own); a Kermany patient with B-scans in several class folders takes the most
urgent of them (then the most frequent), and the count of such volumes is reported. Ungradable
volumes are counted and left out of the metrics, as ungradable images are refused at prediction.
Confidence intervals resample patients (a patient's volumes together), like the B-scan metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.manifest import REFERRAL_LEVELS
from ..bundle.store import Bundle
from ..config import VolumeConfig
from ..data.volumes import check_grouping, natural_key
from ..predict.model import image_result
from ..predict.volume import aggregate
from ..trust import NO_GATE
from .frames import BScan
from .metrics import classification_metrics

GROUPING_NOTES = {
    "file": "each multi-frame file (DICOM OCT, multi-page TIFF) is one volume, its frames in file order",
    "patient": "B-scans grouped by the patient id in their names (Kermany names carry no acquisition, so one "
               "patient's eyes and visits form one volume)",
    "folder": "B-scans grouped by folder (one acquisition per folder)",
    "series": "DICOM B-scans grouped by their series (SeriesInstanceUID: one acquisition of one eye), other "
              "images by folder",
}


@dataclass
class EvaluatedVolume:
    """One volume of an evaluation, for the report: its B-scans' files and what the rule answered."""

    id: str
    true_class: str
    paths: list[Path]  # its B-scans' files in slice order (one, for a multi-frame file: grouping "file")
    result: dict[str, Any]  # predict/volume.py's aggregate
    patient: str  # the patient of its first B-scan: the bootstrap's cluster


def volume_metrics(bundle: Bundle, bscans: Sequence[BScan], probs: np.ndarray,
                   verdicts: Sequence[dict[str, Any]] | None, rule: VolumeConfig, *, n_boot: int, seed: int,
                   ) -> tuple[dict[str, Any], list[EvaluatedVolume]]:
    """(metrics["volumes"], the volumes) for evaluated B-scans (evaluate/frames.py) with calibrated `probs`
    (one row each): each multi-frame file's frames one volume, the other B-scans grouped by `rule.group_by`."""
    group_by = check_grouping(rule.group_by)
    members: dict[tuple[str, str], list[int]] = {}  # (grouping, id) -> B-scans
    for i, b in enumerate(bscans):
        key = (b.sample.patient if group_by == "patient" else
               b.sample.series if group_by == "series" and b.sample.series else str(b.sample.path.parent))
        members.setdefault(("file", str(b.sample.path)) if b.frame is not None else (group_by, key), []).append(i)
    volumes, n_mixed = [], 0
    for (grouping, key), idx in members.items():
        idx = sorted(idx, key=lambda i: (bscans[i].frame or 0, natural_key(bscans[i].sample.path.name)))
        results = [image_result(bundle, bscans[i].name, probs[i],
                                verdicts[i] if verdicts is not None else {**NO_GATE, "scores": {}}) for i in idx]
        labels = [str(bscans[i].sample.label) for i in idx]
        n_mixed += len(set(labels)) > 1
        volumes.append(EvaluatedVolume(key, most_urgent(labels, bundle.manifest.referral),
                                       list(dict.fromkeys(bscans[i].sample.path for i in idx)),
                                       aggregate(key, grouping, results, rule), bscans[idx[0]].sample.patient))
    graded = [v for v in volumes if v.result["gate"]["ok"]]
    groupings = list(dict.fromkeys(v.result["grouping"] for v in volumes)) or [group_by]
    out: dict[str, Any] = {"grouping": ", ".join(groupings),
                           "grouping_note": "; ".join(GROUPING_NOTES[g] for g in groupings),
                           "rule": volumes[0].result["rule"] if volumes else None, "n_volumes": len(volumes),
                           "n_ungradable": len(volumes) - len(graded), "n_mixed_labels": n_mixed,
                           "truth": "the class folder of the volume's B-scans; with several, the most urgent",
                           "metrics": None, "volumes": [_row(v) for v in volumes]}
    if graded:
        classes = bundle.classes
        threshold = bundle.manifest.referral_threshold
        out["metrics"] = classification_metrics(
            np.array([classes.index(v.true_class) for v in graded]),
            np.array([[v.result["probabilities"][c] for c in classes] for v in graded]), classes,
            [v.patient for v in graded], positive_classes=bundle.positive_classes or None,
            n_boot=n_boot, seed=seed, threshold=threshold.threshold if threshold else 0.5)
    return out, volumes


def _row(v: EvaluatedVolume) -> dict[str, Any]:
    r = v.result
    index = r["index_slice"]
    return {"volume": v.id, "grouping": r["grouping"], "true": v.true_class, "label": r["label"], "referral": r["referral"], "refer": r["refer"],
            "p_referral": r["p_referral"], "gradable": r["gate"]["ok"], "n_slices": r["n_slices"],
            "n_ungradable": r["n_ungradable"], "index_slice": index,
            "index_input": None if index is None else r["slices"][index]["input"]}


def most_urgent(labels: Sequence[str], levels: dict[str, str | None]) -> str:
    """The label of the most urgent referral level among `labels`; at one level, the most frequent."""
    counts = Counter(labels)

    def rank(label: str) -> tuple[int, int, str]:
        level = levels.get(label)
        return (REFERRAL_LEVELS.index(level) if level in REFERRAL_LEVELS else len(REFERRAL_LEVELS), -counts[label],
                label)

    return min(counts, key=rank)
