"""Prediction results as table rows: `predict --csv`, its piped output, the demo's predictions.csv, and
the Parquet file of `predict --out` (predict/parquet.py), all with the same columns.

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
from collections.abc import Iterator
from typing import Any

from .._console import printable


def prediction_columns(classes: list[str]) -> list[str]:
    return ["input", "label", "referral", *[f"p_{c}" for c in classes], "p_referral", "refer", "gate", "gate_reason",
            "error"]


def prediction_records(results: list[dict[str, Any]], classes: list[str]) -> Iterator[list[Any]]:
    """One typed row per result, in prediction_columns' order: str, float or bool, None where a value
    does not apply (a failed input has no label, an ungradable one no decision)."""
    for r in results:
        p, gate = r.get("probabilities", {}), r.get("gate")
        yield [r["input"], r.get("label") or None, r.get("referral") or None, *[p.get(c) for c in classes],
               r.get("p_referral"), r.get("refer"), None if gate is None else ("ok" if gate["ok"] else "ungradable"),
               (gate or {}).get("reason") or None, r.get("error") or None]


def predictions_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    """One row per input, control characters in names and messages escaped (see above)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # DICOM inputs' patient, eye, study and series (data/dicom_dataset.add_identity): columns only when there are any.
    extra = [k for k in IDENTITY if any(k in r for r in results)]
    w.writerow([*prediction_columns(classes), *extra])
    for r, row in zip(results, prediction_records(results, classes)):
        row[0], row[-1] = printable(row[0]), printable(row[-1] or "")
        w.writerow(["" if v is None else yes_no(v) if isinstance(v, bool) else v for v in row]
                   + [r.get(k, "") for k in extra])
    return buf.getvalue()


IDENTITY = ("patient", "laterality", "study", "series")


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
            w.writerow([printable(r["input"]), *[""] * (len(classes) + 14), printable(r["error"])])
            continue
        p, index = r["probabilities"], r["index_slice"]
        w.writerow([printable(r["volume"]), r["grouping"], r["n_slices"], r["n_gradable"], r["n_ungradable"], r["n_unreadable"],
                    r["label"] or "", r["referral"] or "", *[p.get(c, "") for c in classes],
                    "" if r["p_referral"] is None else r["p_referral"], yes_no(r["refer"]),
                    "ok" if r["gate"]["ok"] else "ungradable", r["gate"]["reason"] or "",
                    "" if index is None else index, "" if index is None else printable(r["slices"][index]["input"]),
                    " ".join(map(str, r["suspicious"])), ""])
    return buf.getvalue()


def yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")
