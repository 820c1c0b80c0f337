"""`retinalens report`: the full self-contained HTML report of a bundle on a labelled dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from .._console import console, markup_safe
from ..config import EvaluateConfig, VolumeConfig
from .options import config_option


def report(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    data: Path = typer.Argument(..., help="Dataset root (its --split is used) or a class-folder tree (used whole)."),
    out: Path = typer.Option(..., "--out", "-o", help="The HTML file to write."),
    split: str = config_option(EvaluateConfig, "split", help="The split of a dataset root to evaluate on."),
    n_boot: int = config_option(EvaluateConfig, "n_boot", help="Bootstrap resamples for the confidence intervals."),
    cache: Path | None = typer.Option(None, "--cache", help="Feature cache root (as for evaluate)."),
    patient_regex: str | None = typer.Option(None, "--patient-regex", help="Regex with a (?P<patient>...) group."),
    images: Path | None = typer.Option(None, "--images", help="Folder of the images a labels CSV names."),
    volumes: bool = typer.Option(False, "--volumes", help="Also per OCT volume, with strips of B-scans (as for "
                                 "evaluate)."),
    group_by: str = config_option(VolumeConfig, "group_by", help="--volumes: patient | folder | series."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """The full HTML report of a bundle on a labelled dataset: one self-contained file.

    Data, curves, confusion matrix, ROC, calibration, operating point, gate, misclassified images with
    heat maps, OCT volumes with --volumes, and a model card (the same report as `evaluate --report`)."""
    from ..api import report as run_report

    m = run_report(bundle, data, out, split=split, cache=cache, n_boot=n_boot, progress=not quiet,
                   patient_regex=patient_regex, images_dir=images,
                   volumes=VolumeConfig(group_by=group_by) if volumes else None)
    console().print(f"{m['n_images']} images, accuracy {m['accuracy']:.3f}; report: {markup_safe(out)}",
                    highlight=False, soft_wrap=True)
