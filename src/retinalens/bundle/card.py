"""The model card: what a bundle's manifest, and its latest evaluation, say about the model, for people.

One card for every surface. `model_card` is the card as data (the web app's `/api/model`);
`card_markdown` writes it as text in the sections of the model-card template of Mitchell et al.
(2019, "Model Cards for Model Reporting") that apply here. That one text is the bundle's
MODEL_CARD.md (written at train time, rewritten by `evaluate` with the evaluated metrics), the web
app's `/model` page and the HTML report's "Model card" section (both through `card_html`). The card
reads the manifest document (a hand-made or partial one too, as reports of older bundles have), so
it lives beside the manifest: no other module needs to know its keys. Its "version" is the bundle's digest (signature.py), the
identity `retinalens verify` prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_bytes
from .manifest import REFERRAL_LEVELS
from .signature import manifest_digest

if TYPE_CHECKING:
    from .store import Bundle

CARD_FILE = "MODEL_CARD.md"
INTENDED_USE = ("Research only, not a medical device: for studying automated triage of retinal images. "
                "Not for diagnosis, screening or treatment decisions about any person.")
OUT_OF_SCOPE = (
    "diagnosis, screening, treatment or referral decisions about any person",
    "images of another kind than the training data (another modality, device or field of view)",
    "retinal conditions that are not among its classes",
    "use without a person who reads the image and takes the decision",
)
LIMITS = (
    "measured only on the data named here: other devices, sites, populations or image types may score lower",
    "a class the model was not trained on is forced into one of its classes",
    "images failing the quality gate (when present) should not be classified at all",
    "heat maps show where the evidence for a class lies, not the lesion's outline",
    "confidence intervals cover sampling of these patients, not a change of population",
)
ETHICS = (
    "the data sets carry no age, sex, ethnicity or device per image, so performance across these groups is unknown",
    "a confident score invites automation bias: a wrong label looks as sure as a right one",
    "retinal images are health data: the web app stores uploaded images and corrections in its database",
)
RECOMMENDATIONS = (
    "evaluate on your own patients and devices (`retinalens evaluate`) before trusting any figure here",
    "read the intervals, not the point values: small evaluation sets give wide intervals",
    "compare with the logistic-regression baseline: a model below it has learnt little beyond the backbone",
    "look at the misclassified images and their heat maps in the HTML report (`retinalens report`)",
)
_BACKBONE_FIELDS = ("name", "timm_name", "weights_source", "weights_sha256", "preprocessing")


def model_card(document: dict[str, Any] | None, *, local_paths: bool = False) -> dict[str, Any]:
    """The card of a manifest document (`Manifest.to_dict()`). local_paths=False leaves out where the
    training data lay on the machine that trained it (the web app shows the card to anyone); the data
    set's name (its folder) stays."""
    m = document or {}
    training = m.get("training") or {}
    backbone = m.get("backbone")
    card: dict[str, Any] = {
        "intended_use": INTENDED_USE,
        "version": {"digest": _digest(m), "created": m.get("created")},
        "created": m.get("created"),
        "task": m.get("task"),
        "classes": m.get("classes"),
        "referral": m.get("referral"),
        "positive_classes": m.get("positive_classes"),
        "backbone": {k: backbone.get(k) for k in _BACKBONE_FIELDS} if isinstance(backbone, dict) else backbone,
        "precision": (m.get("features") or {}).get("precision"),
        "head": m.get("head"),
        "ensemble": {"members": [f"{(e.get('backbone') or {}).get('name')} seed {e.get('seed')}" + _view_text(e)
                                 for e in m.get("members") or []],
                     "views": (m.get("tta") or {}).get("views")} if m.get("members") or m.get("tta") else None,
        "training_data": {"dataset": dataset_name(training["data"]) if training.get("data") else None,
                          "layout": training.get("layout"), "splits": training.get("splits"),
                          "extract_failures": training.get("extract_failures")},
        "training": {"mode": training.get("mode"), "best_epoch": training.get("best_epoch"),
                     "epochs_run": training.get("epochs_run")},
        "head_selection": training.get("head_selection"),
        "baseline_logistic_regression": training.get("baseline_logistic_regression"),
        "validation": m.get("validation"),
        "test_metrics": m.get("metrics") or None,
        "thresholds": m.get("thresholds") or None,
        "calibration": m.get("calibration"),
        "quality_gate": m.get("gate"),
        "lineage": m.get("lineage"),
        "library_versions": m.get("library_versions"),
        "limits_of_use": list(LIMITS),
    }
    if local_paths:
        card["training_data"]["data"] = training.get("data")
    return card


def bundle_card(bundle: Bundle) -> dict[str, Any]:
    """A bundle's card with its name (the folder's) and version (the manifest's hash), as the web app serves it."""
    return model_card(bundle.manifest.to_dict()) | {"name": bundle.path.name,
                                                     "version": {"manifest_sha256": bundle.manifest_sha256}}


def write_model_card(bundle: Bundle, evaluation: dict[str, Any] | None = None) -> Path:
    """MODEL_CARD.md into the bundle, atomically: with `evaluation` (evaluate's metrics) its results too."""
    out = bundle.path / CARD_FILE
    atomic_write_bytes(out, card_markdown(bundle_card(bundle), evaluation).encode("utf-8"))
    return out


def served_card_markdown(bundle: Bundle) -> str:
    """The bundle's MODEL_CARD.md when it describes this very manifest (by hash), else the card from the
    manifest alone: a card left from other weights is never shown for these."""
    card = bundle_card(bundle)
    try:
        text = (bundle.path / CARD_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    return text if _version_line(card) in text else card_markdown(card)


# -- the text -------------------------------------------------------------------------------------


def card_markdown(card: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """The card (`model_card`, `bundle_card` or the web app's) as Markdown; `evaluation`: evaluate's metrics.
    Every value from the manifest or the data is escaped, so the text reads the same in any renderer."""
    parts = [f"# Model card: {esc(card.get('name') or 'RetinaLens model')}", f"**Intended use.** {INTENDED_USE}",
             _details(card), _intended_use(), _training_data(card), _evaluation_data(evaluation),
             _metrics(card, evaluation), *_trust(card, evaluation), _bullets("Ethical considerations and limits", (*ETHICS, *LIMITS)),
             _bullets("Caveats and recommendations", RECOMMENDATIONS, escape=False),
             "*Sections after the model-card template of Mitchell et al. (2019), Model Cards for Model Reporting.*"]
    return "\n\n".join(parts) + "\n"


def card_html(markdown: str, heading_offset: int = 0) -> str:
    """Card Markdown as HTML (markdown-it-py, raw HTML off: everything is escaped), its headings moved
    `heading_offset` levels down to sit inside a page's own."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + heading_offset)}"
    return md.renderer.render(tokens, md.options, {})


def _details(card: dict[str, Any]) -> str:
    training, lineage = card.get("training") or {}, card.get("lineage") or {}
    backbone, head = card.get("backbone"), card.get("head")
    epochs = (f"; best epoch {training['best_epoch']} of {training.get('epochs_run')}"
              if training.get("best_epoch") and (training.get("epochs_run") or 0) > 1 else "")
    parent = (lineage.get("parent") or {}).get("path")
    rows = [
        ("Task", card.get("task")), ("Classes", ", ".join(card.get("classes") or [])),
        ("Backbone", backbone_text(backbone) if isinstance(backbone, dict) else backbone),
        ("Head", head_text(head) if isinstance(head, dict) else head), ("Feature precision", card.get("precision")),
        ("Ensemble", _ensemble_text(card.get("ensemble"))),
        ("Training", f"{training['mode']}{epochs}" if training.get("mode") else None),
        ("Version", f"{lineage.get('version', 1)}" + (f", retrained from {Path(parent).name}" if parent else "")),
        ("Created", card.get("created")), ("Library versions", describe(card.get("library_versions"))),
    ]
    referral = card.get("referral") or {}
    levels = _table(("Class", "Referral level"), [(c, referral.get(c) or "none") for c in card.get("classes") or []])
    version = _version_line(card)
    return "## Model details\n\n" + _items(rows) + (f"\n{version}" if version else "") + "\n\n" + levels


def _intended_use() -> str:
    return ("## Intended use\n\n" + INTENDED_USE + "\n\nOut of scope:\n\n"
            + "\n".join(f"- {use}" for use in OUT_OF_SCOPE))


def _training_data(card: dict[str, Any]) -> str:
    data = card.get("training_data") or {}
    splits = data.get("splits") or {}
    named = ordered_splits(splits)
    if not named:
        return "## Training data\n\n" + (_items([("Data set", data.get("dataset"))]) or "Not recorded for this model.")
    classes = sorted({c for _, v in named for c in v.get("per_class", {})})
    table = _table(("Split", "Images", "Patients", *classes),
                   [(n, v.get("n_images"), v.get("n_patients"), *(v.get("per_class", {}).get(c, 0) for c in classes))
                    for n, v in named])
    removed = splits.get("removed") or {}
    reasons = ", ".join(f"{r}: {n}" for r, n in (removed.get("reasons") or {}).items())
    rows = [("Data set", data.get("dataset")), ("Layout", data.get("layout")),
            ("Images / patients", split_counts(splits)),
            ("Removed to keep the splits disjoint", f"{removed.get('n', 0)} images" + (f" ({reasons})" if reasons else "")),
            ("Unreadable images skipped", data.get("extract_failures"))]
    return ("## Training data\n\n" + _items(rows) + "\n\nPatients are disjoint between splits; the model is chosen "
            "on validation, never on test.\n\n" + table)


def _evaluation_data(ev: dict[str, Any] | None) -> str:
    if not ev:
        return ("## Evaluation data\n\nNot evaluated on held-out data yet: `retinalens evaluate BUNDLE DATA` writes "
                "its results into this card. Until then only the validation figures below exist.")
    data = ev.get("data") or {}
    per_class = ", ".join(f"{c} {n}" for c, n in (data.get("per_class") or {}).items())
    rows = [("Data set", dataset_name(data["path"]) if data.get("path") else None),
            ("Split", data.get("split") or "all images"),
            ("Images / patients", f"{ev.get('n_images')} / {ev.get('n_patients')}"), ("Per class", per_class or None),
            ("Not evaluated (unreadable or unlabelled)", len(ev.get("failures") or []) or None)]
    text = "## Evaluation data\n\n" + _items(rows)
    if ev.get("overlap_with_training"):
        text += (f"\n\n**Warning:** {ev['overlap_with_training']} of these images were in the model's training or "
                 "validation data, so these results are optimistic.")
    return text


def _metrics(card: dict[str, Any], ev: dict[str, Any] | None) -> str:
    val, base = card.get("validation") or {}, card.get("baseline_logistic_regression") or {}
    rows = [("Images / patients", f"{val.get('n_images')} / {val.get('n_patients')}"),
            ("Accuracy", fmt(val.get("accuracy"), val.get("accuracy_ci"))),
            ("ROC AUC, macro one-vs-rest", fmt(val.get("roc_auc_macro"), None)),
            ("Loss (cross-entropy)", fmt(val.get("loss"), None)),
            ("Logistic-regression baseline accuracy", fmt(base.get("val_acc"), None))]
    chosen = (card.get("head_selection") or {}).get("chosen")
    text = ("## Metrics\n\nValues with 95% confidence intervals from a patient-clustered bootstrap (all images of a "
            "patient resampled together).\n\n### Validation\n\n" + _table(("Metric", "Value (95% CI)"), rows)
            + (f"\n\nHead chosen on {esc(val.get('source') or 'validation')}: {esc(chosen)}." if chosen else ""))
    if not ev:
        return text
    rows = [("Accuracy", fmt(ev.get("accuracy"), ev.get("accuracy_ci"))),
            ("ROC AUC, macro one-vs-rest", fmt(ev.get("roc_auc_macro"), ev.get("roc_auc_macro_ci")))]
    if "quadratic_kappa" in ev:
        rows.append(("Quadratic weighted kappa", fmt(ev["quadratic_kappa"], ev.get("quadratic_kappa_ci"))))
    urgent = ev.get("urgent_referral")
    if urgent:
        label = f"{referral_label(urgent['positive_classes'], card.get('referral'))} " \
                f"({' + '.join(urgent['positive_classes'])}, score ≥ {urgent['threshold']:g})"
        rows += [(f"{label}: {m}", fmt(urgent.get(key), urgent.get(f"{key}_ci")))
                 for m, key in (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ROC AUC", "auc"))]
    per_class = _table(("Class", "Support", "Sensitivity", "Specificity", "ROC AUC"),
                       [(c, m.get("support"), *(fmt(m.get(k), m.get(f"{k}_ci")) for k in ("sensitivity", "specificity", "auc")))
                        for c, m in (ev.get("per_class") or {}).items()])
    ci = ev.get("ci") or {}
    note = f"\n\n{ci['n_boot']} bootstrap resamples, seed {ci['seed']}." if ci.get("n_boot") else ""
    return text + "\n\n### Evaluation\n\n" + _table(("Metric", "Value (95% CI)"), rows) + "\n\n" + per_class + note


def _trust(card: dict[str, Any], ev: dict[str, Any] | None) -> list[str]:
    """Operating point, calibration and quality gate: each as fitted on validation, then as it held on
    the evaluated data."""
    ref, cal, gate = (card.get("thresholds") or {}).get("referral"), card.get("calibration"), card.get("quality_gate")
    op, ec, eg = ((ev or {}).get(k) for k in ("operating_point", "calibration", "gate"))
    positives = (ref or {}).get("positive_classes") or []
    reasons = ", ".join(dict.fromkeys(str(c.get("reason")).replace("_", " ") for c in (gate or {}).get("checks") or []))
    val = (gate or {}).get("validation") or {}
    why = ", ".join(f"{r}: {n}" for r, n in ((eg or {}).get("reasons") or {}).items())
    sections = [
        ("Operating point", "None recorded: the referral score is read at 0.5.",
         ref and (f"{referral_label(positives, card.get('referral'))}: refer when P({esc(' + '.join(positives))}) ≥ "
                  f"{ref['threshold']:.3f}, the threshold chosen on validation for a sensitivity of at least "
                  f"{ref['target_sensitivity']:g} (validation sensitivity {fmt(ref.get('val_sensitivity'), None)}, "
                  f"specificity {fmt(ref.get('val_specificity'), None)})."),
         op and (f"sensitivity {fmt(op.get('sensitivity'), op.get('sensitivity_ci'))}, "
                 f"specificity {fmt(op.get('specificity'), op.get('specificity_ci'))}.")),
        ("Calibration", "None: the probabilities are the head's own.",
         cal and (f"{esc(cal.get('method', 'temperature scaling')).capitalize()}, T = {cal['temperature']:.3f}, "
                  f"fitted on {esc(cal.get('fitted_on', 'validation'))} ({cal.get('n_images')} images): expected "
                  f"calibration error {fmt(cal.get('ece_before'), None)} before, {fmt(cal.get('ece_after'), None)} after."),
         ec and (f"expected calibration error {fmt(ec.get('ece_before'), None)} before, "
                 f"{fmt(ec.get('ece_after'), None)} after.")),
        ("Quality gate", "None: every image is classified, whatever its quality.",
         gate and (f"Images are refused, not classified, when they are {esc(reasons)}; the thresholds were fitted on "
                   f"the training and validation images. Validation: {val.get('n_rejected')} of "
                   f"{val.get('n_checked')} refused."),
         eg and f"{eg.get('n_rejected')} of {eg.get('n_checked')} refused" + (f" ({esc(why)})." if why else ".")),
    ]
    return [_fitted_and_evaluated(*section) for section in sections]


def _fitted_and_evaluated(title: str, absent: str, fitted: str | None, evaluated: str | None) -> str:
    """A trust section: what the bundle fitted on validation, then how it held on the evaluated data."""
    if not fitted:
        return f"## {title}\n\n{absent}"
    return f"## {title}\n\n{fitted}" + (f"\n\nOn the evaluation data: {evaluated}" if evaluated else "")


# -- pieces -----------------------------------------------------------------------------------------


def referral_label(positive_classes: Sequence[str], referral: dict[str, str | None] | None) -> str:
    """The referral decision on `positive_classes`, named from the bundle's referral levels: "Urgent
    referral" only when every one of them is urgent (DR grade 2 is routine, 3 and 4 urgent)."""
    levels = {(referral or {}).get(c) for c in positive_classes}
    named = [lv for lv in REFERRAL_LEVELS if lv in levels]
    if not named or None in levels:
        return "Referral"
    return f"{named[0].capitalize()} referral" if len(named) == 1 else f"Referral ({' or '.join(named)})"


def dataset_name(path: str | Path) -> str:
    """A data set's name, not where it lay: its folder's name (a labels CSV: folder/file)."""
    p = Path(str(path))
    return f"{p.parent.name}/{p.name}" if p.suffix.lower() == ".csv" else p.name


def fmt(value: float | None, ci: Sequence[float] | None) -> str:
    """A metric to three decimals, with its confidence interval when there is one."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def ordered_splits(splits: dict) -> list[tuple[str, dict]]:
    """train, val, test first (the manifest's JSON keys come sorted), then any other split."""
    rank = {"train": 0, "val": 1, "test": 2}
    return sorted(((k, v) for k, v in splits.items() if k != "removed" and isinstance(v, dict) and "n_images" in v),
                  key=lambda kv: (rank.get(kv[0], 3), kv[0]))


def split_counts(splits: dict | None) -> str | None:
    if not splits:
        return None
    return ", ".join(f"{k} {v['n_images']} / {v['n_patients']}" for k, v in ordered_splits(splits)) or None


def backbone_text(b: dict) -> str:
    pp = b.get("preprocessing") or {}
    size, resize, view = pp.get("size"), pp.get("resize", "squash"), pp.get("view", "whole")
    return (f"{b.get('name')}" + (f", {size} px" if size else "")
            + (f", input {resize} (the squash and the retinal band's tiles), view {view}" if resize == "squash+band" else "")
            + (f", weights: {b['weights_source']}" if b.get("weights_source") else ""))


def _view_text(member: dict) -> str:
    """' view band': the part of the two-view input a member reads (nothing for the whole input)."""
    view = ((member.get("backbone") or {}).get("preprocessing") or {}).get("view", "whole")
    return "" if view == "whole" else f" view {view}"


def _ensemble_text(ensemble: dict | None) -> str | None:
    """'mean of 3 networks (a, b, c) over views identity, flip', or None for one network seen once."""
    if not ensemble:
        return None
    members = ensemble.get("members") or []
    return (f"mean of {len(members)} networks ({', '.join(members)})" if members else "one network") + \
        f" over views {', '.join(ensemble.get('views') or ['identity'])}"


def head_text(head: dict) -> str:
    rest = {k: v for k, v in head.items() if k != "kind"}
    return f"{head.get('kind', '?')}" + (f" ({describe(rest)})" if rest else "")


def describe(value: object) -> str:
    """Nested manifest values as one readable line."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(describe(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


# Markdown's punctuation that could start markup inside a line; "_" only where it can open or close
# emphasis (efficientnet_lite0 stays readable), "&" because it starts an entity.
_MARKUP = re.compile(r"[\\`*\[\]<>|&~!#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def esc(value: object) -> str:
    """A value as literal Markdown text: one line, every markup character backslash-escaped."""
    return _MARKUP.sub(lambda m: "\\" + m.group(0), " ".join(str(value).split()))


def _version_line(card: dict[str, Any]) -> str:
    sha = (card.get("version") or {}).get("manifest_sha256")
    return f"- **Manifest sha256:** {sha}" if sha else ""


def _items(rows: Sequence[tuple[str, object]]) -> str:
    return "\n".join(f"- **{label}:** {esc(value)}" for label, value in rows if value not in (None, "", "None"))


def _bullets(title: str, lines: Sequence[str], escape: bool = True) -> str:
    return f"## {title}\n\n" + "\n".join(f"- {esc(line) if escape else line}" for line in lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _digest(document: dict[str, Any]) -> str | None:
    """The digest of a manifest as RetinaLens reads one; None for a partial one JSON cannot hold."""
    try:
        return manifest_digest(document) if document else None
    except (TypeError, ValueError):
        return None
