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
    # The headline is the operating point the bundle refers at (fitted on training data for the target
    # sensitivity), not the 0.5 cut of the metrics table: what a user of the default really gets.
    op, acc = metrics.get("operating_point"), metrics["accuracy_ci"]
    referral = (f"urgent referral at the threshold {op['threshold']:.3f} fitted for sensitivity "
                f"{op['target_sensitivity']:.2f}: sensitivity {op['sensitivity']:.3f}, specificity "
                f"{op['specificity']:.3f}; " if op else "")
    drusen = metrics["per_class"].get("DRUSEN", {}).get("recall")
    say.print(f"[bold]test accuracy {metrics['accuracy']:.3f}[/] ({acc[0]:.3f}-{acc[1]:.3f}) on {metrics['n_images']} "
              f"held-out scans; {referral}" + (f"DRUSEN recall {drusen:.3f}; " if drusen is not None else "")
              + f"{time.perf_counter() - start:.0f} s", highlight=False)
    return metrics
