"""The self-contained HTML evaluation report, and the training-curves plot the trainer saves.

Self-contained means one file that opens anywhere, offline, years later: CSS inline, plots and
thumbnails as base64 data URIs, no scripts, no external links. Every string that comes from data
(class names, file names, the model manifest, the title) is HTML-escaped. Matplotlib is used
through its object-oriented API (Figure + Agg), never pyplot, so no global backend or figure
state is touched.

Sections: metrics with CIs, confusion matrix, ROC curves, calibration (reliability diagram),
operating point, quality gate, misclassified images with heat maps, data, training curves and a
model card. A section whose numbers the evaluation did not produce says so instead of vanishing.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retinalens._io import atomic_write_bytes
from retinalens.errors import RetinaLensError
from retinalens.evaluate.metrics import roc_curves

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from retinalens.models.bundle import Bundle
    from retinalens.predict.model import Model

FOOTER = "Research use only, not a medical device."
INTENDED_USE = ("Research only, not a medical device: for studying automated triage of retinal images. "
                "Not for diagnosis, screening or treatment decisions about any person.")
_NOT_AVAILABLE = '<p class="note">Not available for this model.</p>'
_CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td:first-child{min-width:9em}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}.note{color:#666;font-size:.9em}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.gallery figure{margin:0;width:392px;font-size:.85em}
.gallery img{width:192px;margin-right:4px}.gallery figcaption{overflow-wrap:anywhere}
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
    images: Sequence[str | Path] | None = None,
    bundle: Bundle | Model | None = None,
    gallery_limit: int = 48,
) -> Path:
    """Write the report for `metrics` (from classification_metrics on the same y_true/probs).

    `model` is the model bundle's manifest (default: `bundle`'s); `curves_csv` the trainer's
    per-epoch log; `images` the evaluated files in the order of y_true: with `bundle`, the
    misclassified ones (at most `gallery_limit`) are shown with their Grad-CAM heat maps.
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
    if images is not None and len(images) != n_images:
        raise RetinaLensError(f"{len(images)} image paths for {n_images} evaluated images")
    if model is None and bundle is not None:
        model = bundle.manifest

    confusion = _confusion_figure(metrics["confusion_matrix"], names)
    sections = [
        ("Metrics", _summary_table(metrics) + _per_class_table(metrics)),
        ("Confusion matrix", _img(confusion, "Confusion matrix")),
        ("ROC curves", _img(_roc_figure(curves, metrics), "ROC curves")),
        ("Calibration", _calibration_section(metrics.get("calibration"))),
        ("Operating point", _operating_point_section(metrics.get("operating_point"))),
        ("Quality gate", _gate_section(metrics.get("gate"))),
        ("Misclassified images", _gallery_section(bundle, images, y_true, probs, names, gallery_limit)),
        ("Data", _data_section(metrics, model)),
        ("Training curves", _img(_training_figure(_read_curves(curves_csv)), "Training curves")
         if curves_csv is not None else _NOT_AVAILABLE),
        ("Model card", _model_card(model, metrics)),
    ]
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


def _calibration_section(cal: dict | None) -> str:
    if not cal:
        return _NOT_AVAILABLE
    rows = [(label, html.escape(_fmt(cal.get(key), None))) for label, key in (
        ("Temperature (fitted on validation)", "temperature"), ("Expected calibration error, raw", "ece_before"),
        ("Expected calibration error, temperature-scaled", "ece_after"))]
    panels = [(label, cal[key]) for label, key in (("raw", "reliability_before"), ("temperature-scaled", "reliability_after"))
              if cal.get(key)]
    figure = _img(_reliability_figure(panels), "Reliability diagram") if panels else ""
    note = ('<p class="note">Reliability diagram: the accuracy of the images in each confidence bin (bars) '
            "and their mean confidence (red marks); where a model is calibrated, the two meet on the diagonal.</p>")
    return _table(("Measure", "Value"), rows) + figure + (note if panels else "")


