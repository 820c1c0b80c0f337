"""The report's model card: intended use, what the model is, what it learnt from, and its limits.

It renders bundle/card.py's card of the model's manifest document (the card the web app shows) as
an HTML table.
"""

from __future__ import annotations

import html
import json

# The card's content is the bundle's (bundle/card.py), the same the web app shows; this renders it.
from retinalens.bundle.card import INTENDED_USE
from retinalens.bundle.card import model_card as bundle_card
from retinalens.evaluate.markup import fmt, table

__all__ = ["INTENDED_USE", "model_card", "ordered_splits"]


def model_card(model: dict | None, metrics: dict) -> str:
    """The bundle's card (bundle/card.py, the one the web app shows) as the report's table."""
    card = bundle_card(model, local_paths=True)
    training, validation = card["training_data"], card["validation"] or {}
    baseline = card["baseline_logistic_regression"]
    rows = [("Intended use", card["intended_use"])]
    for label, value in (
        ("Task", card["task"]),
        ("Classes", card["classes"] or metrics.get("classes")),
        ("Referral levels", card["referral"]),
        ("Backbone", _backbone_text(card["backbone"]) if isinstance(card["backbone"], dict) else card["backbone"]),
        ("Head", _head_text(card["head"]) if isinstance(card["head"], dict) else card["head"]),
        ("Feature precision", card["precision"]),
        ("Training data", training.get("data")),
        ("Training images / patients", _split_counts(training.get("splits"))),
        ("Validation accuracy", fmt(validation["accuracy"], validation.get("accuracy_ci"))
         if validation.get("accuracy") is not None else None),
        ("Logistic-regression baseline, validation accuracy", fmt(baseline.get("val_acc"), None) if baseline else None),
        ("Created", card["created"]),
        ("Library versions", card["library_versions"]),
    ):
        if value:
            rows.append((label, value if isinstance(value, str) else _describe(value)))
    rows.append(("Limits", "; ".join(card["limits_of_use"])))
    return table(("Field", "Value"), [(html.escape(k), html.escape(v)) for k, v in rows], numeric=False)


def ordered_splits(splits: dict) -> list[tuple[str, dict]]:
    """train, val, test first (the manifest's JSON keys come sorted), then any other split."""
    rank = {"train": 0, "val": 1, "test": 2}
    return sorted(((k, v) for k, v in splits.items() if k != "removed" and isinstance(v, dict) and "n_images" in v),
                  key=lambda kv: (rank.get(kv[0], 3), kv[0]))


def _backbone_text(b: dict) -> str:
    size = (b.get("preprocessing") or {}).get("size")
    return f"{b.get('name')}" + (f", {size} px" if size else "") + (f", weights: {b['weights_source']}"
                                                                   if b.get("weights_source") else "")


def _head_text(head: dict) -> str:
    rest = {k: v for k, v in head.items() if k != "kind"}
    return f"{head.get('kind', '?')}" + (f" ({_describe(rest)})" if rest else "")


def _split_counts(splits: dict | None) -> str | None:
    if not splits:
        return None
    return ", ".join(f"{k} {v['n_images']} / {v['n_patients']}" for k, v in ordered_splits(splits))


def _describe(value: object) -> str:
    """Nested manifest values as one readable line."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)
