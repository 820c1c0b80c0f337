"""`retinalens retrain`: a candidate trained with clinicians' feedback, promoted only if not worse."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .._console import console, markup_safe


def retrain(
    bundle: Path = typer.Argument(..., help="The model bundle in use (its data, config and splits are reused)."),
    feedback: str = typer.Option(..., "--feedback", help="Feedback database: an SQLite file or a SQLAlchemy URL."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the promoted bundle goes (a rejected one: OUT.rejected)."),
    feedback_images: Optional[Path] = typer.Option(None, "--feedback-images", help="Folder of the feedback images "
                                                   "(default: images/ beside an SQLite file)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache root (default: the parent run's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Retrain on the parent's data plus confirmed feedback images that pass the quality gate."""
    from ..api import retrain as run_retrain

    r = run_retrain(bundle, feedback, out, images_dir=feedback_images, cache=cache, progress=not quiet)
    say = console()
    for split, pair in r["compared"].items():
        p, c = pair["parent"], pair["candidate"]
        say.print(f"{split}: parent accuracy {_fmt(p['accuracy'])}, candidate {_fmt(c['accuracy'])} "
                  f"({c['n_images']} images)")
    say.print(f"{r['feedback']['added']} feedback image(s) added, {len(r['feedback']['left_out'])} left out; "
              + (f"[green]promoted[/]: {markup_safe(r['bundle'])} (version {r['version']})" if r["promoted"] else
                 f"[yellow]not promoted[/] (worse on validation): kept at {markup_safe(r['bundle'])}"),
              highlight=False, soft_wrap=True)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
