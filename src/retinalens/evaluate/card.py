"""The report's model card: the bundle's card text (bundle/card.py), the very MODEL_CARD.md that
`evaluate` writes into the bundle and the web app shows at /model, rendered into the report."""

from __future__ import annotations

from typing import Any

# The card's content is the bundle's (bundle/card.py); this only places it in the report.
from retinalens.bundle.card import INTENDED_USE, card_html, card_markdown

__all__ = ["INTENDED_USE", "model_card"]


def model_card(card: dict[str, Any], metrics: dict) -> str:
    """The card with the evaluation's metrics, its headings below the report's section heading (h2)."""
    return card_html(card_markdown(card, evaluation=metrics), heading_offset=2)
