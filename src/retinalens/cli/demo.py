"""`retinalens demo`: the whole pipeline, offline, on a small bundled sample of real OCT scans.

The sample is data only (retinalens/demo); this runner is the CLI's: it trains as `retinalens train`
does and prints what `evaluate` and `predict` print (cli/output.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._console import console
from ..demo import DEMO_DATA
from .output import predictions_csv, print_metrics, print_predictions

DEMO_OUT = Path("demo-out")  # `retinalens demo --out`'s default


def run_demo(out: str | Path = DEMO_OUT, *, progress: bool = True, epochs: int | None = None) -> dict[str, Any]:
    """extract -> train -> evaluate -> predict on the bundled sample; returns the test metrics.
    `epochs`: None is train's default (MODE_EPOCHS)."""
    from .._io import atomic_write_bytes
    from ..evaluate.run import evaluate_bundle
    from ..predict.model import Model
    from ..train.pipeline import build_run_config, train_bundle

    out = Path(out).expanduser()
    say = console()
    say.rule("RetinaLens demo: OCT B-scans (Kermany et al., Cell 2018; CC BY 4.0)")
    start = time.perf_counter()
    cfg = build_run_config(DEMO_DATA, cache=out / "cache", epochs=epochs)
    bundle = train_bundle(cfg, out / "bundle", progress=progress)
    model = Model(bundle)
    metrics = evaluate_bundle(bundle, DEMO_DATA, split="test", cache=out / "cache", json_path=out / "metrics.json",
                              report_path=out / "report.html", progress=progress)
    print_metrics(metrics)
    examples = sorted((DEMO_DATA / "test").glob("*/*.jpeg"))[::8]
    results = model.predict_many(examples)
    print_predictions(results, model.classes)
    atomic_write_bytes(out / "predictions.csv", predictions_csv(results, model.classes).encode())
    say.rule()
    say.print(f"report:  {out / 'report.html'}\nbundle:  {bundle.path}\nmetrics: {out / 'metrics.json'}")
    u = metrics["urgent_referral"]
    say.print(f"[bold]test accuracy {metrics['accuracy']:.3f}[/] on {metrics['n_images']} held-out scans; "
              f"urgent-referral sensitivity {u['sensitivity']:.3f}, specificity {u['specificity']:.3f}; "
              f"{time.perf_counter() - start:.0f} s")
    return metrics
