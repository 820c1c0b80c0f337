"""GET /model: the bundle's MODEL_CARD.md, rendered (a real server on loopback)."""

from __future__ import annotations

import html
import re

from retinalens.bundle.card import CARD_FILE, card_html


def words(fragment: str) -> str:
    """What a reader sees of an HTML fragment: its text, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def test_model_page_shows_the_bundle_card(client, small_bundle) -> None:
    text = (small_bundle.path / CARD_FILE).read_text(encoding="utf-8")
    page = client.get("/model").text
    main = page[page.index("<main>"):page.index("</main>")]
    assert words(main) == words(card_html(text))  # the card file, every word of it
    for heading in ("Model details", "Training data", "Evaluation data", "Ethical considerations and limits"):
        assert f"<h3>{heading}</h3>" in main
    assert small_bundle.manifest_sha256 in main and "<table" in main and "<script" not in main
