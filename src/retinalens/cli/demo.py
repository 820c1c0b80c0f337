"""`retinalens demo`: the whole pipeline, offline, on a small bundled sample of real OCT scans.

The work is retinalens.demo's (api.py); this runner prints what `evaluate` and `predict` print
(cli/output.py) and where everything went.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._console import console, markup_safe
from ..config import DEMO_OUT
from .output import print_metrics, print_predictions


def run_demo(out: str | Path = DEMO_OUT, *, progress: bool = True, epochs: int | None = None) -> dict[str, Any]:
    """extract -> train -> evaluate -> predict on the bundled sample, printed; returns the test metrics.
    `epochs`: None is train's default (MODE_EPOCHS)."""
    from ..api import demo

    say = console()
    say.rule("RetinaLens demo: OCT B-scans (Kermany et al., Cell 2018; CC BY 4.0)")
    start = time.perf_counter()
    run = demo(out, epochs=epochs, progress=progress)
    metrics = run.metrics
    print_metrics(metrics)
    print_predictions(run.predictions, run.bundle.classes)
    say.rule()
    say.print(f"report:  {markup_safe(run.out / 'report.html')}\nbundle:  {markup_safe(run.bundle.path)}\n"
              f"metrics: {markup_safe(run.out / 'metrics.json')}\npredictions: {markup_safe(run.out / 'predictions.csv')}",
              highlight=False)
    u = metrics["urgent_referral"]
    say.print(f"[bold]test accuracy {metrics['accuracy']:.3f}[/] on {metrics['n_images']} held-out scans; "
              f"urgent-referral sensitivity {u['sensitivity']:.3f}, specificity {u['specificity']:.3f}; "
              f"{time.perf_counter() - start:.0f} s")
    return metrics
