"""`retinalens explain`: Grad-CAM heat-map overlays (PNG) for images, folders or URLs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .._console import console, markup_safe
from ..config import EXPLAIN_OUT


def explain(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or http(s) URLs."),
    class_name: str | None = typer.Option(None, "--class", help="Explain this class (default: the predicted one)."),
    out: Path = typer.Option(Path(EXPLAIN_OUT), "--out", "-o", help="Folder for the overlay PNGs."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per Grad-CAM pass."),
) -> None:
    """Heat maps of where the model found its evidence, overlaid on each image (Grad-CAM)."""
    from ..api import explain as run_explain

    def show(r: dict[str, Any]) -> None:  # each line as its image is done: a big folder takes minutes
        if "error" in r:
            console().print(f"[red]failed[/] {markup_safe(r['error'])}", highlight=False, soft_wrap=True)
        elif "ungradable" in r:  # the quality gate's refusal, as predict gives it: no class, no heat map
            console().print(f"[yellow]skipped[/] {markup_safe(r['input'])}: ungradable ({r['ungradable']}), "
                            "no heat map", highlight=False, soft_wrap=True)
        else:
            console(stdout=True).print(f"{markup_safe(r['input'])} -> {markup_safe(r['png'])} (predicted {r['label']} "
                                       f"{r['probability']:.2f}; heat map of {r['class']})", highlight=False,
                                       soft_wrap=True)

    run_explain(bundle, inputs, class_name=class_name, out=out, batch_size=batch_size, on_result=show)
