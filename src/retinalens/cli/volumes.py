"""`predict --volumes`: one answer per OCT volume, printed after its B-scans' rows (predict/volume.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._console import console, markup_safe, printable
from ..errors import RetinaLensError
from ..predict.table import volumes_csv, yes_no
from .output import ElidedStart, print_gate_summary, print_predictions

if TYPE_CHECKING:
    from ..predict.model import Model


def has_multi_frame(inputs: list[str]) -> bool:
    """Whether a file named on the command line is a multi-frame file (a volume by itself), from the
    headers alone: the volume path decodes its frames once, afterwards."""
    from ..data.volumes import frame_count

    try:
        return any(Path(i).is_file() and frame_count(Path(i)) > 1 for i in inputs)
    except RetinaLensError:
        return True  # an unreadable multi-frame file: the volume path reports it with the other inputs


def predict_volumes_command(model: Model, inputs: list[str], *, json_out: Path | None, csv_out: Path | None,
                            heatmaps: Path | None, progress: bool, **options: Any) -> None:
    from ..api import predict_volumes

    results = predict_volumes(model, inputs, json_path=json_out, csv_path=csv_out, heatmaps_dir=heatmaps,
                              progress=progress, **options)
    volumes = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r] + [s for v in volumes for s in v["slices"] if "error" in s]
    if sys.stdout.isatty():
        print_predictions([s for v in volumes for s in v["slices"]], model.classes)
        print_volumes(volumes, model.classes)
    else:  # piped or redirected: the volume rows as CSV (the B-scans' rows are in --json)
        sys.stdout.write(volumes_csv(results, model.classes))
    for r in failed:
        console().print(f"[red]failed[/] {markup_safe(r['error'])}", highlight=False, soft_wrap=True)
    print_gate_summary([s for v in volumes for s in v["slices"]], gated=model.gate is not None)
    if volumes:
        console().print(f"{len(volumes)} volume(s), grouped by {', '.join(sorted({v['grouping'] for v in volumes}))}; "
                        f"rule: {volumes[0]['rule']}", highlight=False, soft_wrap=True)
    if not any(s for v in volumes for s in v["slices"] if "error" not in s):
        raise RetinaLensError(f"none of the {len(failed)} input(s) could be read")


def print_volumes(volumes: list[dict[str, Any]], classes: list[str]) -> None:
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False, title="volumes", title_justify="left")
    for col in ("volume", "slices", "label", "referral", "refer", "gate", "worst", *classes):
        t.add_column(col)
    for v in volumes:
        t.add_row(ElidedStart(printable(v["volume"])), f"{v['n_gradable']}/{v['n_slices']}", v["label"] or "-",
                  v["referral"] or "", yes_no(v["refer"]), "ok" if v["gate"]["ok"] else "ungradable",
                  " ".join(map(str, v["suspicious"])), *(f"{v['probabilities'].get(c, 0):.3f}" for c in classes))
    console(stdout=True).print(t, highlight=False)
