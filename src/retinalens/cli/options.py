"""The commands' options whose default lives in a dataclass of retinalens/config.py, and the options
several commands share (declared once).

`config_option(ExtractConfig, "batch_size")` is `--batch-size` with ExtractConfig.batch_size's default:
the CLI writes no default of its own, so `--help` shows the value the Python API uses.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

import typer

from ..config import EngineConfig, ExtractConfig, default


def config_option(cls: type, name: str, *short: str, help: str | None = None) -> Any:  # noqa: A002 (typer's name)
    """`--name` (underscores as dashes, plus any `short` names) defaulting to dataclass `cls`'s field `name`."""
    return typer.Option(default(cls, name), f"--{name.replace('_', '-')}", *short, help=help)


F = TypeVar("F", bound=Callable[..., Any])


def help_text(doc: str | None) -> str:
    """A docstring as typer help: its paragraphs, each on one line. Typer's rich help keeps a docstring's
    line breaks in the command list and in the paragraphs after the first, where rich then wraps the
    lines again at the terminal's width: every source line would end in a ragged break."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n"))


def add_command(app: typer.Typer, fn: F, name: str | None = None) -> F:
    """Register `fn` as a command of `app`, its docstring as the help (see help_text)."""
    app.command(name, help=help_text(fn.__doc__))(fn)
    return fn


BackboneOpt = config_option(ExtractConfig, "backbone", "-b", help="Registry name or any timm model name.")
WeightsOpt = typer.Option(None, "--weights", help="Local weights file (.safetensors/.pth) for the backbone.")
RandomOpt = typer.Option(not default(ExtractConfig, "pretrained"), "--random-weights",
                         help="Random backbone weights (for timing only).")
CacheOpt = typer.Option(None, "--cache", help="Feature cache root (default $RETINALENS_CACHE or ~/.cache/retinalens/features).")
PrecisionOpt = config_option(ExtractConfig, "precision",
                             help="auto | fp32 | bf16 (auto: bf16 where the hardware has it).")
WorkersOpt = config_option(ExtractConfig, "workers",
                           help="Decoding processes (0: threads between backbone calls, best on few cores).")
PatientOpt = typer.Option(None, "--patient-regex", help="Regex with a (?P<patient>...) group, matched on file names.")
ImagesOpt = typer.Option(None, "--images", help="Folder of the images a labels CSV names.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
EngineOpt = config_option(EngineConfig, "engine", help="local (this process) | ray (a Ray Data pipeline: pip install "
                          "'retinalens[distributed]').")
AddressOpt = typer.Option(default(EngineConfig, "address"), "--address",
                          help="Ray cluster to join (auto, or host:port); default $RAY_ADDRESS or a new local instance.")
RayWorkersOpt = typer.Option(default(EngineConfig, "workers"), "--ray-workers",
                             help="Ray: model actors, one model each (0: up to the cluster's GPUs, else CPUs).")
