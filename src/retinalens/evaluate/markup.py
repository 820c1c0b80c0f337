"""HTML pieces of the report: tables of escaped cells; numbers with CIs are written as the model card writes them."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from retinalens.bundle.card import fmt

__all__ = ["data_uri", "fmt", "table"]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table from already-escaped cells; the cells after the first align right (numbers)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cell = '<td class="num">{}</td>'
    body = "".join(
        f"<tr><td>{row[0]}</td>" + "".join(cell.format(c) for c in row[1:]) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def data_uri(data: bytes, mime: str) -> str:
    """Bytes as a data: URI, so that the report holds its images (one file, offline)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