def _operating_point_section(op: dict | None) -> str:
    if not op:
        return _NOT_AVAILABLE
    positives = " + ".join(op.get("positive_classes") or [])
    rows = [
        (f"Threshold on P({positives})", _fmt(op.get("threshold"), None)),
        ("Target sensitivity (on validation)", _fmt(op.get("target_sensitivity"), None)),
        ("Sensitivity", _fmt(op.get("sensitivity"), op.get("sensitivity_ci"))),
        ("Specificity", _fmt(op.get("specificity"), op.get("specificity_ci"))),
    ]
    if "n_positive" in op:
        rows.append(("Positive / negative images", f"{op['n_positive']} / {op.get('n_negative')}"))
    return _table(("Referral decision", "Value (CI)"), [(html.escape(k), html.escape(v)) for k, v in rows])


def _gate_section(gate: dict | None) -> str:
    if not gate:
        return _NOT_AVAILABLE
    rate = gate.get("rejection_rate")
    rows = [("Images checked", str(gate.get("n_checked"))), ("Images rejected", str(gate.get("n_rejected"))),
            ("Rejection rate", "n/a" if rate is None else f"{100 * rate:.1f}%")]
    table = _table(("Quality gate", "Value"), [(html.escape(k), html.escape(v)) for k, v in rows])
    reasons = gate.get("reasons") or {}
    if reasons:
        n = max(int(gate.get("n_checked") or 0), 1)
        table += _table(("Reason", "Images", "Share of checked"),
                        [(html.escape(str(r)), str(c), f"{100 * c / n:.1f}%")
                         for r, c in sorted(reasons.items(), key=lambda rc: -rc[1])])
    return table


def _gallery_section(bundle: Bundle | Model | None, images: Sequence[str | Path] | None, y_true: np.ndarray,
                     probs: np.ndarray, names: list[str], limit: int) -> str:
    if bundle is None or images is None:
        return _NOT_AVAILABLE
    from retinalens.explain.gallery import misclassified_gallery

    items, n_wrong, failures = misclassified_gallery(bundle, images, y_true, probs, names, limit=limit)
    if not n_wrong:
        return '<p class="note">No misclassified images.</p>'
    shown = f"the {len(items)} most confident" if len(items) < n_wrong else f"all {len(items)}"
    figures = "".join(
        "<figure>"
        f'<img alt="{html.escape(item.name)}" src="{_data_uri(item.image_jpeg, "image/jpeg")}">'
        f'<img alt="Heat map for {html.escape(item.predicted)}" src="{_data_uri(item.overlay_jpeg, "image/jpeg")}">'
        f"<figcaption>{html.escape(Path(item.name).name)}: true {html.escape(item.true_class)}, "
        f"predicted {html.escape(item.predicted)} ({item.confidence:.2f})</figcaption></figure>"
        for item in items)
    note = (f"{n_wrong} of {len(y_true)} images misclassified; {shown} shown, each beside its Grad-CAM heat map "
            "for the predicted class (red: where the model found the most evidence for it).")
    unread = f" {len(failures)} could not be read again for the gallery." if failures else ""
    return f'<p class="note">{html.escape(note + unread)}</p><div class="gallery">{figures}</div>'


def _data_section(metrics: dict, model: dict | None) -> str:
    """What was evaluated, then the model's own training data by split (from its manifest)."""
    data = metrics.get("data") or {}
    evaluated = f"Evaluated on {data.get('path', '?')}" + (f" (split {data['split']})" if data.get("split") else "")
    evaluated += f": {metrics['n_images']} images of {metrics['n_patients']} patients"
    if metrics.get("failures"):
        evaluated += f"; {len(metrics['failures'])} not evaluated (unreadable or unlabelled)"
    if metrics.get("overlap_with_training"):
        evaluated += f"; {metrics['overlap_with_training']} were in the training data, so these metrics are optimistic"
    parts = [f"<p>{html.escape(evaluated)}.</p>"]
    training = (model or {}).get("training") or {}
    splits = training.get("splits")
    if not splits:
        return parts[0] + '<p class="note">The training data summary is not available for this model.</p>'
    classes = sorted({c for v in splits.values() if isinstance(v, dict) for c in v.get("per_class", {})})
    rows = [(html.escape(name), str(v.get("n_images")), str(v.get("n_patients")),
             *(str(v.get("per_class", {}).get(c, 0)) for c in classes))
            for name, v in _ordered_splits(splits)]
    removed = splits.get("removed") or {}
    reasons = ", ".join(f"{r}: {n}" for r, n in (removed.get("reasons") or {}).items())
    note = f"Removed from training to keep the splits disjoint (exact duplicates, patients shared with test): " \
           f"{removed.get('n', 0)} images" + (f" ({reasons})" if reasons else "") + "."
    parts += [(f"<p>Training data: {html.escape(str(training.get('data', '?')))}, by split "
               "(images per class; patients disjoint between splits):</p>"),
              _table(("Split", "Images", "Patients", *classes), rows),
              f'<p class="note">{html.escape(note)}</p>']
    return "".join(parts)


