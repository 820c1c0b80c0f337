"""`retinalens demo`: the whole pipeline, offline, on a small bundled sample of real OCT scans."""

from __future__ import annotations

import time
from pathlib import Path

from .._console import console

DEMO_DATA = Path(__file__).parent / "data"


def run_demo(out: str | Path = "demo-out", *, progress: bool = True, epochs: int = 60) -> dict:
    """extract -> train -> evaluate -> predict on the bundled sample; returns the test metrics."""
    from ..cli.main import print_metrics, print_predictions, predictions_csv
    from .._io import atomic_write_bytes
    from ..predict.model import Model
    from ..train.pipeline import ExtractConfig, RunConfig, train_bundle

    out = Path(out).expanduser()
    say = console()
    say.rule("RetinaLens demo: OCT B-scans (Kermany et al., Cell 2018; CC BY 4.0)")
    start = time.perf_counter()
    cfg = RunConfig(data=str(DEMO_DATA), extract=ExtractConfig(cache=str(out / "cache")))
    cfg.train.epochs = epochs
    bundle = train_bundle(cfg, out / "bundle", progress=progress)
    model = Model(bundle)
    metrics = model.evaluate(DEMO_DATA, split="test", cache=out / "cache", json_path=out / "metrics.json",
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
