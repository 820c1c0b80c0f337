"""What the commands print: metrics and prediction tables, the quality-gate summary (the CSV rows of
`predict` are predict/table.py's). File names are shown with their control characters escaped.

Import-light (rich's tables are imported when one is drawn), and free of the commands themselves, so that
cli/demo.py and others print exactly what `evaluate` and `predict` print without importing cli/main.py.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator

from .._console import console, markup_safe, printable
from ..predict.table import yes_no

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions
    from rich.measure import Measurement
    from rich.text import Text


def ci(v: Any, c: Any) -> str:
    """A value with its confidence interval, as the tables print it."""
    return "n/a" if v is None else (f"{v:.3f}" + (f" ({c[0]:.2f}-{c[1]:.2f})" if c else ""))


def print_metrics(m: dict[str, Any]) -> None:
    from rich.table import Table

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


def print_volume_metrics(v: dict[str, Any]) -> None:
    """`evaluate --volumes`: the volume-level figures after the B-scan ones, with the grouping used."""
    console().print(f"per volume: {v['grouping_note']}; {v['n_volumes']} volumes, {v['n_ungradable']} ungradable, "
                    f"{v['n_mixed_labels']} with B-scans in several class folders (truth: the most urgent)",
                    highlight=False, soft_wrap=True)
    m = v["metrics"]
    if m is None:
        console().print("per volume: no gradable volume")
        return
    u = m.get("urgent_referral")
    console().print(f"per volume: accuracy {ci(m['accuracy'], m.get('accuracy_ci'))}" + (
        f"; referral sensitivity {ci(u['sensitivity'], u.get('sensitivity_ci'))}, specificity "
        f"{ci(u['specificity'], u.get('specificity_ci'))} at P >= {u['threshold']:.3g}" if u else ""),
        highlight=False, soft_wrap=True)


def print_predictions(results: list[dict[str, Any]], classes: list[str], out: Console | None = None) -> None:
    """The results as a table on stdout (or `out`), narrow enough for 80 columns: single spaces between
    columns, the inputs' common folder said once above, and a name still too long loses its start."""
    from rich import box
    from rich.table import Table

    ok = [r for r in results if "error" not in r]
    folder = _common_folder([r["input"] for r in ok])
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False, title_justify="left",
              title=f"in {markup_safe(folder)}/" if folder else None, title_style="")
    for col in ("input", "label", "referral", "refer", "gate", *classes):
        t.add_column(col)
    for r in ok:
        gate = r.get("gate", {"ok": True})
        name = r["input"][len(folder) + 1:] if folder else r["input"]
        t.add_row(ElidedStart(printable(name)), r["label"] or "-", r["referral"] or "",
                  yes_no(r.get("refer")), "ok" if gate["ok"] else f"ungradable: {gate['reason']}",
                  *(f"{r['probabilities'][c]:.3f}" for c in classes))
    (out or console(stdout=True)).print(t, highlight=False)


def _common_folder(names: list[str]) -> str:
    """The folder every one of several file inputs is under ("" for one input, a URL, or none shared)."""
    if len(names) < 2 or any("://" in n for n in names):
        return ""
    try:
        folder = os.path.commonpath([os.path.dirname(n) for n in names]) if all(os.path.dirname(n) for n in names) else ""
    except ValueError:  # absolute and relative names mixed
        return ""
    return "" if folder == os.sep else folder


class ElidedStart:
    """A table cell of one line that, when narrowed, drops the start of its text (`…CNV-108392-3.jpeg`).

    Rich cuts a long cell from the right, which turns every file of one folder into the same
    `folder/CNV/CNV-10839…`: the end of a path is what tells files apart."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        from rich.measure import Measurement

        # At least the file name (and the ellipsis) when the table has to shrink, up to 40 columns.
        tail = len(self.text.rstrip("/").rsplit("/", 1)[-1]) + 1
        return Measurement(min(len(self.text), tail, 40), len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        from rich.text import Text

        w = options.max_width
        shown = self.text if len(self.text) <= w else "…" + self.text[len(self.text) - w + 1:]
        yield Text(shown, no_wrap=True, overflow="crop")


def print_gate_summary(results: list[dict[str, Any]], gated: bool) -> None:
    """'N of M ungradable (reasons)' on stderr; a note when the bundle has no gate."""
    from ..trust import summarize

    checked = [r["gate"] for r in results if "gate" in r]
    print_gate_counts(summarize(checked) if checked else None, gated)


def print_gate_counts(s: dict[str, Any] | None, gated: bool) -> None:
    """print_gate_summary from the gate's summary (trust.gate.summarize; None: nothing was checked)."""
    if not gated:
        console().print("note: this bundle has no quality gate (it predates it): every readable image is graded")
    elif s:
        console().print(f"{s['n_rejected']} of {s['n_checked']} ungradable"
                        + (" (" + ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) + ")" if s["reasons"] else ""))