def _model_card(model: dict | None, metrics: dict) -> str:
    """Intended use, what the model is, what it learnt from, how it scored, and its limits."""
    model = model or {}
    training = model.get("training") or {}
    validation = model.get("validation") or {}
    backbone = model.get("backbone")
    rows = [("Intended use", INTENDED_USE)]
    for label, value in (
        ("Task", model.get("task")),
        ("Classes", model.get("classes") or metrics.get("classes")),
        ("Referral levels", model.get("referral")),
        ("Backbone", _backbone_text(backbone) if isinstance(backbone, dict) else backbone),
        ("Head", _head_text(model["head"]) if isinstance(model.get("head"), dict) else model.get("head")),
        ("Feature precision", (model.get("features") or {}).get("precision")),
        ("Training data", training.get("data") or model.get("training_data")),
        ("Training images / patients", _split_counts(training.get("splits"))),
        ("Validation accuracy", _fmt(validation["accuracy"], validation.get("accuracy_ci"))
         if validation.get("accuracy") is not None else None),
        ("Logistic-regression baseline, validation accuracy",
         _fmt((training.get("baseline_logistic_regression") or {}).get("val_acc"), None)
         if training.get("baseline_logistic_regression") else None),
        ("Created", model.get("created")),
        ("Library versions", model.get("library_versions") or model.get("versions")),
    ):
        if value:
            rows.append((label, value if isinstance(value, str) else _describe(value)))
    rows.append(("Limits", "; ".join(_LIMITS)))
    return _table(("Field", "Value"), [(html.escape(k), html.escape(v)) for k, v in rows], numeric=False)


_LIMITS = (
    "measured only on the data named here: other devices, sites, populations or image types may score lower",
    "a class the model was not trained on is forced into one of its classes",
    "images failing the quality gate (when present) should not be classified at all",
    "heat maps show where the evidence for a class lies, not the lesion's outline",
    "confidence intervals cover sampling of these patients, not a change of population",
)


def _backbone_text(b: dict) -> str:
    size = (b.get("preprocessing") or {}).get("size")
    return f"{b.get('name')}" + (f", {size} px" if size else "") + (f", weights: {b['weights_source']}"
                                                                   if b.get("weights_source") else "")


def _head_text(head: dict) -> str:
    rest = {k: v for k, v in head.items() if k != "kind"}
    return f"{head.get('kind', '?')}" + (f" ({_describe(rest)})" if rest else "")


def _split_counts(splits: dict | None) -> str | None:
    if not splits:
        return None
    return ", ".join(f"{k} {v['n_images']} / {v['n_patients']}" for k, v in _ordered_splits(splits))


def _ordered_splits(splits: dict) -> list[tuple[str, dict]]:
    """train, val, test first (the manifest's JSON keys come sorted), then any other split."""
    rank = {"train": 0, "val": 1, "test": 2}
    return sorted(((k, v) for k, v in splits.items() if k != "removed" and isinstance(v, dict) and "n_images" in v),
                  key=lambda kv: (rank.get(kv[0], 3), kv[0]))


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
    return f'<img alt="{html.escape(alt)}" src="{_data_uri(_png_bytes(figure), "image/png")}">'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


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


def _reliability_figure(panels: list[tuple[str, dict]]) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(panels), 4.0), layout="constrained")
    for ax, (label, r) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        bins = len(r["count"])
        centres = (np.arange(bins) + 0.5) / bins
        filled = [i for i, n in enumerate(r["count"]) if n]
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
        ax.bar(centres[filled], [r["accuracy"][i] for i in filled], width=1 / bins, edgecolor="black",
               alpha=0.7, label="accuracy")
        # The bin's mean confidence as a bar on the same centre: its distance to the bar top is the gap.
        ax.plot(centres[filled], [r["confidence"][i] for i in filled], "_", color="C3", ms=14, mew=2.5,
                label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("Confidence (top-class probability)")
        ax.set_ylabel("Accuracy")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
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
