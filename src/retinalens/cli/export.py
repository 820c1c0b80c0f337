"""`retinalens export BUNDLE --format onnx|torchscript|coreml|tflite [--quantize int8-weights|fp16|int8] [--out FILE]`."""

from __future__ import annotations

from pathlib import Path

import typer

from .._console import console, markup_safe


def export(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    fmt: str = typer.Option("onnx", "--format", "-f",
                            help="onnx | torchscript | coreml (extra 'coreml') | tflite (extra 'tflite', for phones)."),
    quantize: str = typer.Option("none", "--quantize",
                                 help="tflite only: none | int8-weights (int8 storage, float maths) | fp16 | "
                                      "int8 (dynamic range; loses accuracy on this model)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="File to write (a .mlpackage folder for coreml); "
                                       "default: BUNDLE's name with the format's suffix, in the current folder."),
) -> None:
    """Export the model as one graph for other runtimes (ONNX, TorchScript, Core ML).

    Backbone + head + preprocessing in one graph (uint8 pixels in, probabilities and pooled features out,
    dynamic batch), with a FILE.json sidecar holding classes, preprocessing and provenance."""
    from ..api import export as run_export
    from ..export.formats import sidecar_path

    path = run_export(bundle, fmt, out, quantize=quantize)
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    console().print(f"[green]exported:[/] {markup_safe(path)} ({size / 1e6:.1f} MB); "
                    f"metadata: {markup_safe(sidecar_path(path))}", highlight=False, soft_wrap=True)
