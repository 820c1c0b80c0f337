"""HTML pieces that the report and its model card share: tables of escaped cells, numbers with CIs."""

from __future__ import annotations

import html
from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """An HTML table from already-escaped cells; with `numeric`, cells after the first align right."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cell = '<td class="num">{}</td>' if numeric else "<td>{}</td>"
    body = "".join(
        f"<tr><td>{row[0]}</td>" + "".join(cell.format(c) for c in row[1:]) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt(value: float | None, ci: Sequence[float] | None) -> str:
    """A metric to three decimals, with its confidence interval when there is one."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
