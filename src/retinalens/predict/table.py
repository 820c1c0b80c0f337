"""Prediction results as CSV rows: `predict --csv`, its piped output, and the demo's predictions.csv.

The standard library only, so that the command line can print it without importing torch.
"""

from __future__ import annotations

import csv
import io
from typing import Any


def predictions_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    """One row per input (the names as they are: a CSV holds data, not terminal text)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # DICOM inputs' patient, eye, study and series (data/dicom_dataset.add_identity): columns only when there are any.
    extra = [k for k in IDENTITY if any(k in r for r in results)]
    w.writerow(["input", "label", "referral", *[f"p_{c}" for c in classes], "p_referral", "refer", "gate", "gate_reason",
                "error", *extra])
    for r in results:
        p, gate = r.get("probabilities", {}), r.get("gate")
        w.writerow([r["input"], r.get("label") or "", r.get("referral") or "", *[p.get(c, "") for c in classes],
                    "" if r.get("p_referral") is None else r["p_referral"], yes_no(r.get("refer")),
                    "" if gate is None else ("ok" if gate["ok"] else "ungradable"), (gate or {}).get("reason") or "",
                    r.get("error", ""), *[r.get(k, "") for k in extra]])
    return buf.getvalue()


IDENTITY = ("patient", "laterality", "study", "series")


def yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
