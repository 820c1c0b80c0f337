"""How a bundle's trust (calibration, referral operating point, quality gate) holds on evaluation data.

`retinalens.trust` fits them on validation; this module only measures them on the data evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.manifest import ReferralThreshold
from ..bundle.store import Bundle
from ..trust.calibration import ECE_BINS, calibrated, expected_calibration_error, positive_score, reliability
from ..trust.gate import Gate, summarize
from ..trust.statistics import file_statistics
from .metrics import classification_metrics


def calibration_report(raw_probs: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, Any]:
    """metrics["calibration"] of an evaluation: ECE and reliability before and after the bundle's T."""
    after = calibrated(raw_probs, temperature)
    return {"temperature": float(temperature), "bins": ECE_BINS,
            "ece_before": expected_calibration_error(raw_probs, y), "ece_after": expected_calibration_error(after, y),
            "reliability_before": reliability(raw_probs, y), "reliability_after": reliability(after, y)}



def operating_point_report(probs: np.ndarray, y: np.ndarray, classes: Sequence[str], referral: ReferralThreshold,
                           groups: Sequence[str] | None, n_boot: int, seed: int) -> dict[str, Any]:
    """metrics["operating_point"]: sensitivity and specificity at the bundle's referral threshold, with
    patient-bootstrap CIs (the metrics module's, on the two-class referral problem)."""
    positives = list(referral.positive_classes)
    score = positive_score(probs, classes, positives)
    is_pos = np.isin(np.asarray(y), [list(classes).index(c) for c in positives])
    binary = np.stack([1 - score, score], axis=1).clip(0, 1)
    m = classification_metrics(is_pos.astype(np.int64), binary, ["other", "referral"], groups,
                               positive_classes=["referral"], n_boot=n_boot, seed=seed,
                               threshold=referral.threshold)["urgent_referral"]
    return {"threshold": referral.threshold, "target_sensitivity": referral.target_sensitivity,
            "positive_classes": positives, "n_positive": m["n_positive"], "n_negative": m["n_negative"],
            "sensitivity": m["sensitivity"], "sensitivity_ci": m["sensitivity_ci"],
            "specificity": m["specificity"], "specificity_ci": m["specificity_ci"]}


def gate_verdicts(bundle: Bundle, paths: Sequence[Path], pooled: np.ndarray, workers: int = 0,
                  ) -> list[dict[str, Any]] | None:
    """The quality gate's verdict on each evaluated image (None: the bundle has no gate)."""
    gate = Gate.from_bundle(bundle)
    if gate is None:
        return None
    stats, _ = file_statistics(list(paths), bundle.preprocessing, workers=workers)
    return gate.verdicts(stats | {"distance": gate.distance(pooled)})


def trust_metrics(bundle: Bundle, raw_probs: np.ndarray, y: np.ndarray, groups: Sequence[str],
                  verdicts: list[dict[str, Any]] | None, *, n_boot: int, seed: int) -> dict[str, Any]:
    """metrics["calibration"], ["operating_point"] and ["gate"] of an evaluation: each None when the
    bundle has no temperature, referral threshold or gate (a bundle from before they existed);
    `verdicts` are gate_verdicts'."""
    temperature = bundle.temperature
    referral = bundle.manifest.referral_threshold
    return {
        "calibration": calibration_report(raw_probs, y, temperature) if temperature is not None else None,
        "operating_point": operating_point_report(calibrated(raw_probs, temperature), y, bundle.classes, referral,
                                                  groups, n_boot=n_boot, seed=seed) if referral else None,
        "gate": summarize(verdicts) if verdicts is not None else None,
    }
