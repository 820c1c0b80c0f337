"""Prediction results as CSV rows: `predict --csv`, its piped output, and the demo's predictions.csv.

Import-light (no torch), so that the command line can print it without loading a model first. File
names (in `input`, and in `error` messages) keep every character except the control ones, which are
written as escapes (ESC as the four characters `\x1b`, a newline as `\n`), as the table shows them:
a CSV is read in terminals and spreadsheets, and a raw escape sequence from a hostile file name would
recolour or retitle the terminal of whoever looks at it. JSON output keeps the exact names (JSON
escapes control characters itself).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from .._console import printable


def predictions_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    """One row per input, control characters in names and messages escaped (see above)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["input", "label", "referral", *[f"p_{c}" for c in classes], "p_referral", "refer", "gate", "gate_reason",
                "error"])
    for r in results:
        p, gate = r.get("probabilities", {}), r.get("gate")
        w.writerow([printable(r["input"]), r.get("label") or "", r.get("referral") or "", *[p.get(c, "") for c in classes],
                    "" if r.get("p_referral") is None else r["p_referral"], yes_no(r.get("refer")),
                    "" if gate is None else ("ok" if gate["ok"] else "ungradable"), (gate or {}).get("reason") or "",
                    printable(r.get("error", ""))])
    return buf.getvalue()


def yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
