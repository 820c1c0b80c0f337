"""The model card: what a bundle's manifest says about the model, for people.

One card for every surface: the web app's `/api/model` and `/model` page, and the HTML report's
"Model card" and "Data" sections all render this dictionary. It reads the manifest document (a
hand-made or partial one too, as reports of older bundles have), so it lives beside the manifest:
no other module needs to know its keys. Its "version" is the bundle's digest (signature.py), the
identity `retinalens verify` prints.
"""

from __future__ import annotations

from typing import Any

from .signature import manifest_digest

INTENDED_USE = ("Research only, not a medical device: for studying automated triage of retinal images. "
                "Not for diagnosis, screening or treatment decisions about any person.")
LIMITS = (
    "measured only on the data named here: other devices, sites, populations or image types may score lower",
    "a class the model was not trained on is forced into one of its classes",
    "images failing the quality gate (when present) should not be classified at all",
    "heat maps show where the evidence for a class lies, not the lesion's outline",
    "confidence intervals cover sampling of these patients, not a change of population",
)
_BACKBONE_FIELDS = ("name", "timm_name", "weights_source", "weights_sha256", "preprocessing")


def model_card(document: dict[str, Any] | None, *, local_paths: bool = False) -> dict[str, Any]:
    """The card of a manifest document (`Manifest.to_dict()`). local_paths=False leaves out where the
    training data lay on the machine that trained it (the web app shows the card to anyone)."""
    m = document or {}
    training = m.get("training") or {}
    backbone = m.get("backbone")
    card: dict[str, Any] = {
        "intended_use": INTENDED_USE,
        "version": {"digest": _digest(m), "created": m.get("created")},
        "created": m.get("created"),
        "task": m.get("task"),
        "classes": m.get("classes"),
        "referral": m.get("referral"),
        "positive_classes": m.get("positive_classes"),
        "backbone": {k: backbone.get(k) for k in _BACKBONE_FIELDS} if isinstance(backbone, dict) else backbone,
        "precision": (m.get("features") or {}).get("precision"),
        "head": m.get("head"),
        "training_data": {"layout": training.get("layout"), "splits": training.get("splits"),
                          "extract_failures": training.get("extract_failures")},
        "head_selection": training.get("head_selection"),
        "baseline_logistic_regression": training.get("baseline_logistic_regression"),
        "validation": m.get("validation"),
        "test_metrics": m.get("metrics") or None,
        "thresholds": m.get("thresholds") or None,
        "calibration": m.get("calibration"),
        "quality_gate": m.get("gate"),
        "lineage": m.get("lineage"),
        "library_versions": m.get("library_versions"),
        "limits_of_use": list(LIMITS),
    }
    if local_paths:
        card["training_data"]["data"] = training.get("data")
    return card


def _digest(document: dict[str, Any]) -> str | None:
    """The digest of a manifest as RetinaLens reads one; None for a partial one JSON cannot hold."""
    try:
        return manifest_digest(document) if document else None
    except (TypeError, ValueError):
        return None
