"""`retinalens prepare ...`: turn raw photographs into a dataset RetinaLens trains on.

A Typer sub-app, registered in the main CLI as `prepare`. Imports of the work itself stay inside the
commands, so that importing this module (and `retinalens --help`) stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .._console import console, markup_safe

prepare_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                          help="Prepare raw images for training (crop, square, resize).")


@prepare_app.callback()
def _group() -> None:
    """Prepare raw images for training (crop, square, resize)."""
    # A callback keeps `fundus` a named subcommand even while it is the only one.


@prepare_app.command("fundus")
def fundus(
    src: Path = typer.Argument(..., help="Folder of fundus photographs (recursive) or a labels CSV (image,level)."),
    dst: Path = typer.Argument(..., help="Output folder (must not be inside SRC). Rerunning continues where it stopped."),
    size: int = typer.Option(256, "--size", help="Side of the square output images, in pixels."),
    contrast: bool = typer.Option(False, "--contrast", help="Subtract the local average colour (Graham, Kaggle 2015)."),
    fmt: str = typer.Option("jpeg", "--format", help="jpeg (quality 95) | png."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes (default: every core)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Crop each photo to its circular field of view, pad to a square, resize; drop black or unusable ones."""
    from ..api import prepare_fundus

    out = console()
    # Bad input raises RetinaLensError, which the main CLI's entry point turns into one line, exit 2.
    report = prepare_fundus(src, dst, size=size, contrast=contrast, workers=workers, progress=not quiet, fmt=fmt)
    for path, reason in report.dropped:
        out.print(f"[yellow]dropped[/] {markup_safe(path)}: {markup_safe(reason)}", highlight=False, soft_wrap=True)
    out.print(f"prepared {report.kept} images in {markup_safe(dst)} ({report.prepared} new, "
              f"{report.skipped_existing} already there), dropped {len(report.dropped)}; "
              f"report: {markup_safe(report.report_path)}", highlight=False, soft_wrap=True)
