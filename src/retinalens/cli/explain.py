"""`retinalens explain`: Grad-CAM heat-map overlays (PNG) for images, folders or URLs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import typer

from .._console import console

_SAFE = re.compile(r"[^\w.-]+")  # what may stay in a file name built from an input name or a class
NAME_MAX = 255  # bytes in a file name, on every common file system


def explain(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders or http(s) URLs."),
    class_name: str | None = typer.Option(None, "--class", help="Explain this class (default: the predicted one)."),
    out: Path = typer.Option(Path("heatmaps"), "--out", "-o", help="Folder for the overlay PNGs."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per Grad-CAM pass."),
) -> None:
    """Heat maps of where the model found its evidence, overlaid on each image (Grad-CAM)."""
    from .._io import atomic_write_bytes
    from ..errors import RetinaLensError
    from ..explain import Explainer
    from ..predict.model import load

    model = load(bundle)
    used: set[str] = set()
    failed = done = 0
    with Explainer(model) as ex:
        if class_name is not None:
            ex.class_index(class_name)  # an unknown class fails before any image is read
        for result in ex.explain_many(inputs, class_name, batch_size=batch_size):
            if isinstance(result, dict):
                console().print(f"[red]failed[/] {result['error']}", highlight=False, soft_wrap=True)
                failed += 1
                continue
            png = out / _png_name(result.input, result.class_name, used)
            atomic_write_bytes(png, result.overlay_png())
            done += 1
            typer.echo(f"{result.input} -> {png} (predicted {result.label} "
                       f"{result.probabilities[result.label]:.2f}; heat map of {result.class_name})")
    if failed and not done:
        raise RetinaLensError(f"none of the {failed} input(s) could be read")


def _png_name(name: str, class_name: str, used: set[str]) -> str:
    """`scan.jpeg` -> `scan.CNV.png`; a name already taken in this run gets `-2`, `-3`, ...
    At most NAME_MAX bytes: a long stem is cut and given a hash of the whole name, so that two long
    names that share their first 200 bytes still get two files."""
    stem = _SAFE.sub("_", Path(name.split("?")[0].rstrip("/")).stem) or "image"
    label = _cut(_SAFE.sub("_", class_name), 64)
    room = NAME_MAX - len(f".{label}-999999.png".encode())
    if len(stem.encode()) > room:
        stem = f"{_cut(stem, room - 9)}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    base = f"{stem}.{label}"
    candidate, n = f"{base}.png", 1
    while candidate in used:
        n += 1
        candidate = f"{base}-{n}.png"
    used.add(candidate)
    return candidate


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, never inside a character."""
    return text.encode()[:limit].decode(errors="ignore")
