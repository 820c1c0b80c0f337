"""Ensembles and test-time augmentation: what they gain in accuracy and what they cost in latency.

On ../shared/data/oct-kermany (train -> test, the same patient split for every row: the default
split seed), four bundles trained the way a user would (`retinalens.train`):

- single:       one network on the squashed scan (`--resize squash`; EfficientNet-Lite0, bottleneck
                head chosen out of fold), the OCT default until two-view replaced it;
- single+flip:  the same with `--tta flip`;
- ensemble:     `--ensemble efficientnet_lite0,efficientnet_lite1,mobilenet_v2` (one input, 224 px);
- ensemble+flip: the same with `--tta flip`;
- finetune+conv: `--ensemble efficientnet_lite0:finetune,efficientnet_lite0`, a fine-tuned Lite0 (classic
  recipe, 8 epochs) and the default head on frozen Lite0 features, both cross-validated on the same 5
  patient folds and averaged (the combination that won on bench_finetune_ablation's folds);
- finetune:     that fine-tune alone, `--mode finetune --cv 5 --epochs 8 --batch-size 32`;
- two-view:     the OCT default (`--resize auto`, here squash+band), a conv head on the squashed scan and
  one on its retinal band in 3 tiles (data/retinal_band.py), averaged (bench_views.py measured the pair
  on cached features);
- two-view-seeds: the same with `--seeds 0,1,2` (six heads);
- two-view+mobilenet_v2, two-view+lite1: the default with a second backbone (`--ensemble
  efficientnet_lite0,NAME`: four members, each backbone on each view, at Lite0's 224 px).

Every cross-validated row run with `single` on the same folds is compared with it by the rule fixed in
bench_views.py: it replaces the default when it beats it on at least 4 of 5 folds with a mean gain above
sd(gains)/sqrt(5) (`vs_single`; read from CV only, never test); run with `two-view` (today's default),
the same rule against it (`vs_default`).

The cross-validated rows also record their out-of-fold scores per fold (the ensemble's mean and each
member alone, on the same folds): the rule that compares them reads those, never test.

Each is evaluated on oct-kermany/test (`retinalens.evaluate`: accuracy with its patient-bootstrap CI,
urgent-referral sensitivity / specificity at the threshold fitted on validation, DRUSEN recall), and
timed on one scan at a time (`Model.predict`, median of 10 after a warm-up; a bundle of several members
also call by call, on 100 test scans, against the same call with its members in turn, and its parts on
one thread). Features are cached per
backbone, so a second run costs only the heads and the test-time passes.

`python benchmarks/bench_ensemble.py [--rows a,b] [--out FILE] [--merge]` prints the JSON (and writes it;
`--merge`: into benchmarks/results.json's "ensemble" section, row by row, keeping the rows not run);
`run(shared_data)` returns it (`make bench`, section "ensemble").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import retinalens

ROOT = Path(__file__).resolve().parents[1]
ENSEMBLE = "efficientnet_lite0,efficientnet_lite1,mobilenet_v2"
ROWS: dict[str, dict[str, Any]] = {
    "single": {"resize": "squash"},  # one network on the squash (the OCT default before two-view)
    "single+flip": {"tta": "flip"},
    "ensemble": {"ensemble": ENSEMBLE, "resize": "squash"},
    "ensemble+flip": {"ensemble": ENSEMBLE, "tta": "flip"},
    "finetune+conv": {"ensemble": "efficientnet_lite0:finetune,efficientnet_lite0"},
    "finetune": {"mode": "finetune", "cv": 5, "epochs": 8, "batch_size": 32},
    "two-view": {},  # the OCT default, --resize auto: squash+band
    "two-view-seeds": {"seeds": "0,1,2"},
    "two-view+mobilenet_v2": {"ensemble": "efficientnet_lite0,mobilenet_v2"},
    "two-view+lite1": {"ensemble": "efficientnet_lite0,efficientnet_lite1"},
}
LATENCY_RUNS = 10


def _latency_ms(bundle: Path, scan: Path) -> float:
    model = retinalens.load(bundle)
    model.predict(scan)  # warm-up: traces the backbones, opens the ONNX runtime where auto picks it
    times = []
    for _ in range(LATENCY_RUNS):
        t = time.perf_counter()
        model.predict(scan)
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 1)


def _members_beside_ms(bundle: Path, scans: list[Path]) -> dict[str, float] | None:
    """A bundle of several members: one scan through `predict` (its first member on the second core,
    Model._alone) against the same call with every member on the caller's thread, call by call on
    the same scans (bench_speed's _alternating: only calls made side by side compare). None: one member."""
    from bench_speed import _alternating, one_scan_parts_ms

    now, before = retinalens.load(bundle), retinalens.load(bundle)
    if len(now.bundle.members) < 2:
        return None
    turn = before.probabilities_and_pooled
    before.probabilities_and_pooled = lambda x, beside=None: turn(x)  # type: ignore[method-assign]  (no core beside)
    mine, theirs = iter(scans * 1000), iter(scans * 1000)  # each call the same scans in the same order
    calls = {"first_member_beside": lambda: now.predict(next(mine)), "members_in_turn": lambda: before.predict(next(theirs))}
    return _alternating(calls, n=2 * len(scans)) | {"scans": len(scans), "parts_one_thread_ms": one_scan_parts_ms(now.bundle, scans[0])}


def _cv_scores(bundle: Any) -> dict[str, Any]:
    """Out-of-fold accuracy per fold: the bundle's (an ensemble's: its members' mean) and each member's."""
    m = bundle.manifest
    if m.training.cv is None:
        return {}
    v = m.validation
    own = v if "fold_accuracy" in v else m.training.cv.candidate()
    out = {"cv": {"k": m.training.cv.k, "folds_digest": m.training.cv.digest, "fold_accuracy": own["fold_accuracy"],
                  "accuracy_mean": own["accuracy_mean"], "accuracy_sd": own["accuracy_sd"],
                  "baseline_accuracy_mean": m.training.baseline["val_acc"]}}
    if m.members:
        out["cv"]["members"] = [{"mode": e.details.get("mode"), "head": e.head.kind,
                                 "fold_accuracy": e.details["validation"].get("fold_accuracy")} for e in m.members]
    return out


def run(shared_data: Path, rows: list[str] | None = None) -> dict[str, Any]:
    data = Path(shared_data) / "oct-kermany"
    scan = min((data / "test" / "DME").glob("*.jpeg"))
    out: dict[str, Any] = {"data": str(data), "machine": f"{os.cpu_count()} cores", "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows or list(ROWS):
            t = time.perf_counter()
            bundle = retinalens.train(data, Path(tmp) / name.replace("+", "-"), **ROWS[name])
            train_s = time.perf_counter() - t
            m = retinalens.evaluate(bundle.path, data, n_boot=1000)
            op = m.get("operating_point") or {}
            out["rows"][name] = {
                "options": ROWS[name], "members": m["model"]["members"], "views": m["model"]["tta"],
                "val_accuracy": bundle.manifest.validation.get("accuracy"),
                "test_accuracy": m["accuracy"], "test_accuracy_ci": m["accuracy_ci"],
                "urgent_sensitivity": op.get("sensitivity"), "urgent_sensitivity_ci": op.get("sensitivity_ci"),
                "urgent_specificity": op.get("specificity"),
                "drusen_recall": m["per_class"]["DRUSEN"]["recall"], "n_test": m["n_images"],
                "train_s": round(train_s, 1), "latency_ms": _latency_ms(bundle.path, scan),
                "latency_alternating_ms": _members_beside_ms(bundle.path, sorted((data / "test").glob("*/*.jpeg"))[:100]),
                "load_average_1min_after": round(os.getloadavg()[0], 2),
            } | _cv_scores(bundle)
            print(json.dumps({name: out["rows"][name]}), file=sys.stderr, flush=True)
    for key, ref in (("vs_single", "single"), ("vs_default", "two-view")):
        for row in out["rows"].values():
            if ref in out["rows"] and row is not out["rows"][ref] and (rule := _rule(row, out["rows"][ref])):
                row[key] = rule
    return out


def _rule(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """bench_views.py's rule against the row `ref`, on the same folds (same digest), from CV only."""
    if "cv" not in row or "cv" not in ref or row["cv"]["folds_digest"] != ref["cv"]["folds_digest"]:
        return {}
    # an ensemble's fold accuracies are stored to 4 decimals: both at 4, so an equal fold is a tie
    gain = np.round(row["cv"]["fold_accuracy"], 4) - np.round(ref["cv"]["fold_accuracy"], 4)
    mean, se = float(gain.mean()), float(gain.std(ddof=1) / np.sqrt(len(gain)))
    won, lost = int((gain > 0).sum()), int((gain < 0).sum())
    return {"gain_per_fold": gain.round(4).tolist(), "gain_mean": round(mean, 4), "gain_se": round(se, 4),
            "folds_won": won, "folds_lost": lost, "wins": won >= 4 and mean > se}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("RETINALENS_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true", help="merge the rows into benchmarks/results.json")
    args = ap.parse_args()
    result = run(Path(args.data), args.rows.split(","))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    if args.merge:
        from run import machine

        path = ROOT / "benchmarks" / "results.json"
        res = json.loads(path.read_text())
        section = res.setdefault("ensemble", {"data": result["data"], "rows": {}})
        for name, row in result["rows"].items():
            section["rows"][name] = row | {"machine": machine(), "command": "python benchmarks/bench_ensemble.py "
                                           f"--rows {name} --merge"}
        path.write_text(json.dumps(res, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
