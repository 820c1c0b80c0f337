"""What the commands print: metrics and prediction tables, prediction CSV, the quality-gate summary.

Import-light (rich is imported when a table is drawn), and free of the commands themselves, so that
cli/demo.py and others print exactly what `evaluate` and `predict` print without importing cli/main.py.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from .._console import console


def print_metrics(m: dict[str, Any]) -> None:
    from rich.table import Table

    def ci(v: Any, c: Any) -> str:
        return "n/a" if v is None else (f"{v:.3f}" + (f" ({c[0]:.2f}-{c[1]:.2f})" if c else ""))

    t = Table(title=f"{m['n_images']} images, {m['n_patients']} patients (95% CI, patient bootstrap)")
    for col in ("class", "precision", "recall / sensitivity", "specificity", "f1", "support"):
        t.add_column(col)
    for c, r in m["per_class"].items():
        t.add_row(c, ci(r["precision"], r.get("precision_ci")), ci(r["recall"], r.get("recall_ci")),
                  ci(r["specificity"], r.get("specificity_ci")), ci(r["f1"], r.get("f1_ci")), str(r["support"]))
    console().print(t)
    console().print(f"accuracy {ci(m['accuracy'], m.get('accuracy_ci'))}; macro ROC-AUC {ci(m['roc_auc_macro'], m.get('roc_auc_macro_ci'))}"
                    + (f"; quadratic kappa {ci(m['quadratic_kappa'], m.get('quadratic_kappa_ci'))}" if "quadratic_kappa" in m else ""))
    u = m.get("urgent_referral")
    if u:
        console().print(f"referral ({'+'.join(u['positive_classes'])}): sensitivity {ci(u['sensitivity'], u.get('sensitivity_ci'))}, "
                        f"specificity {ci(u['specificity'], u.get('specificity_ci'))}, AUC {ci(u['auc'], u.get('auc_ci'))}")
    op, cal, gate = m.get("operating_point"), m.get("calibration"), m.get("gate")
    if op:
        console().print(f"at the operating point (threshold {op['threshold']:.3f}, chosen for sensitivity "
                        f"{op['target_sensitivity']:.2f} on validation): sensitivity {ci(op['sensitivity'], op.get('sensitivity_ci'))}, "
                        f"specificity {ci(op['specificity'], op.get('specificity_ci'))}")
    if cal:
        console().print(f"calibration: temperature {cal['temperature']:.2f}, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}")
    if gate:
        console().print(f"quality gate: {gate['n_rejected']} of {gate['n_checked']} ungradable ({gate['rejection_rate']:.1%})"
                        + (f": {', '.join(f'{k} {v}' for k, v in gate['reasons'].items())}" if gate["reasons"] else ""))


def print_predictions(results: list[dict[str, Any]], classes: list[str]) -> None:
    from rich.table import Table

    t = Table()
    for col in ("input", "label", "referral", "refer", "gate", *classes):
        t.add_column(col)
    for r in results:
        if "error" not in r:
            gate = r.get("gate", {"ok": True})
            t.add_row(r["input"], r["label"] or "-", r["referral"] or "", _yes_no(r.get("refer")),
                      "ok" if gate["ok"] else f"ungradable: {gate['reason']}",
                      *(f"{r['probabilities'][c]:.3f}" for c in classes))
    console(stdout=True).print(t)


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def print_gate_summary(results: list[dict[str, Any]], gated: bool) -> None:
    """'N of M ungradable (reasons)' on stderr; a note when the bundle has no gate."""
    from ..trust import summarize

    checked = [r["gate"] for r in results if "gate" in r]
    if not gated:
        console().print("note: this bundle has no quality gate (it predates it): every readable image is graded")
    elif checked:
        s = summarize(checked)
        console().print(f"{s['n_rejected']} of {s['n_checked']} ungradable"
                        + (" (" + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) + ")" if s["reasons"] else ""))


def predictions_csv(results: list[dict[str, Any]], classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["input", "label", "referral", *[f"p_{c}" for c in classes], "p_referral", "refer", "gate", "gate_reason",
                "error"])
    for r in results:
        p, gate = r.get("probabilities", {}), r.get("gate")
        w.writerow([r["input"], r.get("label") or "", r.get("referral") or "", *[p.get(c, "") for c in classes],
                    "" if r.get("p_referral") is None else r["p_referral"], _yes_no(r.get("refer")),
                    "" if gate is None else ("ok" if gate["ok"] else "ungradable"), (gate or {}).get("reason") or "",
                    r.get("error", "")])
    return buf.getvalue()
