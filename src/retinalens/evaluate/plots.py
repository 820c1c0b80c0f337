"""The evaluation's figures: confusion matrix, ROC curves, reliability diagram and training curves.

Matplotlib is used through its object-oriented API (Figure + Agg), never pyplot, so no global
backend or figure state is touched. It is imported inside each figure function: the web app imports
the report module (for its intended-use text), and that should not load matplotlib.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retinalens._io import atomic_write_bytes
from retinalens.errors import RetinaLensError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
MIN_BIN_IMAGES = 5  # a reliability bin with fewer images is greyed: its accuracy is one or two coin flips
FEW_COLOUR = "lightgrey"
OVERFIT_RATIO = 0.5  # training loss below half the validation loss at the kept epoch: "far below"


def plot_training_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Loss and accuracy per epoch (train solid, validation dashed) from the trainer's CSV log."""
    out = Path(png_path)
    atomic_write_bytes(out, png_bytes(training_figure(read_curves(csv_path))))
    return out


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: the PNG stays byte-identical across runs and carries no URL.
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def _label(text: str) -> str:
    """Matplotlib reads text between two '$' as mathtext; class names are plain text."""
    return text.replace("$", r"\$")


def confusion_figure(confusion: Sequence[Sequence[int]], names: Sequence[str]) -> Figure:
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


def roc_figure(curves: dict, metrics: dict, referral: str = "Referral") -> Figure:
    """`curves` from roc_curves, `metrics` from classification_metrics (for the AUCs in the legend),
    `referral` the name of the referral decision (bundle/card.py referral_label)."""
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
        label = _label(f"{referral}: " + " + ".join(urgent["positive_classes"])) + suffix
        ax.plot(curves["urgent"]["fpr"], curves["urgent"]["tpr"], "--", color="black", lw=2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("Sensitivity (true positive rate)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return figure


def reliability_figure(panels: list[tuple[str, dict]]) -> Figure:
    """One reliability diagram per (title, bins) panel, side by side. Each bin is labelled with its
    image count; a bin of fewer than MIN_BIN_IMAGES images is drawn grey, its accuracy mostly chance."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    figure = Figure(figsize=(4.2 * len(panels), 4.0), layout="constrained")
    for ax, (label, r) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        bins = len(r["count"])
        centres = (np.arange(bins) + 0.5) / bins
        filled = [i for i, n in enumerate(r["count"]) if n]
        few = [r["count"][i] < MIN_BIN_IMAGES for i in filled]
        accuracy = [r["accuracy"][i] for i in filled]
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.bar(centres[filled], accuracy, width=1 / bins, edgecolor="black", alpha=0.7,
               color=[FEW_COLOUR if f else "C0" for f in few])
        # The bin's mean confidence as a bar on the same centre: its distance to the bar top is the gap.
        ax.scatter(centres[filled], [r["confidence"][i] for i in filled], marker="_", s=200, linewidths=2.5,
                   color=["grey" if f else "C3" for f in few], zorder=3)
        for x, i, f in zip(centres[filled], filled, few):  # at the foot of the bar: clear of legend and marks
            ax.text(x, 0.015, str(r["count"][i]), ha="center", fontsize="x-small", color="dimgrey" if f else "black")
        # Drawn handles would take the first bin's colour, grey when it is a small bin.
        handles = [Line2D([], [], ls=":", color="grey", label="perfect calibration"),
                   Patch(facecolor="C0", alpha=0.7, edgecolor="black", label="accuracy"),
                   Line2D([], [], ls="", marker="_", ms=14, mew=2.5, color="C3", label="mean confidence")]
        if any(few):
            handles.append(Patch(facecolor=FEW_COLOUR, edgecolor="black", label=f"< {MIN_BIN_IMAGES} images"))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("Top-class probability (numbers: images per bin)")
        ax.set_ylabel("Accuracy")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, loc="upper left", fontsize="small")
    return figure


def read_curves(csv_path: str | Path) -> dict[str, np.ndarray]:
    """The trainer's per-epoch CSV log as one array per column."""
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


def training_figure(curves: dict[str, np.ndarray], best_epoch: int | None = None) -> Figure:
    """Loss and accuracy per epoch (train solid, validation dashed); `best_epoch`, the epoch whose
    weights the bundle kept, is marked on both."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9.0, 3.6), layout="constrained")
    for ax, metric, label in zip(figure.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy")):
        for split, style in (("train", "-"), ("val", "--")):
            ax.plot(curves["epoch"], curves[f"{split}_{metric}"], style, marker="o", ms=3, label=split)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="C2", ls=":", lw=2, label=f"best epoch {best_epoch} (kept)")
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def overfitting_note(curves: dict[str, np.ndarray], best_epoch: int | None = None) -> str | None:
    """A plain-language warning when the training loss at the kept epoch (the last one without
    `best_epoch`) is below OVERFIT_RATIO times the validation loss there; None otherwise."""
    epochs, train, val = curves["epoch"], curves["train_loss"], curves["val_loss"]
    both = np.flatnonzero(np.isfinite(train) & np.isfinite(val))
    if not both.size:
        return None
    at = np.flatnonzero(epochs == best_epoch) if best_epoch is not None else both[-1:]
    k = int(at[0]) if at.size and at[0] in both else int(both[-1])
    if not train[k] < OVERFIT_RATIO * val[k]:
        return None
    note = (f"Overfitting: at epoch {epochs[k]:g} the training loss ({train[k]:.3f}) is less than "
            f"{OVERFIT_RATIO:g} times the validation loss ({val[k]:.3f}). The model fits the images it learnt "
            "from far better than new ones, so expect new data to score nearer the validation and test figures "
            "than the training ones; more images, fewer epochs or stronger regularisation may help.")
    lowest, last = int(both[np.argmin(val[both])]), int(both[-1])
    if last > lowest and val[last] > val[lowest]:
        note += (f" The validation loss rose from {val[lowest]:.3f} (epoch {epochs[lowest]:g}) to {val[last]:.3f} "
                 f"(epoch {epochs[last]:g}).")
    return note + (f" (Rule: flagged when the training loss at the kept epoch is below {OVERFIT_RATIO:g} times "
                   "the validation loss.)")
