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
    w.writerow(["input", "label", "referral", *[f"p_{c}" for c in classes], "p_referral", "refer", "gate", "gate_reason",
                "error"])
    for r in results:
        p, gate = r.get("probabilities", {}), r.get("gate")
        w.writerow([r["input"], r.get("label") or "", r.get("referral") or "", *[p.get(c, "") for c in classes],
                    "" if r.get("p_referral") is None else r["p_referral"], yes_no(r.get("refer")),
                    "" if gate is None else ("ok" if gate["ok"] else "ungradable"), (gate or {}).get("reason") or "",
                    r.get("error", "")])
    return buf.getvalue()


def volumes_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    """One row per volume (predict/volume.py's results; inputs that could not be read as error rows).
    index_slice and suspicious are 0-based positions in the volume's slice order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["volume", "grouping", "n_slices", "n_gradable", "n_ungradable", "n_unreadable", "label", "referral",
                *[f"p_{c}" for c in classes], "p_referral", "refer", "gate", "gate_reason", "index_slice",
                "index_input", "suspicious", "error"])
    for r in results:
        if "error" in r:
            w.writerow([r["input"], *[""] * (len(classes) + 14), r["error"]])
            continue
        p, index = r["probabilities"], r["index_slice"]
        w.writerow([r["volume"], r["grouping"], r["n_slices"], r["n_gradable"], r["n_ungradable"], r["n_unreadable"],
                    r["label"] or "", r["referral"] or "", *[p.get(c, "") for c in classes],
                    "" if r["p_referral"] is None else r["p_referral"], yes_no(r["refer"]),
                    "ok" if r["gate"]["ok"] else "ungradable", r["gate"]["reason"] or "",
                    "" if index is None else index, "" if index is None else r["slices"][index]["input"],
                    " ".join(map(str, r["suspicious"])), ""])
    return buf.getvalue()


def yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
