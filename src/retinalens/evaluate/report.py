"""The self-contained HTML evaluation report.

Self-contained means one file that opens anywhere, offline, years later: CSS inline, plots and
thumbnails as base64 data URIs, no scripts, no external links. Every string that comes from data
(class names, file names, the model manifest, the title) is HTML-escaped. The figures are drawn in
evaluate/plots.py; the model card is the bundle's (bundle/card.py), the same text as its MODEL_CARD.md.
Every label of the referral decision comes from the bundle's referral levels (bundle/card.py
referral_label): a DR grade model refers grade 2 routinely, so its decision is not called "urgent".

Sections: metrics with CIs, confusion matrix, ROC curves, calibration (reliability diagram),
operating point, quality gate, misclassified images with heat maps, OCT volumes (evaluate --volumes), data, training curves and a
model card. A section whose numbers the evaluation did not produce says so instead of vanishing.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retinalens._io import atomic_write_bytes
from retinalens.errors import RetinaLensError
from retinalens.bundle.card import bundle_card, dataset_name, model_card as manifest_card, ordered_splits, \
    referral_label
from retinalens.evaluate.card import INTENDED_USE, model_card
from retinalens.evaluate.markup import data_uri as _data_uri
from retinalens.evaluate.markup import fmt as _fmt
from retinalens.evaluate.markup import table as _table
from retinalens.evaluate.metrics import roc_curves
from retinalens.evaluate.report_volumes import volumes_section
from retinalens.evaluate.plots import (
    MIN_BIN_IMAGES,
    confusion_figure,
    overfitting_note,
    plot_training_curves,
    png_bytes,
    read_curves,
    reliability_figure,
    roc_figure,
    training_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from retinalens.bundle.store import Bundle
    from retinalens.evaluate.volumes import EvaluatedVolume
    from retinalens.predict.model import Model

# INTENDED_USE and plot_training_curves live in card.py and plots.py; the web app and the trainer
# import them from here, as before the split.
__all__ = ["FOOTER", "INTENDED_USE", "plot_training_curves", "write_html_report"]

FOOTER = "Research use only, not a medical device."
_NOT_AVAILABLE = '<p class="note">Not available for this model.</p>'
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td:first-child{min-width:9em}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}.note{color:#666;font-size:.9em}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.gallery figure{margin:0;width:392px;font-size:.85em}
.gallery img{width:192px;margin-right:4px}.gallery figcaption{overflow-wrap:anywhere}
.strip{display:flex;gap:3px;overflow-x:auto;padding:4px 0}.strip figure{margin:0;font-size:.75em;text-align:center}
.strip img{width:80px;display:block;border:3px solid transparent}.strip .worst img{border-color:#c00}
.strip .worst figcaption{color:#c00;font-weight:600}
footer{margin-top:2.5em;padding-top:.6em;border-top:1px solid #ddd;color:#a00;font-weight:600}
"""


def write_html_report(
    path: str | Path,
    metrics: dict,
    *,
    y_true: np.ndarray,
    probs: np.ndarray,
    title: str | None = None,
    model: dict | None = None,
    curves_csv: str | Path | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
    images: Sequence[str | Path] | None = None,
    bundle: Bundle | Model | None = None,
    gallery_limit: int = 48,
    best_epoch: int | None = None,
    volumes: Sequence[EvaluatedVolume] | None = None,
    load_images: Callable[[Sequence[int]], list[Any]] | None = None,
) -> Path:
    """Write the report for `metrics` (from classification_metrics on the same y_true/probs).

    `model` is the model bundle's manifest (default: `bundle`'s); `curves_csv` the trainer's
    per-epoch log; `images` the evaluated files in the order of y_true: with `bundle`, the
    misclassified ones (at most `gallery_limit`) are shown with their Grad-CAM heat maps.
    `extra_sections` are (plain-text heading, already-safe HTML body) pairs appended at the end.
    `title` defaults to the model, data set and split; `best_epoch` (marked on the curves) to the bundle's.
    `volumes` (an evaluation per OCT volume, metrics["volumes"]): their metrics and strips of B-scans.
    `load_images`: what the decoder reads for the images of these indices, where `images` are names
    (the frames of a multi-frame file, evaluate/frames.py); default: the files `images` names.
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
    trained = getattr(bundle, "bundle", bundle)  # a predict.Model wraps its Bundle
    if model is None and trained is not None:
        model = trained.manifest.to_dict()
    # With a bundle, the card is its MODEL_CARD.md's (name, manifest hash); else the manifest document's.
    card = bundle_card(trained) if trained is not None else \
        manifest_card(model) | {"name": Path((metrics.get("model") or {}).get("path", "")).name or None}
    if best_epoch is None and trained is not None:
        best_epoch = trained.manifest.training.best_epoch
    if (card.get("head") or {}).get("kind") == "logreg":
        best_epoch = None  # a fitted logistic head has no epochs: the curves are another candidate's
    referral = referral_label(urgent["positive_classes"], card["referral"]) if urgent else "Referral"
    title = title or report_title(metrics, card.get("name"))

    confusion = confusion_figure(metrics["confusion_matrix"], names)
    sections = [
        ("Metrics", _summary_table(metrics, referral, card["referral"]) + _per_class_table(metrics)),
        ("Confusion matrix", _img(confusion, "Confusion matrix")),
        ("ROC curves", _img(roc_figure(curves, metrics, referral), "ROC curves")),
        ("Calibration", _calibration_section(metrics.get("calibration"))),
        ("Operating point", _operating_point_section(metrics.get("operating_point"), card["referral"])),
        ("Quality gate", _gate_section(metrics.get("gate"))),
        ("Misclassified images", _gallery_section(bundle, images, y_true, probs, names, gallery_limit, load_images)),
        *([("OCT volumes", volumes_section(metrics.get("volumes"), volumes, bundle))] if volumes is not None else []),
        ("Data", _data_section(metrics, model)),
        ("Training curves", _curves_section(curves_csv, best_epoch) if curves_csv is not None else _NOT_AVAILABLE),
        ("Model card", model_card(card, metrics)),
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


def report_title(metrics: dict, model_name: str | None) -> str:
    """"RetinaLens evaluation of MODEL on DATA SET, SPLIT split": what was evaluated on what."""
    data = metrics.get("data") or {}
    title = "RetinaLens evaluation" + (f" of {model_name}" if model_name else "")
    if data.get("path"):
        title += f" on {dataset_name(data['path'])}, " + (f"{data['split']} split" if data.get("split") else "all images")
    return title


def _summary_table(metrics: dict, referral: str, levels: dict[str, str | None] | None) -> str:
    ci = metrics.get("ci") or {}
    rows = [
        ("Images / patients", f"{metrics['n_images']} / {metrics['n_patients']}"),
        ("Accuracy (argmax)", _fmt(metrics["accuracy"], metrics.get("accuracy_ci"))),
        ("ROC AUC, macro one-vs-rest", _fmt(metrics["roc_auc_macro"], metrics.get("roc_auc_macro_ci"))),
    ]
    if "quadratic_kappa" in metrics:  # ordinal classes (DR grades): how far off the wrong grades are
        rows.append(("Quadratic weighted kappa", _fmt(metrics["quadratic_kappa"], metrics.get("quadratic_kappa_ci"))))
    urgent = metrics["urgent_referral"]
    if urgent:
        flag = f"{' + '.join(urgent['positive_classes'])}, score ≥ {urgent['threshold']:g}"
        rows += [
            (f"{referral} ({flag}): sensitivity", _fmt(urgent["sensitivity"], urgent.get("sensitivity_ci"))),
            (f"{referral}: specificity", _fmt(urgent["specificity"], urgent.get("specificity_ci"))),
            (f"{referral}: ROC AUC", _fmt(urgent["auc"], urgent.get("auc_ci"))),
            (f"{referral}: referred / other images", f"{urgent['n_positive']} / {urgent['n_negative']}"),
        ]
    if levels:
        rows.append(("Referral levels (from the bundle)", ", ".join(f"{c}: {lv or 'none'}" for c, lv in levels.items())))
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
    figure = _img(reliability_figure(panels), "Reliability diagram") if panels else ""
    note = ('<p class="note">Reliability diagram: the accuracy of the images in each confidence bin (bars, with the '
            "number of images above each) and their mean confidence (red marks); where a model is calibrated, the two "
            f"meet on the diagonal. Bins of fewer than {MIN_BIN_IMAGES} images are grey: their accuracy is too few "
            "images to read.</p>")
    return _table(("Measure", "Value"), rows) + figure + (note if panels else "")


def _operating_point_section(op: dict | None, levels: dict[str, str | None] | None) -> str:
    if not op:
        return _NOT_AVAILABLE
    positives = " + ".join(op.get("positive_classes") or [])
    rows = [
        ("Decision", referral_label(op.get("positive_classes") or [], levels)),
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
                     probs: np.ndarray, names: list[str], limit: int,
                     load: Callable[[Sequence[int]], list[Any]] | None = None) -> str:
    if bundle is None or images is None:
        return _NOT_AVAILABLE
    from retinalens.explain.gallery import misclassified_gallery

    items, n_wrong, failures = misclassified_gallery(bundle, images, y_true, probs, names, limit=limit, load=load)
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
    training = manifest_card(model, local_paths=True)["training_data"]
    splits = training.get("splits")
    if not splits:
        return parts[0] + '<p class="note">The training data summary is not available for this model.</p>'
    classes = sorted({c for v in splits.values() if isinstance(v, dict) for c in v.get("per_class", {})})
    rows = [(html.escape(name), str(v.get("n_images")), str(v.get("n_patients")),
             *(str(v.get("per_class", {}).get(c, 0)) for c in classes))
            for name, v in ordered_splits(splits)]
    removed = splits.get("removed") or {}
    reasons = ", ".join(f"{r}: {n}" for r, n in (removed.get("reasons") or {}).items())
    note = f"Removed from training to keep the splits disjoint (exact duplicates, patients shared with test): " \
           f"{removed.get('n', 0)} images" + (f" ({reasons})" if reasons else "") + "."
    parts += [(f"<p>Training data: {html.escape(str(training.get('data') or '?'))}, by split "
               "(images per class; patients disjoint between splits):</p>"),
              _table(("Split", "Images", "Patients", *classes), rows),
              f'<p class="note">{html.escape(note)}</p>']
    return "".join(parts)


def _curves_section(curves_csv: str | Path, best_epoch: int | None) -> str:
    curves = read_curves(curves_csv)
    notes = [f"The dotted line marks epoch {best_epoch}, whose weights the bundle kept (the best on validation)."
             if best_epoch is not None else "The epoch whose weights were kept is not recorded."]
    if warning := overfitting_note(curves, best_epoch):
        notes.append(f"<strong>{html.escape(warning)}</strong>")
    return _img(training_figure(curves, best_epoch), "Training curves") + "".join(
        f'<p class="note">{n}</p>' for n in notes)


def _img(figure: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{_data_uri(png_bytes(figure), "image/png")}">'
