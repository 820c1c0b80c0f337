"""A self-contained HTML evaluation report, and the training-curves plot the trainer saves.

Self-contained means one file that opens anywhere, offline, years later: CSS inline, plots as
base64 PNG data URIs, no scripts, no external links. Every string that comes from data (class
names, the model manifest, the title) is HTML-escaped. Matplotlib is used through its
object-oriented API (Figure + Agg), never pyplot, so no global backend or figure state is touched.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from retinalens._io import atomic_write_bytes
from retinalens.errors import RetinaLensError
from retinalens.evaluate.metrics import roc_curves

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FOOTER = "Research use only, not a medical device."
_CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}.note{color:#666;font-size:.9em}
footer{margin-top:2.5em;padding-top:.6em;border-top:1px solid #ddd;color:#a00;font-weight:600}
"""


def write_html_report(
    path: str | Path,
    metrics: dict,
    *,
    y_true: np.ndarray,
    probs: np.ndarray,
    title: str = "RetinaLens evaluation",
    model: dict | None = None,
    curves_csv: str | Path | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the report for `metrics` (from classification_metrics on the same y_true/probs).

    `model` is the model bundle's manifest; `curves_csv` the trainer's per-epoch log;
    `extra_sections` are (plain-text heading, already-safe HTML body) pairs appended at the end.
    """
    try:
        names = list(metrics["classes"])
        n_images = metrics["n_images"]
        urgent = metrics["urgent_referral"]
    except (KeyError, TypeError) as exc:
        raise RetinaLensError(f"metrics is not a classification_metrics result: {exc}") from exc
    # Validates y_true/probs against the classes before anything is drawn.
    curves = roc_curves(y_true, probs, names, urgent["positive_classes"] if urgent else None)
    if len(y_true) != n_images:
        raise RetinaLensError(f"y_true has {len(y_true)} images but the metrics cover {n_images}")

    confusion = _confusion_figure(metrics["confusion_matrix"], names)
    sections = [
        ("Summary", _summary_table(metrics)),
        ("Per class", _per_class_table(metrics)),
        ("Confusion matrix", _img(confusion, "Confusion matrix")),
        ("ROC curves", _img(_roc_figure(curves, metrics), "ROC curves")),
    ]
    if curves_csv is not None:
        training = _training_figure(_read_curves(curves_csv))
        sections.append(("Training curves", _img(training, "Training curves")))
    if model is not None:
        sections.append(("Model", _model_table(model)))
    sections += [(html.escape(str(heading)), body) for heading, body in extra_sections]

    body = "\n".join(f"<section><h2>{head}</h2>\n{content}</section>" for head, content in sections)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n<footer>{FOOTER}</footer></body></html>\n"
    )
    out = Path(path)
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


def plot_training_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Loss and accuracy per epoch (train solid, validation dashed) from the trainer's CSV log."""
    out = Path(png_path)
    atomic_write_bytes(out, _png_bytes(_training_figure(_read_curves(csv_path))))
    return out


def _summary_table(metrics: dict) -> str:
    ci = metrics.get("ci") or {}
    rows = [
        ("Images / patients", f"{metrics['n_images']} / {metrics['n_patients']}"),
        ("Accuracy (argmax)", _fmt(metrics["accuracy"], metrics.get("accuracy_ci"))),
        ("ROC AUC, macro one-vs-rest", _fmt(metrics["roc_auc_macro"], metrics.get("roc_auc_macro_ci"))),
    ]
    urgent = metrics["urgent_referral"]
    if urgent:
        flag = f"{' + '.join(urgent['positive_classes'])}, score ≥ {urgent['threshold']:g}"
        rows += [
            (f"Urgent referral ({flag}): sensitivity",
             _fmt(urgent["sensitivity"], urgent.get("sensitivity_ci"))),
            ("Urgent referral: specificity", _fmt(urgent["specificity"], urgent.get("specificity_ci"))),
            ("Urgent referral: ROC AUC", _fmt(urgent["auc"], urgent.get("auc_ci"))),
            ("Urgent / non-urgent images", f"{urgent['n_positive']} / {urgent['n_negative']}"),
        ]
    table = _table(("Metric", "Value (CI)"), [(html.escape(k), html.escape(v)) for k, v in rows])
    note = (
        f"{100 * ci['level']:g}% confidence intervals: {ci['method']}, "
        f"{ci['n_boot']} resamples, seed {ci['seed']}."
        if ci
        else "No confidence intervals."
    )
    return f'{table}\n<p class="note">{html.escape(note)}</p>'


def _per_class_table(metrics: dict) -> str:
    header = ("Class", "Support", "Precision", "Sensitivity (recall)", "Specificity", "F1", "ROC AUC")
    rows = []
    for name, m in metrics["per_class"].items():
        keys = ("precision", "sensitivity", "specificity", "f1", "auc")
        cells = [_fmt(m.get(key), m.get(f"{key}_ci")) for key in keys]
        rows.append((html.escape(name), str(m["support"]), *(html.escape(c) for c in cells)))
    return _table(header, rows)


def _model_table(model: dict) -> str:
    """The few manifest fields a reader of the report needs; the manifest itself has the rest."""
    fields = (
        ("Backbone", ("backbone", "backbone_name", "arch")),
        ("Head", ("head", "head_type")),
        ("Classes", ("classes",)),
        ("Training data", ("training_data", "train_data", "data", "dataset", "training")),
        ("Library versions", ("versions", "library_versions", "environment")),
    )
    rows = []
    for label, keys in fields:
        value = next((model[k] for k in keys if model.get(k) is not None), None)
        if value is not None:
            rows.append((label, html.escape(_describe(value))))
    return _table(("Field", "Value"), rows, numeric=False) if rows else '<p class="note">No model details.</p>'


def _describe(value: object) -> str:
    """Nested manifest values as one readable line."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """An HTML table from already-escaped cells; with `numeric`, cells after the first align right."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cell = '<td class="num">{}</td>' if numeric else "<td>{}</td>"
    body = "".join(
        f"<tr><td>{row[0]}</td>" + "".join(cell.format(c) for c in row[1:]) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _img(figure: Figure, alt: str) -> str:
    data = base64.b64encode(_png_bytes(figure)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: the PNG stays byte-identical across runs and carries no URL.
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def _label(text: str) -> str:
    """Matplotlib reads text between two '$' as mathtext; class names are plain text."""
    return text.replace("$", r"\$")


def _confusion_figure(confusion: Sequence[Sequence[int]], names: Sequence[str]) -> Figure:
    from matplotlib.figure import Figure

    counts = np.asarray(confusion)
    k = len(names)
    figure = Figure(figsize=(2.5 + 0.8 * k, 2.0 + 0.8 * k), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.8)
    labels = [_label(n) for n in names]
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    dark = counts.max() / 2  # white digits on dark cells stay readable
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > dark else "black")
    return figure


def _roc_figure(curves: dict, metrics: dict) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 5.0), layout="constrained")
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    for name, curve in curves["classes"].items():
        auc = metrics["per_class"].get(name, {}).get("auc")
        suffix = f" (AUC {auc:.3f})" if auc is not None else ""
        ax.plot(curve["fpr"], curve["tpr"], label=_label(name) + suffix)
    urgent = metrics["urgent_referral"]
    if curves["urgent"] is not None and urgent:
        suffix = f" (AUC {urgent['auc']:.3f})" if urgent["auc"] is not None else ""
        label = _label("Urgent referral: " + " + ".join(urgent["positive_classes"])) + suffix
        ax.plot(curves["urgent"]["fpr"], curves["urgent"]["tpr"], "--", color="black", lw=2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("Sensitivity (true positive rate)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return figure


def _read_curves(csv_path: str | Path) -> dict[str, np.ndarray]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise RetinaLensError(f"cannot read training curves {csv_path}: {exc}") from exc
    if not rows:
        raise RetinaLensError(f"training curves {csv_path} has no rows")
    missing = [c for c in _CURVE_COLUMNS if c not in rows[0]]
    if missing:
        raise RetinaLensError(f"training curves {csv_path} lacks columns {missing}")

    def number(cell: str | None) -> float:
        # An empty cell (e.g. no validation split) plots as a gap.
        try:
            return float(cell) if cell not in (None, "") else float("nan")
        except ValueError as exc:
            raise RetinaLensError(f"training curves {csv_path}: {exc}") from exc

    return {c: np.array([number(row[c]) for row in rows]) for c in _CURVE_COLUMNS}


def _training_figure(curves: dict[str, np.ndarray]) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 3.6), layout="constrained")
    for ax, metric, label in zip(figure.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy")):
        for split, style in (("train", "-"), ("val", "--")):
            ax.plot(curves["epoch"], curves[f"{split}_{metric}"], style, marker="o", ms=3, label=split)
        ax.set_xlabel("Epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure
